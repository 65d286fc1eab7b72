"""The HTTP face of the app, as real clients see it: tritonclient.http (unmodified) for the
happy paths and the errors it reads, and plain requests for every error status, each answered
as the protocol's {"error": ...} without any replica seeing the request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from tritonclient.utils import InferenceServerException

from deployments.http import _validation_error
from deployments.protocol import HEADER_LENGTH
from engines import models
from engines.backend import load_engine
from engines.runner import ModelRunner

from .serving import requests_seen, served

pytestmark = pytest.mark.integration

MAX_BATCH = 4
MAX_BODY = 4096


@pytest.fixture(scope="module")
def url(cache_dir: Path) -> Iterator[str]:
    with served(cache_dir, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> Iterator[ModelRunner]:
    """The same model, run in this process: what the server's answers must equal."""
    runner = ModelRunner(load_engine(models.resolve("tiny", cache_dir), "onnxruntime"))
    yield runner
    runner.close()


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 16)).astype(np.float32)


def _json_infer(x: np.ndarray, **extra: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _binary_infer(shape: list[int], declared: int, payload: bytes) -> tuple[bytes, int]:
    """A binary request whose JSON declares ``declared`` bytes and which carries ``payload``."""
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    return header + payload, len(header)



def test_tritonclient_reads_server_and_model_metadata(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "trtserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta == client.get_model_metadata("tiny", "1")
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 8]),
        ("probs", "FP32", [-1, 8]),
    ]
    with pytest.raises(InferenceServerException, match="no version '2'") as info:
        client.get_model_metadata("tiny", "2")
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no model 'nope'") as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_tritonclient_inference_equals_the_engine(
    client: triton.InferenceServerClient, engine: ModelRunner, binary_in: bool, binary_out: bool
) -> None:
    x = _x(3, seed=7)
    expected, _ = engine.infer({"x": x}, local_retries=0)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    asked = [triton.InferRequestedOutput(name, binary_data=binary_out)
             for name in ("probs", "logits")]
    result = client.infer("tiny", [tensor], outputs=asked, request_id="req-42")
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "tiny" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["probs", "logits"]
    for out in response["outputs"]:
        assert ("binary_data_size" in out.get("parameters", {})) is binary_out
        assert ("data" in out) is not binary_out
    for name in ("probs", "logits"):
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (3, 8)
        np.testing.assert_array_equal(got, expected[name])


def test_only_the_selected_outputs_come_back(
    client: triton.InferenceServerClient, engine: ModelRunner
) -> None:
    x = _x(2)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    result = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("probs")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probs"]
    assert result.as_numpy("logits") is None
    expected, _ = engine.infer({"x": x}, local_retries=0)
    np.testing.assert_array_equal(result.as_numpy("probs"), expected["probs"])
    # No outputs named: all of them (tritonclient then asks for binary data).
    everything = client.infer("tiny", [tensor])
    assert [o["name"] for o in everything.get_response()["outputs"]] == ["logits", "probs"]


def test_the_timeout_parameter_is_honoured(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(_x(1))
    # Microseconds on the wire: 30 s is plenty, 1 us has passed before any replica is tried.
    assert client.infer("tiny", [tensor], timeout=30_000_000).as_numpy("probs").shape == (1, 8)
    with pytest.raises(InferenceServerException, match="deadline passed") as info:
        client.infer("tiny", [tensor], timeout=1)
    assert info.value.status() == "504"


def test_tritonclient_gets_bad_input_as_its_exception(
    client: triton.InferenceServerClient,
) -> None:
    tensor = triton.InferInput("x", [2, 15], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 15), np.float32))
    with pytest.raises(InferenceServerException, match="dimension 1 must be 16") as info:
        client.infer("tiny", [tensor])
    assert info.value.status() == "400"


def test_versions_in_the_path(url: str, engine: ModelRunner) -> None:
    x = _x(1)
    v1 = f"{url}/v2/models/tiny/versions/1"
    assert requests.get(v1, timeout=30).json()["versions"] == ["1"]
    assert requests.get(f"{v1}/ready", timeout=30).json() == {"name": "tiny", "ready": True}
    reply = requests.post(f"{v1}/infer", data=_json_infer(x), timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == "1"
    np.testing.assert_array_equal(
        np.array(reply.json()["outputs"][1]["data"], np.float32).reshape(1, 8),
        engine.infer({"x": x}, local_retries=0)[0]["probs"],
    )
    v2 = f"{url}/v2/models/tiny/versions/2"
    for reply in (
        requests.get(v2, timeout=30),
        requests.get(f"{v2}/ready", timeout=30),
        requests.post(f"{v2}/infer", data=_json_infer(x), timeout=30),
    ):
        assert reply.status_code == 404
        assert reply.json() == {"error": "model 'tiny' has no version '2' (it has 1)"}


def test_every_infer_answer_carries_the_attempt_trail(url: str) -> None:
    ok = requests.post(f"{url}/v2/models/tiny/infer", data=_json_infer(_x(1)), timeout=30)
    trail = json.loads(ok.headers["trtserve-attempts"])
    assert [a["outcome"] for a in trail] == ["ok"] and trail[0]["replica"]
    # The Router's view of the attempt holds the replica's, with the hop both ways.
    assert trail[0]["router_ms"] >= trail[0]["ms"] > 0
    bad = requests.post(f"{url}/v2/models/tiny/infer", data=b"{", timeout=30)
    assert bad.status_code == 400 and json.loads(bad.headers["trtserve-attempts"]) == []


def _chunked(body: bytes) -> Iterator[bytes]:
    """A body requests sends chunked, with no Content-Length to refuse it by."""
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


X1 = _x(1)
BINARY_X1 = X1.tobytes()
ERRORS: dict[str, tuple[str, str, dict[str, str], Any, int, str]] = {
    # id: (method, path, headers, body, status, part of the message)
    "malformed JSON": ("POST", "/v2/models/tiny/infer", {}, b'{"inputs": [', 400,
                       "not valid UTF-8 JSON"),
    "not UTF-8": ("POST", "/v2/models/tiny/infer", {}, b"\xff\xfe{}", 400, "UTF-8"),
    "wrong tensor name": ("POST", "/v2/models/tiny/infer", {},
                          _json_infer(X1).replace(b'"x"', b'"y"'), 400,
                          "unknown input tensor(s) ['y']"),
    "wrong datatype": ("POST", "/v2/models/tiny/infer", {},
                       _json_infer(X1).replace(b'"FP32"', b'"FP64"'), 400,
                       "expected dtype float32, got float64"),
    "wrong shape": ("POST", "/v2/models/tiny/infer", {},
                    _json_infer(np.zeros((2, 8), np.float32)), 400, "dimension 1 must be 16"),
    "batch over the limit": ("POST", "/v2/models/tiny/infer", {}, _json_infer(_x(MAX_BATCH + 1)),
                             400, f"batch {MAX_BATCH + 1} is over this model's limit of 4"),
    "data count": ("POST", "/v2/models/tiny/infer", {},
                   _json_infer(X1).replace(b"[1, 16]", b"[2, 16]"), 400, "the shape needs 32"),
    "header length past the body": (
        "POST", "/v2/models/tiny/infer", {HEADER_LENGTH: "100000"},
        _binary_infer([1, 16], 64, BINARY_X1)[0], 400, "but the body has"),
    "header length not a number": (
        "POST", "/v2/models/tiny/infer", {HEADER_LENGTH: "12abc"},
        _binary_infer([1, 16], 64, BINARY_X1)[0], 400, "must be a non-negative integer"),
    "binary size not the tensor's": (
        "POST", "/v2/models/tiny/infer",
        {HEADER_LENGTH: str(_binary_infer([1, 16], 60, BINARY_X1[:60])[1])},
        _binary_infer([1, 16], 60, BINARY_X1[:60])[0], 400, "needs 64 bytes"),
    "binary size past the body": (
        "POST", "/v2/models/tiny/infer",
        {HEADER_LENGTH: str(_binary_infer([1, 16], 128, BINARY_X1)[1])},
        _binary_infer([1, 16], 128, BINARY_X1)[0], 400, "only 64 byte(s) of binary data remain"),
    "bytes nobody declared": (
        "POST", "/v2/models/tiny/infer",
        {HEADER_LENGTH: str(_binary_infer([1, 16], 64, BINARY_X1)[1])},
        _binary_infer([1, 16], 64, BINARY_X1 + b"junk")[0], 400, "belong to no input"),
    "bad timeout header": ("POST", "/v2/models/tiny/infer", {"trtserve-timeout": "soon"},
                           _json_infer(X1), 400, "trtserve-timeout must be seconds"),
    "bad timeout parameter": ("POST", "/v2/models/tiny/infer", {},
                              _json_infer(X1, parameters={"timeout": -5}), 400,
                              "must be an integer number of microseconds"),
    "unknown encoding": ("POST", "/v2/models/tiny/infer", {"Content-Encoding": "br"},
                         _json_infer(X1), 400, "unsupported Content-Encoding"),
    "body over the limit": ("POST", "/v2/models/tiny/infer", {}, b" " * (MAX_BODY + 1), 413,
                            f"over the limit of {MAX_BODY}"),
    "chunked body over the limit": ("POST", "/v2/models/tiny/infer", {},
                                    _chunked(b" " * (3 * MAX_BODY)), 413,
                                    f"over the limit of {MAX_BODY}"),
    "unknown model": ("POST", "/v2/models/nope/infer", {}, _json_infer(X1), 404,
                      "no model 'nope'; serving: tiny"),
    "unknown model's metadata": ("GET", "/v2/models/nope", {}, None, 404, "no model 'nope'"),
    "unknown model's readiness": ("GET", "/v2/models/nope/ready", {}, None, 404,
                                  "no model 'nope'"),
    "unknown version": ("POST", "/v2/models/tiny/versions/9/infer", {}, _json_infer(X1), 404,
                        "no version '9'"),
    "unknown route": ("GET", "/v2/modelz", {}, None, 404, "no route GET /v2/modelz"),
    "unknown route outside /v2": ("POST", "/infer", {}, _json_infer(X1), 404,
                                  "no route POST /infer"),
    "wrong method on infer": ("GET", "/v2/models/tiny/infer", {}, None, 405,
                              "method GET is not allowed on /v2/models/tiny/infer"),
    "wrong method on health": ("POST", "/v2/health/live", {}, b"{}", 405,
                               "(allowed: GET)"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_every_error_is_the_protocols_shape_and_reaches_no_replica(url: str, case: str) -> None:
    method, path, headers, body, status, message = ERRORS[case]
    seen = requests_seen()
    reply = requests.request(method, url + path, headers=headers, data=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert list(error) == ["error"] and message in error["error"], error
    if status == 405:
        assert reply.headers["allow"]
    assert requests_seen() == seen


def test_a_validation_error_is_a_400_in_the_protocols_shape() -> None:
    # No route of the app declares a parameter FastAPI could refuse today; this keeps any
    # that is added later from answering 422 {"detail": ...}.
    problem = {"loc": ("query", "version"), "msg": "Input should be a valid string",
               "type": "string_type"}
    request = Request({"type": "http", "method": "GET", "path": "/v2/models/tiny",
                       "headers": []})
    reply = asyncio.run(_validation_error(request, RequestValidationError([problem])))
    assert reply.status_code == 400
    assert json.loads(bytes(reply.body)) == {
        "error": "malformed request: query.version: Input should be a valid string"
    }
