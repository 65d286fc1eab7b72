"""The Open Inference Protocol codec: round trips for every datatype, JSON and binary, against
tritonclient.http's own request builder and response parser, and a fuzz of hostile bodies that
must only ever raise InvalidInput or PayloadTooLarge. No Ray, no server."""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.protocol import (
    HEADER_LENGTH,
    MAX_DATA_DEPTH,
    InferRequest,
    RequestedOutput,
    decode_content_encoding,
    decode_infer_request,
    encode_infer_response,
    error_body,
    model_metadata,
    parse_header_length,
    server_metadata,
    to_datatype,
    to_numpy_dtype,
)
from engines.errors import InvalidInput, PayloadTooLarge
from engines.spec import IOSpec, TensorSpec

DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
JSON_DATATYPES = [d for d in DATATYPES if d != "FP16"]

# ---------------------------------------------------------------------------------------------
# Helpers: build arrays and request bodies independently of the code under test.


def sample(datatype: str, shape: tuple[int, ...], *, utf8: bool = True) -> np.ndarray:
    """Seeded values that include each type's awkward ones (extremes, NaN, inf, empty bytes)."""
    rng = np.random.default_rng(len(datatype) * 7919 + len(shape))
    n = math.prod(shape)
    if datatype == "BYTES":
        pool = [b"", b"abc", "h\u00e9".encode(), b"x" * 300]
        if not utf8:
            pool.append(b"\xff\x00\xfe")
        flat = np.empty(n, dtype=object)
        flat[:] = [pool[i % len(pool)] for i in range(n)]
        return flat.reshape(shape)
    dtype = to_numpy_dtype(datatype)
    if datatype == "BOOL":
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        flat[:2] = [info.min, info.max][: min(n, 2)]
        return flat.reshape(shape)
    info = np.finfo(dtype)
    flat = rng.standard_normal(n).astype(dtype)
    specials = [np.nan, np.inf, -np.inf, info.max, info.tiny, -0.0]
    flat[: min(n, len(specials))] = specials[: min(n, len(specials))]
    return flat.reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.ravel().tolist() == want.ravel().tolist()
        return
    assert got.dtype == want.dtype
    if want.dtype.kind != "f":
        assert np.array_equal(got, want)
        return
    # NaN where NaN was (JSON has one NaN, so payloads may not survive), and bitwise everywhere
    # else, so signed zeros, infinities and extremes must.
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert got[~nan].tobytes() == want[~nan].tobytes()


def binary_chunk(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(e)) + e for e in array.ravel().tolist())
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def input_entry(name: str, array: np.ndarray, binary: bool, nested: bool = False) -> dict:
    entry: dict[str, Any] = {
        "name": name,
        "datatype": to_datatype(array.dtype),
        "shape": list(array.shape),
    }
    if binary:
        entry["parameters"] = {"binary_data_size": len(binary_chunk(array))}
    elif array.dtype == object:
        entry["data"] = [e.decode("utf-8") for e in array.ravel().tolist()]
    else:
        entry["data"] = array.tolist() if nested and array.ndim else array.ravel().tolist()
    return entry


def assemble(doc: dict, chunks: list[bytes]) -> tuple[bytes, int | None]:
    """A body as a client sends it; the header length only where there is binary data."""
    header = json.dumps(doc).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def build(
    arrays: dict[str, np.ndarray], binary: bool, nested: bool = False, **extra: Any
) -> tuple[bytes, int | None]:
    doc = {"inputs": [input_entry(n, a, binary, nested) for n, a in arrays.items()], **extra}
    return assemble(doc, [binary_chunk(a) for a in arrays.values()] if binary else [])


def decode(doc: Any, chunks: list[bytes] | None = None, **kw: Any) -> InferRequest:
    body, header_length = assemble(doc, chunks or [])
    return decode_infer_request(body, header_length, **kw)


def owner(array: np.ndarray) -> object:
    base: object = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


SHAPES = [(2, 3), (7,), ()]


# ---------------------------------------------------------------------------------------------
# Datatypes.


@pytest.mark.parametrize("datatype", DATATYPES)
def test_datatype_names_map_both_ways(datatype: str) -> None:
    assert to_datatype(to_numpy_dtype(datatype)) == datatype


def test_numpy_dtypes_map_to_protocol_names() -> None:
    assert to_numpy_dtype("BYTES") == np.dtype(object)
    assert to_datatype(np.dtype(">f4")) == "FP32"
    assert to_datatype(np.dtype("S3")) == "BYTES"
    assert to_datatype(np.dtype("U3")) == "BYTES"
    assert to_datatype(np.bool_) == "BOOL"
    with pytest.raises(TypeError, match="complex64"):
        to_datatype(np.complex64)


@pytest.mark.parametrize("name", ["BF16", "FP8", "fp32", ""])
def test_unknown_datatype_names_are_invalid_input(name: str) -> None:
    with pytest.raises(InvalidInput, match="BF16|unknown datatype"):
        to_numpy_dtype(name)


# ---------------------------------------------------------------------------------------------
# Request round trips.


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("datatype", JSON_DATATYPES)
def test_json_request_round_trips(datatype: str, nested: bool) -> None:
    arrays = {f"t{i}": sample(datatype, shape) for i, shape in enumerate(SHAPES)}
    request = decode_infer_request(*build(arrays, binary=False, nested=nested))
    assert list(request.inputs) == list(arrays)
    for name, want in arrays.items():
        assert_same(request.inputs[name], want)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_binary_request_round_trips(datatype: str) -> None:
    arrays = {f"t{i}": sample(datatype, shape, utf8=False) for i, shape in enumerate(SHAPES)}
    request = decode_infer_request(*build(arrays, binary=True))
    for name, want in arrays.items():
        assert_same(request.inputs[name], want)


def test_json_and_binary_inputs_mix_in_one_request() -> None:
    a, b, c = sample("FP32", (2, 2)), sample("INT64", (3,)), sample("BYTES", (2,), utf8=False)
    doc = {
        "inputs": [
            input_entry("a", a, binary=True),
            input_entry("b", b, binary=False),
            input_entry("c", c, binary=True),
        ]
    }
    request = decode(doc, [binary_chunk(a), binary_chunk(c)])
    for name, want in {"a": a, "b": b, "c": c}.items():
        assert_same(request.inputs[name], want)


def test_fp16_json_input_is_refused_as_triton_does() -> None:
    with pytest.raises(InvalidInput, match="FP16 data cannot be sent as JSON"):
        decode_infer_request(*build({"h": sample("FP16", (2,))}, binary=False))


def test_nan_and_infinity_tokens_decode_as_data() -> None:
    body = (
        b'{"inputs":[{"name":"a","datatype":"FP32","shape":[4],'
        b'"data":[NaN,Infinity,-Infinity,1.5]},'
        b'{"name":"b","datatype":"FP64","shape":[2,1],"data":[[-Infinity],[NaN]]}]}'
    )
    request = decode_infer_request(body, None)
    a, b = request.inputs["a"], request.inputs["b"]
    assert a.dtype == np.float32 and b.dtype == np.float64
    assert np.isnan(a[0]) and a[1] == np.inf and a[2] == -np.inf and a[3] == 1.5
    assert b[0, 0] == -np.inf and np.isnan(b[1, 0])


def test_aligned_binary_input_is_a_view_of_the_body() -> None:
    array = sample("FP32", (4, 4))
    for pad in range(8):
        doc = {"inputs": [input_entry("x", array, binary=True)], "pad": " " * pad}
        body, header_length = assemble(doc, [binary_chunk(array)])
        assert header_length is not None
        got = decode_infer_request(body, header_length).inputs["x"]
        assert_same(got, array)
        assert got.flags.aligned
        address = np.frombuffer(body, np.uint8).ctypes.data + header_length
        if address % array.dtype.alignment == 0:
            assert owner(got) is body
        else:
            assert owner(got) is not body


def test_request_fields_are_decoded() -> None:
    arrays = {"x": sample("INT32", (2,))}
    request = decode_infer_request(
        *build(
            arrays,
            binary=False,
            id="req-7",
            parameters={"timeout": 2_500_000, "binary_data_output": True, "priority": 2},
            outputs=[{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        )
    )
    assert request.id == "req-7"
    assert request.timeout_s == 2.5
    assert request.binary_data_output is True
    assert request.outputs == (RequestedOutput("y", False), RequestedOutput("z", None))
    assert request.parameters["priority"] == 2


def test_zero_timeout_means_none_as_in_triton() -> None:
    request = decode_infer_request(
        *build({"x": sample("INT32", (1,))}, binary=False, parameters={"timeout": 0})
    )
    assert request.timeout_s is None


def test_unknown_fields_are_ignored_at_every_level() -> None:
    entry = input_entry("x", sample("FP32", (2,)), binary=False)
    entry["x_note"] = {"anything": [1, 2]}
    doc = {
        "model_name": "m",
        "x_extra": [None],
        "inputs": [entry],
        "outputs": [{"name": "y", "x_more": 1}],
        "parameters": {"sequence_id": 0, "x_custom": "v"},
    }
    request = decode(doc)
    assert list(request.inputs) == ["x"]
    assert request.outputs == (RequestedOutput("y"),)


# ---------------------------------------------------------------------------------------------
# tritonclient.http's own request builder and response parser.


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_request_bodies_decode(datatype: str, binary: bool) -> None:
    arrays = {f"t{i}": sample(datatype, shape, utf8=not binary) for i, shape in enumerate(SHAPES)}
    inputs = []
    for name, array in arrays.items():
        infer_input = triton.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    outputs = [triton.InferRequestedOutput("y", binary_data=not binary)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="abc", timeout=1_500
    )
    assert (header_length is not None) == binary
    if datatype == "FP16" and not binary:
        with pytest.raises(InvalidInput, match="FP16"):
            decode_infer_request(body, header_length)
        return
    request = decode_infer_request(body, header_length)
    for name, want in arrays.items():
        assert_same(request.inputs[name], want)
    assert request.id == "abc"
    assert request.timeout_s == pytest.approx(0.0015)
    assert request.outputs == (RequestedOutput("y", not binary),)
    assert request.binary_data_output is False


def test_tritonclient_without_outputs_asks_for_binary_outputs() -> None:
    infer_input = triton.InferInput("x", [3], "FP32")
    infer_input.set_data_from_numpy(sample("FP32", (3,)))
    body, header_length = triton.InferenceServerClient.generate_request_body([infer_input])
    request = decode_infer_request(body, header_length)
    assert request.outputs == () and request.binary_data_output is True
    assert request.id is None and request.timeout_s is None


def tritonclient_parse(body: bytes, headers: dict[str, str]) -> Any:
    length = headers.get(HEADER_LENGTH)
    return triton.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )


def as_bytes(array: np.ndarray) -> np.ndarray:
    """tritonclient gives BYTES sent as JSON back as str; compare them as bytes."""
    out = np.empty(array.size, dtype=object)
    out[:] = [e.encode() if isinstance(e, str) else e for e in array.ravel().tolist()]
    return out.reshape(array.shape)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_parses_encoded_responses(datatype: str, binary: bool) -> None:
    outputs = {f"y{i}": sample(datatype, shape) for i, shape in enumerate(SHAPES)}
    body, headers = encode_infer_response(
        "model",
        "1",
        "req-1",
        outputs,
        requested=[RequestedOutput(name, binary) for name in outputs],
    )
    # FP16 has no JSON form, so it goes binary even when JSON was asked for.
    assert (HEADER_LENGTH in headers) == (binary or datatype == "FP16")
    result = tritonclient_parse(body, headers)
    for name, want in outputs.items():
        got = result.as_numpy(name)
        assert_same(as_bytes(got) if datatype == "BYTES" else got, want)
    response = result.get_response()
    assert response["model_name"] == "model"
    assert response["model_version"] == "1"
    assert response["id"] == "req-1"


def test_response_content_types() -> None:
    x = sample("FP32", (2,))
    _, json_headers = encode_infer_response("m", None, None, {"x": x})
    assert json_headers == {"Content-Type": "application/json"}
    body, headers = encode_infer_response("m", None, None, {"x": x}, binary_data_output=True)
    assert headers["Content-Type"] == "application/octet-stream"
    assert body[int(headers[HEADER_LENGTH]) :] == x.tobytes()


def test_response_picks_and_orders_requested_outputs() -> None:
    outputs = {"a": sample("INT8", (2,)), "b": sample("FP64", (3,)), "c": sample("BOOL", (1,))}
    body, headers = encode_infer_response(
        "m",
        None,
        "",
        outputs,
        requested=[RequestedOutput("c"), RequestedOutput("a", True)],
        binary_data_output=False,
    )
    response = tritonclient_parse(body, headers).get_response()
    assert [o["name"] for o in response["outputs"]] == ["c", "a"]
    assert "data" in response["outputs"][0] and "parameters" in response["outputs"][1]
    assert "model_version" not in response and "id" not in response


def test_response_without_requested_outputs_follows_binary_data_output() -> None:
    outputs = {"a": sample("INT16", (2,)), "b": sample("UINT64", (2,))}
    body, headers = encode_infer_response("m", "2", None, outputs, binary_data_output=True)
    result = tritonclient_parse(body, headers)
    assert all("parameters" in o for o in result.get_response()["outputs"])
    for name, want in outputs.items():
        assert_same(result.as_numpy(name), want)


def test_non_utf8_bytes_output_goes_binary_even_when_json_was_asked() -> None:
    value = sample("BYTES", (5,), utf8=False)
    body, headers = encode_infer_response("m", None, None, {"s": value})
    assert HEADER_LENGTH in headers
    assert_same(tritonclient_parse(body, headers).as_numpy("s"), value)


def test_bytes_outputs_accept_str_and_fixed_width_arrays() -> None:
    words = np.array(["h\u00e9", "b"], dtype=object)
    fixed = np.array([b"ab", b"c"], dtype="S2")
    body, headers = encode_infer_response(
        "m", None, None, {"w": words, "f": fixed}, binary_data_output=True
    )
    result = tritonclient_parse(body, headers)
    assert result.as_numpy("w").tolist() == ["h\u00e9".encode(), b"b"]
    assert result.as_numpy("f").tolist() == [b"ab", b"c"]


def test_json_response_carries_nan_and_infinity_for_tritonclient() -> None:
    value = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, headers = encode_infer_response("m", None, None, {"x": value})
    assert b"NaN" in body and b"-Infinity" in body
    assert_same(tritonclient_parse(body, headers).as_numpy("x"), value)


def test_empty_and_non_contiguous_outputs_encode() -> None:
    outputs = {
        "empty": np.zeros((0, 3), dtype=np.float32),
        "strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">i4"),
    }
    for binary in (True, False):
        body, headers = encode_infer_response("m", None, None, outputs, binary_data_output=binary)
        result = tritonclient_parse(body, headers)
        for name, want in outputs.items():
            assert np.array_equal(result.as_numpy(name), want)


def test_requested_output_the_model_did_not_produce_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not produced"):
        encode_infer_response(
            "m", None, None, {"y": sample("FP32", (1,))}, requested=[RequestedOutput("z")]
        )


def test_outputs_the_protocol_cannot_carry_are_a_server_bug() -> None:
    with pytest.raises(TypeError, match="complex128"):
        encode_infer_response("m", None, None, {"y": np.zeros(2, dtype=np.complex128)})
    with pytest.raises(TypeError, match="int"):
        encode_infer_response("m", None, None, {"y": np.array([1, 2], dtype=object)})


# ---------------------------------------------------------------------------------------------
# Spec checks.

SPEC = IOSpec(
    inputs=(
        TensorSpec("image", np.float32, (-1, 3)),
        TensorSpec("mask", np.bool_, (-1,)),
    ),
    outputs=(TensorSpec("logits", np.float32, (-1, 10)), TensorSpec("label", np.int64, (-1,))),
    max_batch=4,
)


def spec_inputs(batch: int = 2) -> dict[str, np.ndarray]:
    return {"mask": sample("BOOL", (batch,)), "image": sample("FP32", (batch, 3))}


def test_spec_accepts_valid_request_and_orders_inputs_as_the_model() -> None:
    body, header_length = build(spec_inputs(), binary=True, outputs=[{"name": "label"}])
    request = decode_infer_request(body, header_length, SPEC)
    assert list(request.inputs) == ["image", "mask"]
    assert request.outputs == (RequestedOutput("label"),)


@pytest.mark.parametrize(
    ("arrays", "outputs", "message"),
    [
        ({**spec_inputs(), "extra": sample("FP32", (2,))}, [], "unknown input"),
        ({"image": sample("FP32", (2, 3))}, [], "missing input"),
        ({**spec_inputs(), "image": sample("FP64", (2, 3))}, [], "expected dtype float32"),
        ({**spec_inputs(), "image": sample("FP32", (2, 4))}, [], "dimension 1 must be 3"),
        (spec_inputs(batch=5), [], "over this model's limit of 4"),
        (spec_inputs(), [{"name": "probs"}], "unknown output"),
    ],
    ids=["unknown-input", "missing-input", "dtype", "shape", "batch", "unknown-output"],
)
def test_spec_refuses_mismatches(
    arrays: dict[str, np.ndarray], outputs: list[dict], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(*build(arrays, binary=False, outputs=outputs), SPEC)


# ---------------------------------------------------------------------------------------------
# Malformed bodies, one by one: each names what is wrong.

F32 = {"name": "x", "datatype": "FP32", "shape": [2]}
U8_BIN = {"name": "x", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}
BYTES_BIN = {"name": "s", "datatype": "BYTES", "shape": [2]}


def with_inputs(*inputs: dict, **extra: Any) -> dict:
    return {"inputs": list(inputs), **extra}


def nested(depth: int) -> Any:
    value: Any = [0.0]
    for _ in range(depth - 1):
        value = [value]
    return value


def bytes_input(blob: bytes, count: int = 2) -> tuple[bytes, int]:
    entry = {**BYTES_BIN, "shape": [count], "parameters": {"binary_data_size": len(blob)}}
    return assemble(with_inputs(entry), [blob])


MALFORMED: list[tuple[str, Any, str]] = [
    ("not-json", (b"not json", None), "not valid UTF-8 JSON"),
    ("not-utf8", (b'{"inputs": "\xff"}', None), "not valid UTF-8 JSON"),
    ("array", (b"[1, 2]", None), "must be a JSON object"),
    ("deep-json", (b"[" * 100_000 + b"]" * 100_000, None), "too deeply nested"),
    ("inputs-object", {"inputs": {}}, "'inputs' must be a JSON array"),
    ("id-number", with_inputs(id=5), "'id' must be a string"),
    ("input-no-name", with_inputs({"datatype": "FP32"}), "string 'name'"),
    ("datatype-missing", with_inputs({"name": "x", "shape": [1]}), "'datatype' must be"),
    ("datatype-unknown", with_inputs({**F32, "datatype": "FP8"}), "unknown datatype 'FP8'"),
    ("datatype-bf16", with_inputs({**F32, "datatype": "BF16"}), "BF16 is not supported"),
    ("shape-missing", with_inputs({"name": "x", "datatype": "FP32"}), "'shape' must be"),
    ("shape-negative", with_inputs({**F32, "shape": [-1], "data": []}), "non-negative"),
    ("shape-float", with_inputs({**F32, "shape": [2.0], "data": [1, 2]}), "non-negative"),
    ("shape-bool", with_inputs({**F32, "shape": [True], "data": [1]}), "non-negative"),
    ("shape-absurd", with_inputs({**F32, "shape": [2**40, 2**40]}), "absurdly large"),
    ("shape-absurd-empty", with_inputs({**F32, "shape": [0, 2**62], "data": []}), "absurdly"),
    ("rank", with_inputs({**F32, "shape": [1] * 33, "data": [1]}), "rank 33"),
    ("shape-vs-body", with_inputs({**F32, "shape": [10**6], "data": [1]}), "more than a"),
    ("count", with_inputs({**F32, "data": [1, 2, 3]}), "3 element(s) but the shape needs 2"),
    ("count-nested", with_inputs({**F32, "data": [[1], [2], [3]]}), "needs 2"),
    ("data-scalar", with_inputs({**F32, "shape": [], "data": 1.0}), "must be a JSON array"),
    ("data-deep", with_inputs({**F32, "shape": [1], "data": nested(65)}), "nested deeper"),
    ("int8-range", with_inputs({**F32, "datatype": "INT8", "data": [1, 300]}), "INT8's range"),
    ("uint8-negative", with_inputs({**F32, "datatype": "UINT8", "data": [0, -1]}), "range"),
    ("uint64-range", with_inputs({**F32, "datatype": "UINT64", "data": [2**64, 0]}), "range"),
    ("int-bool", with_inputs({**F32, "datatype": "INT32", "data": [1, True]}), "integers"),
    ("int-float", with_inputs({**F32, "datatype": "INT32", "data": [1, 1.0]}), "integers"),
    (
        "int-nan",
        (b'{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[NaN]}]}', None),
        "integers",
    ),
    ("float-string", with_inputs({**F32, "data": [1.0, "2"]}), "must be numbers"),
    ("float-null", with_inputs({**F32, "data": [1.0, None]}), "must be numbers"),
    ("float-huge-int", with_inputs({**F32, "datatype": "FP64", "data": [1, 10**400]}), "too large"),
    ("bool-int", with_inputs({**F32, "datatype": "BOOL", "data": [True, 1]}), "true or false"),
    ("bytes-number", with_inputs({**F32, "datatype": "BYTES", "data": ["a", 5]}), "strings"),
    (
        "bytes-surrogate",
        (b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', None),
        "not valid Unicode",
    ),
    ("no-data", with_inputs(F32), "neither 'data' nor"),
    ("both", assemble(with_inputs({**U8_BIN, "data": [1, 2, 3, 4]}), [b"abcd"]), "both"),
    ("size-negative", with_inputs({**F32, "parameters": {"binary_data_size": -8}}), "non-neg"),
    ("size-string", with_inputs({**F32, "parameters": {"binary_data_size": "8"}}), "non-neg"),
    ("size-bool", with_inputs({**F32, "parameters": {"binary_data_size": True}}), "non-neg"),
    ("no-header", (json.dumps(with_inputs(U8_BIN)).encode() + b"abcd", None), "needs the Infer"),
    ("no-header-json-only", with_inputs(U8_BIN), "has no Inference-Header-Content-Length"),
    (
        "size-over-body",
        assemble(with_inputs({**U8_BIN, "parameters": {"binary_data_size": 9}}), [b"abcdefgh"]),
        "only 8 byte(s)",
    ),
    ("size-vs-shape", assemble(with_inputs({**U8_BIN, "shape": [2]}), [b"abcd"]), "needs 2"),
    ("trailing", assemble(with_inputs(U8_BIN), [b"abcdef"]), "belong to no input"),
    ("json-trailing", assemble(with_inputs({**F32, "data": [1, 2]}), [b"xy"]), "no input"),
    ("header-over-body", (b"{}", 3), "is 3 but the body has 2"),
    ("header-negative", (b"{}", -1), "is -1"),
    ("header-short", assemble(with_inputs(U8_BIN), [b"abcd"])[:1] + (10,), "not valid"),
    (
        "bool-byte",
        assemble(with_inputs({**U8_BIN, "datatype": "BOOL"}), [b"\x00\x01\x02\x00"]),
        "BOOL bytes must be 0 or 1",
    ),
    ("bytes-prefixes", bytes_input(b"\x00\x00\x00\x00", count=2), "length prefixes"),
    ("bytes-in-prefix", bytes_input(b"\x01\x00\x00\x00a\x00\x00\x00", count=2), "inside"),
    ("bytes-overrun", bytes_input(b"\x09\x00\x00\x00abcd", count=1), "claims 9 bytes"),
    ("bytes-leftover", bytes_input(b"\x01\x00\x00\x00ab", count=1), "left over"),
    (
        "duplicate-input",
        with_inputs({**F32, "data": [1, 2]}, {**F32, "data": [1, 2]}),
        "more than once",
    ),
    ("outputs-object", with_inputs(outputs={"name": "y"}), "'outputs' must be a JSON array"),
    ("output-no-name", with_inputs(outputs=[{"parameters": {}}]), "string 'name'"),
    ("duplicate-output", with_inputs(outputs=[{"name": "y"}, {"name": "y"}]), "more than once"),
    (
        "classification",
        with_inputs(outputs=[{"name": "y", "parameters": {"classification": 3}}]),
        "classification",
    ),
    (
        "output-binary-int",
        with_inputs(outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
        "must be a boolean",
    ),
    (
        "shared-memory",
        with_inputs(
            {**F32, "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}
        ),
        "shared memory is not supported",
    ),
    ("parameters-array", with_inputs(parameters=[1]), "must be a JSON object"),
    ("binary-output-string", with_inputs(parameters={"binary_data_output": "yes"}), "boolean"),
    ("timeout-negative", with_inputs(parameters={"timeout": -1}), "timeout"),
    ("timeout-float", with_inputs(parameters={"timeout": 1.5}), "timeout"),
    ("timeout-bool", with_inputs(parameters={"timeout": True}), "timeout"),
    ("timeout-string", with_inputs(parameters={"timeout": "10"}), "timeout"),
    ("timeout-huge", with_inputs(parameters={"timeout": 2**64}), "timeout"),
]


@pytest.mark.parametrize(
    ("case", "message"), [(c[1], c[2]) for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_requests_say_what_is_wrong(case: Any, message: str) -> None:
    body, header_length = case if isinstance(case, tuple) else assemble(case, [])
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(body, header_length)
    assert message in str(info.value)


def test_nesting_up_to_the_limit_is_data() -> None:
    doc = with_inputs({**F32, "shape": [1], "data": nested(MAX_DATA_DEPTH)})
    assert decode(doc).inputs["x"].tolist() == [0.0]


def test_body_over_the_limit_is_payload_too_large() -> None:
    body, header_length = build({"x": sample("UINT8", (64,))}, binary=True)
    assert decode_infer_request(body, header_length, max_bytes=len(body)).inputs["x"].size == 64
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        decode_infer_request(body, header_length, max_bytes=len(body) - 1)


# ---------------------------------------------------------------------------------------------
# Headers, content encodings, metadata.


def test_parse_header_length() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(" 42 ") == 42
    for bad in ["", "-1", "4.2", "0x10", "1" * 5000, "\u0661"]:
        with pytest.raises(InvalidInput, match=HEADER_LENGTH):
            parse_header_length(bad)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", None, "identity"])
def test_tritonclient_request_compression_is_undone(encoding: str | None) -> None:
    body, _ = build({"x": sample("FP32", (8,))}, binary=True)
    packed = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding or "", bytes)(body)
    assert decode_content_encoding(packed, encoding) == body


def test_content_encoding_bombs_and_garbage_are_refused() -> None:
    bomb = gzip.compress(bytes(10_000_000))
    with pytest.raises(PayloadTooLarge):
        decode_content_encoding(bomb, "gzip", max_bytes=1_000_000)
    with pytest.raises(InvalidInput, match="corrupt"):
        decode_content_encoding(b"not gzip", "gzip")
    with pytest.raises(InvalidInput, match="truncated"):
        decode_content_encoding(zlib.compress(b"x" * 100)[:-3], "deflate")
    with pytest.raises(InvalidInput, match="trailing"):
        decode_content_encoding(zlib.compress(b"x") + b"junk", "deflate")
    with pytest.raises(InvalidInput, match="unsupported Content-Encoding"):
        decode_content_encoding(b"x", "br")


def test_model_metadata_has_protocol_names_and_dynamic_dims() -> None:
    meta = model_metadata("tiny", ["1"], "onnxruntime_onnx", SPEC)
    assert meta == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "mask", "datatype": "BOOL", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }


def test_server_metadata_and_error_body() -> None:
    meta = server_metadata()
    assert meta["name"] == "trtserve"
    assert isinstance(meta["version"], str) and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert error_body("bad input") == {"error": "bad input"}
    # A client-chosen name with a lone surrogate must not break a UTF-8 JSON encoder.
    json.dumps(error_body("unknown input '\ud800'"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Properties.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


def elements(datatype: str) -> st.SearchStrategy[Any]:
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.binary(max_size=6)
    dtype = to_numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    return st.floats(width=dtype.itemsize * 8)


@st.composite
def tensors(draw: st.DrawFn, datatype: str | None = None) -> np.ndarray:
    datatype = datatype or draw(st.sampled_from(DATATYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    values = draw(
        st.lists(elements(datatype), min_size=math.prod(shape), max_size=math.prod(shape))
    )
    if datatype == "BYTES":
        flat = np.empty(len(values), dtype=object)
        flat[:] = values
        return flat.reshape(shape)
    return np.array(values, dtype=to_numpy_dtype(datatype)).reshape(shape)


def needs_binary(array: np.ndarray) -> bool:
    if array.dtype == np.float16:
        return True
    if array.dtype != object:
        return False
    try:
        [e.decode("utf-8") for e in array.ravel().tolist()]
    except UnicodeDecodeError:
        return True
    return False


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], dict, list[bytes]]:
    arrays = draw(
        st.dictionaries(st.text(min_size=1, max_size=4), tensors(), min_size=1, max_size=3)
    )
    inputs, chunks = [], []
    for name, array in arrays.items():
        binary = needs_binary(array) or draw(st.booleans())
        inputs.append(input_entry(name, array, binary, nested=draw(st.booleans())))
        if binary:
            chunks.append(binary_chunk(array))
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": "y", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        doc["parameters"] = {"timeout": draw(st.integers(0, 10**9))}
    return arrays, doc, chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_valid_requests_round_trip(case: tuple[dict[str, np.ndarray], dict, list[bytes]]) -> None:
    arrays, doc, chunks = case
    request = decode(doc, chunks)
    assert list(request.inputs) == list(arrays)
    for name, want in arrays.items():
        assert_same(request.inputs[name], want)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["FP32", "FP64"]).flatmap(lambda d: tensors(d)))
def test_floats_with_nan_and_inf_decode_as_data_from_json(array: np.ndarray) -> None:
    got = decode_infer_request(*build({"x": array}, binary=False)).inputs["x"]
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array, equal_nan=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(min_size=1, max_size=4), tensors(), min_size=1, max_size=3),
    st.booleans(),
)
def test_encoded_responses_parse_in_tritonclient(
    outputs: dict[str, np.ndarray], binary: bool
) -> None:
    body, headers = encode_infer_response("m", "1", "id", outputs, binary_data_output=binary)
    result = tritonclient_parse(body, headers)
    for name, want in outputs.items():
        got = result.as_numpy(name)
        assert_same(as_bytes(got) if want.dtype == object else got, want)


MUTATIONS = [
    "replace",
    "delete",
    "unknown-fields",
    "size-lie",
    "header-lie",
    "truncate",
    "append",
    "shape",
    "datatype",
    "scalar",
    "deep-data",
    "huge-shape",
    "random-json",
    "random-bytes",
    "deep-json",
    "too-large",
]


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes, int | None, int, str]:
    """(mutation, body, header_length, max_bytes, expected: 'any' | 'fail' | 'ok' | 'too-large')."""
    _, doc, chunks = draw(requests())
    mutation = draw(st.sampled_from(MUTATIONS))
    inputs = doc["inputs"]
    target = draw(st.sampled_from(inputs))
    expect = "any"
    if mutation == "replace":
        container = draw(st.sampled_from([doc, target, target.get("parameters", target)]))
        container[draw(st.sampled_from(sorted(container)))] = draw(json_values)
    elif mutation == "delete":
        del target[draw(st.sampled_from(sorted(target)))]
        expect = "fail"
    elif mutation == "unknown-fields":
        keys = st.text(max_size=4).map(lambda k: "x_" + k)
        for container in (doc, target, *doc.get("outputs", [])):
            container.update(draw(st.dictionaries(keys, json_values, max_size=2)))
        expect = "ok"
    elif mutation == "size-lie" and chunks:
        target = draw(st.sampled_from([i for i in inputs if "parameters" in i]))
        target["parameters"]["binary_data_size"] += draw(st.integers(-50, 50).filter(bool))
        expect = "fail"
    elif mutation == "shape":
        target["shape"] = draw(st.lists(st.integers(-3, 2**70), max_size=40) | json_values)
    elif mutation == "datatype":
        target["datatype"] = draw(st.sampled_from([*DATATYPES, "BF16", "FP8", ""]) | json_values)
    elif mutation == "scalar" and target.get("data"):
        hostile = st.none() | st.booleans() | st.text(max_size=3) | st.integers() | st.floats()
        target["data"][draw(st.integers(0, len(target["data"]) - 1))] = draw(hostile | json_values)
    elif mutation == "deep-data":
        target["data"] = nested(draw(st.integers(MAX_DATA_DEPTH + 1, 800)))
        target.pop("parameters", None)
        expect = "fail"
    elif mutation == "huge-shape":
        target["shape"] = [draw(st.integers(2**31, 2**64))] * draw(st.integers(1, 4))
        expect = "fail"

    body, header_length = assemble(doc, chunks)
    max_bytes = 1 << 22
    if mutation == "header-lie":
        if header_length is None:
            header_length = draw(st.integers(-5, len(body) + 5))
        else:
            header_length += draw(st.integers(-20, 20).filter(bool))
            expect = "fail"
    elif mutation == "truncate":
        body = body[: -draw(st.integers(1, max(1, len(body))))]
        expect = "fail"
    elif mutation == "append":
        body += draw(st.binary(min_size=1, max_size=20))
        expect = "fail" if header_length is not None else "any"
    elif mutation == "random-json":
        body, header_length = json.dumps(draw(json_values)).encode(), None
    elif mutation == "random-bytes":
        body = draw(st.binary(max_size=200))
        header_length = draw(st.none() | st.integers(-2, len(body) + 2))
    elif mutation == "deep-json":
        depth = draw(st.integers(500, 50_000))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"inputs":[{"data":']))
        body, header_length, expect = opener * depth + b"]" * depth, None, "fail"
    elif mutation == "too-large":
        max_bytes, expect = len(body) - 1, "too-large"
    return mutation, body, header_length, max_bytes, expect


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hostile_bodies())
def test_hostile_bodies_raise_only_taxonomy_errors(
    case: tuple[str, bytes, int | None, int, str],
) -> None:
    mutation, body, header_length, max_bytes, expect = case
    try:
        decode_infer_request(body, header_length, max_bytes=max_bytes)
    except PayloadTooLarge:
        assert expect == "too-large", mutation
        return
    except InvalidInput as exc:
        assert str(exc) and expect in ("any", "fail"), (mutation, str(exc))
        return
    assert expect in ("any", "ok"), mutation
