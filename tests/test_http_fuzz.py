"""A barrage of malformed and hostile HTTP requests against the live app.

Each generated request is wrong in at least one way the protocol or HTTP defines, and must
be answered with a 4xx carrying the protocol's {"error": ...}, without reaching any replica
and without harming anything: afterwards the very same replicas answer correctly. NaN and
Inf, by contrast, are valid float data and must be computed on.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pytest
import ray
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deployments.protocol import HEADER_LENGTH
from engines import models

from .serving import engine, replica_ids, requests_seen, served

pytestmark = pytest.mark.integration

MAX_BATCH = 4
# Small enough that "huge" bodies stay fast on 2 cores, large enough for every valid request.
MAX_BODY = 64 * 1024
INFER = "/v2/models/tiny/infer"
HOSTILE_EXAMPLES = 1100
NAN_EXAMPLES = 60
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP64", "BYTES", "BF16", "fp32", "FP32 ", "FLOAT", "", "STRING"]
KNOWN_KEYS = {"id", "inputs", "outputs", "parameters", "name", "datatype", "shape", "data"}
# The methods that reach the app at all; Serve's HTTP parser (in its ingress) refuses other tokens.
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD", "PROPFIND",
           "PURGE", "QUERY"]
ROUTES: list[tuple[str, str]] = [  # (pattern on the decoded path, its one allowed method)
    (r"/v2", "GET"),
    (r"/v2/health/(live|ready)", "GET"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?", "GET"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?/ready", "GET"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?/infer", "POST"),
]


@dataclass(frozen=True)
class Hostile:
    kind: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 400
    chunked: bool = False


def _serve_actors() -> frozenset[str]:
    """Every Serve actor (controller, proxy, replicas): a restart would rename one."""
    return frozenset(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_"))



@pytest.fixture(scope="module")
def url(cache_dir: Path) -> Iterator[str]:
    with served(cache_dir, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY) as base:
        yield base


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# ---- what the strategies are built from ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8,
)
# Keys the protocol does not define: ignored by design (as Triton does), so they ride along
# with a real defect as noise and never make a request valid or invalid on their own.
noise = st.dictionaries(st.text(max_size=10).filter(lambda k: k not in KNOWN_KEYS
                                                    and not k.startswith("shared_memory_")),
                        json_values, max_size=3)
floats = st.floats(-1e3, 1e3, width=32)
segment = st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s and s not in (".", ".."))


def _data(draw: st.DrawFn, count: int) -> list[float]:
    return draw(st.lists(floats, min_size=count, max_size=count))


def _tensor(draw: st.DrawFn, batch: int) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [batch, 16],
            "data": _data(draw, 16 * batch)}


def _valid_doc(draw: st.DrawFn) -> dict[str, Any]:
    return {"inputs": [_tensor(draw, draw(st.integers(1, MAX_BATCH)))]}


def _post(kind: str, doc: Any, headers: dict[str, str] | None = None, status: int = 400,
          path: str = INFER) -> Hostile:
    body = json.dumps(doc).encode()
    # json.dumps refuses ints of over 4300 digits, so such numbers are spliced in afterwards.
    body = re.sub(rb'"__int_(\d+)__"', lambda m: b"1" + b"0" * int(m[1]), body)
    return Hostile(kind, "POST", path, body, headers or {}, status)


def _on_a_route(path: str) -> bool:
    return any(re.fullmatch(pattern, path) for pattern, _ in ROUTES)


# ---- hostile requests, each wrong in a way it names ---------------------------------------

@st.composite
def bad_shape(draw: st.DrawFn) -> tuple[Any, Any]:
    """(shape, data) where the shape is what is wrong; data fits it where it can."""
    shape = draw(st.one_of(
        st.lists(st.integers(0, 20), max_size=5).filter(lambda s: len(s) != 2),
        st.tuples(st.integers(1, MAX_BATCH), st.integers(0, 40).filter(lambda d: d != 16)),
        st.just((0, 16)),
        st.tuples(st.integers(MAX_BATCH + 1, 64), st.just(16)),
        st.tuples(st.integers(-(2**63), -1), st.just(16)),
        st.tuples(st.integers(20, 62).map(lambda k: 2**k), st.just(16)),
        st.tuples(st.sampled_from([1.0, "1", True, None, [1]]), st.just(16)),
        json_values.filter(lambda v: not isinstance(v, list)),
    ))
    if isinstance(shape, tuple | list) and all(type(d) is int and d >= 0 for d in shape):
        count = math.prod(shape)
        if count <= 64 * 16:
            return list(shape), [draw(floats)] * count
    return list(shape) if isinstance(shape, tuple) else shape, _data(draw, 16)


@st.composite
def bad_data(draw: st.DrawFn, batch: int) -> Any:
    count = 16 * batch
    kind = draw(st.sampled_from(["count", "poisoned", "not a list", "deep", "huge int",
                                 "huge"]))
    if kind == "count":
        return draw(st.lists(floats, max_size=3 * count).filter(lambda d: len(d) != count))
    if kind == "poisoned":
        data: list[Any] = _data(draw, count)
        poison = st.one_of(st.text(max_size=5), st.none(), st.booleans(),
                           st.dictionaries(st.text(max_size=3), floats, max_size=2),
                           st.lists(floats, max_size=3).filter(lambda v: len(v) != 1),
                           st.sampled_from(["NaN", "inf", "1.0"]))
        data[draw(st.integers(0, count - 1))] = draw(poison)
        return data
    if kind == "not a list":
        return draw(json_values.filter(lambda v: not isinstance(v, list)))
    if kind == "deep":
        nested: Any = _data(draw, count)
        # Past MAX_DATA_DEPTH; deeper than json.dumps itself can go is deep_json's part.
        for _ in range(draw(st.integers(65, 400))):
            nested = [nested]
        return nested
    if kind == "huge int":  # past float64 (OverflowError), or past Python's int parsing limit
        data = _data(draw, count)
        data[0] = f"__int_{draw(st.integers(309, 5000))}__"
        return data
    return [draw(st.integers(0, 9))] * draw(st.integers(2000, 15000))


@st.composite
def bad_tensor(draw: st.DrawFn) -> Hostile:
    batch = draw(st.integers(1, MAX_BATCH))
    tensor = _tensor(draw, batch)
    what = draw(st.sampled_from(["name", "datatype", "shape", "data", "missing", "both",
                                 "surrogate name", "long name"]))
    if what == "name":
        tensor["name"] = draw(json_values.filter(lambda v: v != "x"))
    elif what == "surrogate name":
        tensor["name"] = "x\ud800"
    elif what == "long name":
        tensor["name"] = "x" * draw(st.integers(1000, 40000))
    elif what == "datatype":
        tensor["datatype"] = draw(st.sampled_from(DATATYPES)
                                  | json_values.filter(lambda v: v != "FP32"))
    elif what == "shape":
        tensor["shape"], tensor["data"] = draw(bad_shape())
    elif what == "data":
        tensor["data"] = draw(bad_data(batch))
    elif what == "missing":
        del tensor[draw(st.sampled_from(["name", "datatype", "shape", "data"]))]
    else:  # both data and binary_data_size
        tensor["parameters"] = {"binary_data_size": 64 * batch}
    tensor.update(draw(noise))
    return _post(f"input {what}", {"inputs": [tensor], **draw(noise)})


@st.composite
def bad_structure(draw: st.DrawFn) -> Hostile:
    doc = _valid_doc(draw)
    x = doc["inputs"][0]
    what = draw(st.sampled_from([
        "not an object", "no inputs", "inputs not a list", "empty inputs", "input not an object",
        "duplicate input", "extra input", "id", "parameters", "binary_data_output", "timeout",
        "shared memory", "outputs not a list", "output not an object", "unknown output",
        "duplicate output", "classification", "output binary_data",
    ]))
    not_none = json_values.filter(lambda v: v is not None)
    if what == "not an object":
        return _post(what, draw(json_values.filter(lambda v: not isinstance(v, dict))))
    if what == "no inputs":
        del doc["inputs"]
    elif what == "inputs not a list":
        doc["inputs"] = draw(not_none.filter(lambda v: not isinstance(v, list)))
    elif what == "empty inputs":
        doc["inputs"] = []
    elif what == "input not an object":
        doc["inputs"].append(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    elif what == "duplicate input":
        doc["inputs"].append(x)
    elif what == "extra input":
        doc["inputs"].append({**x, "name": draw(segment.filter(lambda s: s != "x"))})
    elif what == "id":
        doc["id"] = draw(not_none.filter(lambda v: not isinstance(v, str)))
    elif what == "parameters":
        doc["parameters"] = draw(not_none.filter(lambda v: not isinstance(v, dict)))
    elif what == "binary_data_output":
        doc["parameters"] = {what: draw(not_none.filter(lambda v: not isinstance(v, bool)))}
    elif what == "timeout":
        doc["parameters"] = {"timeout": draw(st.one_of(
            st.integers(max_value=-1), st.integers(min_value=2**64),
            not_none.filter(lambda v: type(v) is not int)))}
    elif what == "shared memory":
        doc["parameters"] = {"shared_memory_region": draw(segment)}
    elif what == "outputs not a list":
        doc["outputs"] = draw(not_none.filter(lambda v: not isinstance(v, list)))
    elif what == "output not an object":
        doc["outputs"] = [draw(json_values.filter(
            lambda v: not (isinstance(v, dict) and isinstance(v.get("name"), str))))]
    elif what == "unknown output":
        doc["outputs"] = [{"name": draw(st.text(max_size=12).filter(
            lambda s: s not in ("logits", "probs")))}]
    elif what == "duplicate output":
        doc["outputs"] = [{"name": "probs"}, {"name": "probs"}]
    elif what == "classification":
        doc["outputs"] = [{"name": "probs", "parameters": {"classification": draw(not_none)}}]
    else:
        doc["outputs"] = [{"name": "probs", "parameters": {
            "binary_data": draw(not_none.filter(lambda v: not isinstance(v, bool)))}}]
    return _post(what, {**doc, **draw(noise)})


@st.composite
def lying_binary(draw: st.DrawFn) -> Hostile:
    """Binary tensor data whose declared sizes disagree with the bytes or with the tensor."""
    batch = draw(st.integers(1, MAX_BATCH))
    need = 64 * batch
    payload = np.array(_data(draw, 16 * batch), np.float32).tobytes()
    declared: Any = need
    what = draw(st.sampled_from(["size", "fewer bytes", "more bytes", "header length",
                                 "header text", "no header", "size type"]))
    if what == "size":
        declared = draw(st.integers(0, 10 * need).filter(lambda n: n != need))
        payload = (payload * 10)[:declared]
    elif what == "fewer bytes":
        payload = payload[: draw(st.integers(0, need - 1))]
    elif what == "more bytes":
        payload += draw(st.binary(min_size=1, max_size=200))
    elif what == "size type":
        declared = draw(st.sampled_from([float(need), str(need), True, -need, [need], {}]))
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [batch, 16],
                                     "parameters": {"binary_data_size": declared}}],
                         **draw(noise)}).encode()
    length: str | None = str(len(header))
    if what == "header length":
        delta = draw(st.integers(-len(header), len(payload) + 100).filter(lambda d: d != 0))
        length = str(len(header) + delta)
    elif what == "header text":
        length = draw(st.one_of(st.sampled_from(["", "-1", "1.5", "0x10", "1e3", "9" * 40]),
                                st.from_regex(r"[ -~]{1,20}", fullmatch=True).filter(
                                    lambda s: s.strip() == s and not s.isdigit())))
    elif what == "no header":
        length = None
    headers = {} if length is None else {HEADER_LENGTH: length}
    return Hostile(f"binary {what}", "POST", INFER, header + payload, headers)


@st.composite
def deep_json(draw: st.DrawFn) -> Hostile:
    """Nesting past any tensor's rank, and past the JSON parser's recursion limit."""
    depth = draw(st.integers(100, 25000))
    what = draw(st.sampled_from(["open", "balanced", "objects as inputs"]))
    if what == "open":
        body = b"[" * depth
    elif what == "balanced":
        body = b"[" * depth + b"]" * depth
    else:
        body = b'{"inputs":' + b'{"a":' * (depth // 5) + b"1" + b"}" * (depth // 5 + 1)
    return Hostile(f"deep JSON {what}", "POST", INFER, body)


@st.composite
def bad_bytes(draw: st.DrawFn) -> Hostile:
    what = draw(st.sampled_from(["random", "not UTF-8", "gzip garbage", "unknown encoding"]))
    if what == "random":
        return Hostile(what, "POST", INFER, draw(st.binary(max_size=300).filter(
            lambda b: not b.strip().startswith(b"{"))))
    if what == "not UTF-8":
        return Hostile(what, "POST", INFER, b'{"inputs": "\xff\xfe"}')
    if what == "gzip garbage":
        return Hostile(what, "POST", INFER, draw(st.binary(max_size=200)),
                       {"Content-Encoding": draw(st.sampled_from(["gzip", "deflate"]))})
    encoding = draw(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True).filter(
        lambda e: e not in ("identity", "gzip", "deflate")))
    return _post(what, _valid_doc(draw), {"Content-Encoding": encoding})


def _is_a_deadline(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return 0 < value < math.inf


@st.composite
def bad_timeout_header(draw: st.DrawFn) -> Hostile:
    value = draw(st.one_of(
        st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e999", "0.0", "", "soon", "5s"]),
        st.from_regex(r"[ -~]{1,20}", fullmatch=True).filter(lambda s: s.strip() == s),
    ).filter(lambda s: not _is_a_deadline(s)))
    return _post("timeout header", _valid_doc(draw), {"trtserve-timeout": value})


@st.composite
def over_the_limit(draw: st.DrawFn) -> Hostile:
    what = draw(st.sampled_from(["sized", "chunked", "gzip bomb"]))
    if what == "gzip bomb":  # small on the wire, over the limit once inflated
        body = gzip.compress(b" " * (MAX_BODY + draw(st.integers(1, 4 * MAX_BODY))))
        return Hostile(what, "POST", INFER, body, {"Content-Encoding": "gzip"}, 413)
    body = b" " * (MAX_BODY + draw(st.integers(1, 20000)))
    return Hostile(f"{what} over the limit", "POST", INFER, body, status=413,
                   chunked=what == "chunked")


@st.composite
def wrong_target(draw: st.DrawFn) -> Hostile:
    """A valid request, sent to a model or version that does not exist."""
    model = draw(segment.filter(lambda s: s != "tiny"))
    version = draw(segment.filter(lambda s: s != "1"))
    body = json.dumps(_valid_doc(draw)).encode()
    method, path = draw(st.sampled_from([
        ("POST", f"/v2/models/{quote(model, safe='')}/infer"),
        ("POST", f"/v2/models/tiny/versions/{quote(version, safe='')}/infer"),
        ("POST", f"/v2/models/{quote(model, safe='')}/versions/1/infer"),
        ("POST", f"{INFER}?version={quote(version, safe='')}"),
        ("GET", f"/v2/models/{quote(model, safe='')}"),
        ("GET", f"/v2/models/{quote(model, safe='')}/ready"),
        ("GET", f"/v2/models/tiny/versions/{quote(version, safe='')}"),
        ("GET", f"/v2/models/tiny/versions/{quote(version, safe='')}/ready"),
        ("GET", f"/v2/models/tiny?version={quote(version, safe='')}"),
    ]))
    return Hostile("unknown model or version", method, path,
                   body if method == "POST" else None, status=404)


@st.composite
def wrong_method(draw: st.DrawFn) -> Hostile:
    model = draw(st.just("tiny") | segment)
    paths = {"/v2": "GET", "/v2/health/live": "GET", "/v2/health/ready": "GET",
             f"/v2/models/{quote(model, safe='')}": "GET",
             f"/v2/models/{quote(model, safe='')}/ready": "GET",
             "/v2/models/tiny/versions/1": "GET", INFER: "POST",
             "/v2/models/tiny/versions/1/infer": "POST"}
    path = draw(st.sampled_from(sorted(paths)))
    method = draw(st.sampled_from([m for m in METHODS if m != paths[path]]))
    body = None if method in ("GET", "HEAD") else json.dumps(_valid_doc(draw)).encode()
    return Hostile("wrong method", method, path, body, status=405)


@st.composite
def unknown_path(draw: st.DrawFn) -> Hostile:
    prefix = draw(st.sampled_from([[], ["v2"], ["v2", "models"], ["v2", "models", "tiny"],
                                   ["v2", "health"], ["v1"], ["v2", "models", "tiny", "versions",
                                                               "1"]]))
    segments = prefix + draw(st.lists(segment, min_size=1, max_size=4))
    trailing = draw(st.sampled_from(["", "/"]))
    path = "/" + "/".join(quote(s, safe="") for s in segments) + trailing
    decoded = unquote(path)
    # /-/routes and /-/healthz are Serve's own (they answer 200 to any method).
    if _on_a_route(decoded) or decoded.startswith("/-/"):
        path = "/nope" + path
    return Hostile("unknown path", draw(st.sampled_from(["GET", "POST"])), path, status=404)


@st.composite
def unknown_method(draw: st.DrawFn) -> Hostile:
    """Tokens that are not HTTP methods: Serve's HTTP parser answers 400 itself."""
    token = draw(st.from_regex(r"[A-Za-z]{1,10}", fullmatch=True).filter(
        lambda t: t.upper() not in {*METHODS, "CONNECT", "COPY", "LOCK", "MKCOL", "MOVE",
                                    "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND",
                                    "UNBIND", "ACL", "REPORT", "CHECKOUT", "MERGE", "NOTIFY",
                                    "SUBSCRIBE", "UNSUBSCRIBE", "MKCALENDAR", "LINK",
                                    "UNLINK", "SOURCE", "PRI", "DESCRIBE", "ANNOUNCE",
                                    "SETUP", "PLAY", "PAUSE", "TEARDOWN", "REDIRECT",
                                    "RECORD", "FLUSH", "MKACTIVITY"}))
    return Hostile("unknown method", token, draw(st.sampled_from(["/v2", INFER])), status=400)


hostile = st.one_of(bad_tensor(), bad_structure(), lying_binary(), deep_json(), bad_bytes(),
                    bad_timeout_header(), over_the_limit(), wrong_target(), wrong_method(),
                    unknown_path(), unknown_method())


def _send(session: requests.Session, url: str, h: Hostile) -> requests.Response:
    body: Any = h.body
    if h.chunked and h.body is not None:  # no Content-Length to refuse it by
        body = iter([h.body[i : i + 8192] for i in range(0, len(h.body), 8192)])
    return session.request(h.method, url + h.path, data=body, headers=h.headers, timeout=60)


def _check(reply: requests.Response, h: Hostile) -> str:
    """Assert the answer; return the key it is counted under."""
    assert reply.status_code == h.status, (h.kind, h.method, h.path, reply.text[:500])
    if h.kind == "unknown method":
        # Serve's HTTP layer (uvicorn's HTTP parser) refuses the request line before any of our
        # code runs, in plain text.
        assert reply.headers["content-type"].startswith("text/plain")
        return f"{reply.status_code} (Serve, plain text)"
    assert reply.headers["content-type"] == "application/json", h.kind
    if h.method == "HEAD":  # HTTP sends no body in answer to HEAD
        return f"{reply.status_code} (HEAD, no body)"
    error = reply.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]
    return str(reply.status_code)


OVER_LIMIT = Hostile("over the limit", "POST", INFER, b"{" + b" " * MAX_BODY + b"}", status=413)


def test_a_barrage_of_hostile_requests_leaves_the_app_unharmed(
    url: str, session: requests.Session
) -> None:
    replicas, actors, seen = replica_ids(), _serve_actors(), requests_seen()
    statuses: Counter[str] = Counter()

    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile)
    @example(OVER_LIMIT)
    def one(h: Hostile) -> None:
        statuses[_check(_send(session, url, h), h)] += 1

    one()
    print(f"\nhostile requests: {sum(statuses.values())}; answers: {dict(statuses)}")
    assert sum(statuses.values()) >= 1000
    assert requests_seen() == seen, "a hostile request reached a replica"
    assert replica_ids() == replicas
    assert _serve_actors() == actors
    # The same replicas still answer correctly, each of them and through HTTP.
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    expected = models.tiny_reference(x)["probs"]
    for replica in replicas:
        outputs, trail = engine().infer.remote("tiny", {"x": x}, target=replica).result(
            timeout_s=60)
        assert trail[-1]["replica"] == replica
        np.testing.assert_allclose(outputs["probs"], expected, rtol=1e-5, atol=1e-6)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16],
                       "data": x.ravel().tolist()}]}
    for _ in range(10):
        reply = session.post(url + INFER, json=doc, timeout=60)
        assert reply.status_code == 200, reply.text
        assert {a["replica"] for a in json.loads(reply.headers["trtserve-attempts"])} <= replicas
        got = np.array(reply.json()["outputs"][1]["data"], np.float32).reshape(2, 8)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@st.composite
def non_finite(draw: st.DrawFn) -> tuple[np.ndarray, bool]:
    batch = draw(st.integers(1, MAX_BATCH))
    x = np.array(draw(st.lists(floats, min_size=16 * batch, max_size=16 * batch)),
                 np.float32).reshape(batch, 16)
    spots = draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, 15)),
                          min_size=1, max_size=8))
    for row, col in spots:
        x[row, col] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x, draw(st.booleans())


def _decode(reply: requests.Response) -> dict[str, np.ndarray]:
    end = int(reply.headers.get(HEADER_LENGTH, len(reply.content)))
    doc = json.loads(reply.content[:end])
    out: dict[str, np.ndarray] = {}
    offset = end
    for o in doc["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], np.float32).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(reply.content[offset : offset + size],
                                           "<f4").reshape(o["shape"])
            offset += size
    return out


def test_nan_and_inf_are_data_and_are_computed_on(url: str, session: requests.Session) -> None:
    @settings(max_examples=NAN_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(non_finite())
    def one(case: tuple[np.ndarray, bool]) -> None:
        x, binary = case
        tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
        if binary:
            tensor["parameters"] = {"binary_data_size": x.nbytes}
            header = json.dumps({"inputs": [tensor],
                                 "parameters": {"binary_data_output": True}}).encode()
            reply = session.post(url + INFER, data=header + x.tobytes(),
                                 headers={HEADER_LENGTH: str(len(header))}, timeout=60)
        else:
            # Python's json writes NaN and Infinity tokens, as Python clients send them.
            body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
            reply = session.post(url + INFER, data=body, timeout=60)
        assert reply.status_code == 200, reply.text
        got = _decode(reply)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN in, NaN out: expected
            reference = models.tiny_reference(x)
        # float32 sums of terms as large as the input carry an absolute error that scales
        # with them: a logit near 0 computed from inputs near 1000 is off by ~1e-4.
        finite = np.abs(x[np.isfinite(x)])
        scale = 1.0 + (float(finite.max()) if finite.size else 0.0)
        for name in ("logits", "probs"):
            np.testing.assert_allclose(got[name], reference[name], rtol=1e-4, atol=1e-6 * scale,
                                       equal_nan=True)

    one()
