"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) <-> numpy, with Triton's binary tensor
data extension. Pure Python + numpy: the Router's FastAPI routes call these functions, so the
codec can be tested (and fuzzed) without Ray or a server.

What the wire looks like, as tritonclient.http (2.73) sends and parses it and as Triton's
http_server.cc answers it:

- A request body is a UTF-8 JSON object, optionally followed by raw tensor bytes. When any
  input is binary the ``Inference-Header-Content-Length`` header gives the JSON's byte length;
  each binary input carries ``parameters.binary_data_size`` and takes that many bytes, in the
  order of ``inputs``. Binary tensors are little-endian, row-major, unpadded; BOOL is one byte
  (0/1); BYTES elements are a 4-byte little-endian length followed by the bytes.
- ``parameters.timeout`` is in microseconds (0: none), ``parameters.binary_data_output`` makes
  every output binary, and ``outputs[i].parameters.binary_data`` overrides it per output.
  tritonclient sends ``binary_data_output: true`` whenever it names no outputs.
- A response is the same shape: JSON, or JSON + binary with the header set. tritonclient finds
  each binary output by its ``binary_data_size``, in the order of ``outputs``.
- Errors are ``{"error": message}`` with a non-200 status; tritonclient reads nothing else.

Unknown fields are ignored at every level, as Triton and KServe do: Triton's own example request
carries a top-level ``model_name`` that the request schema does not define, so rejecting
unknown fields would refuse real clients. Features that would change what the answer means if
silently ignored (shared memory, classification) are refused instead.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import numpy as np

from engines.errors import InvalidInput, PayloadTooLarge
from engines.spec import IOSpec, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
# trtserve's own headers: the attempt trail of an infer response (JSON), and a request's
# deadline in seconds.
TRAIL_HEADER = "trtserve-attempts"
TIMEOUT_HEADER = "trtserve-timeout"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Data nested deeper than any tensor's rank is hostile, not a tensor; 64 is numpy's own limit.
MAX_DATA_DEPTH = 64
# TensorRT allows 8 dims; 32 keeps us inside numpy's limit on every supported numpy version.
MAX_RANK = 32
EXTENSIONS: tuple[str, ...] = ("binary_tensor_data",)

_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DATATYPES.items()}


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype name (BYTES: object arrays of ``bytes``)."""
    dtype = _DATATYPES.get(datatype)
    if dtype is None:
        if datatype == "BF16":
            raise InvalidInput("datatype BF16 is not supported: numpy has no bfloat16")
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {', '.join(_DATATYPES)}"
        )
    return dtype


def to_datatype(dtype: np.dtype | type) -> str:
    """The protocol datatype name of a numpy dtype.

    Raises TypeError: a dtype the protocol cannot carry is a server-side bug, not bad input.
    """
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    name = _NAMES.get(dt.newbyteorder("="))
    if name is None:
        raise TypeError(f"numpy dtype {dt} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``binary_data`` None follows ``binary_data_output``."""

    name: str
    binary_data: bool | None = None


# eq=False: numpy arrays have no truth value, so a generated __eq__ would raise.
@dataclass(frozen=True, eq=False)
class InferRequest:
    """A decoded inference request.

    Inputs sent as binary data may be read-only views of the request body: copy to write.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]
    binary_data_output: bool
    timeout_s: float | None
    parameters: dict[str, Any]


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (None when absent)."""
    if value is None:
        return None
    text = value.strip()
    # Bounded length: int() of thousands of digits is slow and raises ValueError past 4300.
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(text)


def decode_content_encoding(
    body: bytes, encoding: str | None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """Undo ``Content-Encoding`` (tritonclient's ``request_compression_algorithm``).

    Inflation stops at ``max_bytes``, so a small compressed body cannot expand without bound.
    ``Inference-Header-Content-Length`` counts the decompressed body.
    """
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    # tritonclient's "deflate" is zlib.compress (RFC 1950 framing), as HTTP means it.
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(name)
    if wbits is None:
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {name} request body is corrupt: {exc}") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"the request body inflates past the limit of {max_bytes} bytes")
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"the {name} request body is truncated or has trailing bytes")
    return out


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    spec: IOSpec | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> InferRequest:
    """Decode an inference request body; with ``spec``, also check it against the model.

    Raises PayloadTooLarge for a body over ``max_bytes`` and InvalidInput for anything else
    wrong with it; no other exception escapes for any body.
    """
    if len(body) > max_bytes:
        raise PayloadTooLarge(
            f"the request body is {len(body)} bytes, over the limit of {max_bytes}"
        )
    try:
        request = _decode(body, header_length, max_bytes)
    except (RecursionError, MemoryError) as exc:
        raise InvalidInput(
            f"the request is too deeply nested or too large to decode ({type(exc).__name__})"
        ) from None
    if spec is None:
        return request
    unknown = [o.name for o in request.outputs if o.name not in spec.output_names]
    if unknown:
        raise InvalidInput(
            f"unknown output tensor(s) {unknown}; this model gives "
            + ", ".join(t.describe() for t in spec.outputs)
        )
    # validate() returns the inputs in the model's order, the order the engine binds them in.
    return replace(request, inputs=spec.validate(request.inputs))


def _decode(body: bytes, header_length: int | None, max_bytes: int) -> InferRequest:
    if header_length is None:
        json_end = len(body)
    elif 0 <= header_length <= len(body):
        json_end = header_length
    else:
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    doc = _parse_json(body[:json_end], header_length is not None)
    if not isinstance(doc, dict):
        raise InvalidInput(f"the inference request must be a JSON object, got {_json_type(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _parameters(doc.get("parameters"), "the request")
    binary_data_output = _optional_bool(parameters, "binary_data_output", "the request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput(f"'inputs' must be a JSON array, got {_json_type(raw_inputs)}")

    inputs: dict[str, np.ndarray] = {}
    offset = json_end
    for index, item in enumerate(raw_inputs):
        name, array, used = _decode_input(
            item, index, body, offset, header_length is not None, max_bytes
        )
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears more than once")
        inputs[name] = array
        offset += used
    if offset != len(body):
        raise InvalidInput(
            f"{len(body) - offset} byte(s) after the JSON header belong to no input; the "
            f"inputs' binary_data_size values must add up to the binary part exactly"
        )
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_data_output=bool(binary_data_output),
        timeout_s=_timeout_s(parameters.get("timeout")),
        parameters=parameters,
    )


def _parse_json(header: bytes, has_header: bool) -> Any:
    try:
        # Python's json accepts NaN and +/-Infinity, which Python clients emit for such floats.
        return json.loads(header.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long int literals
        hint = ""
        if not has_header and isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":
            hint = f"; binary data after the JSON needs the {HEADER_LENGTH} header"
        raise InvalidInput(
            f"the request's JSON header is not valid UTF-8 JSON: {exc}{hint}"
        ) from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'parameters' of {where} must be a JSON object")
    shared = sorted(k for k in value if k.startswith("shared_memory_"))
    if shared:
        raise InvalidInput(f"{where} uses {shared}: shared memory is not supported")
    return value


def _optional_bool(parameters: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"parameter '{key}' of {where} must be a boolean")
    return value


def _timeout_s(value: Any) -> float | None:
    if value is None:
        return None
    # Triton reads it as uint64 microseconds; bool is an int in Python but not in JSON.
    if type(value) is not int or not 0 <= value < 2**64:
        raise InvalidInput(
            f"parameter 'timeout' must be an integer number of microseconds, got "
            f"{_json_type(value)}"
        )
    # As in Triton, 0 means the request sets no timeout of its own.
    return value / 1e6 if value else None


def _requested_outputs(value: Any) -> tuple[RequestedOutput, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a JSON array, got {_json_type(value)}")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        where = f"output {name!r}"
        parameters = _parameters(item.get("parameters"), where)
        if parameters.get("classification") is not None:
            raise InvalidInput(f"{where} asks for classification, which is not supported")
        outputs.append(RequestedOutput(name, _optional_bool(parameters, "binary_data", where)))
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"an output is requested more than once: {names}")
    return tuple(outputs)


def _decode_input(
    item: Any, index: int, body: bytes, offset: int, has_header: bool, max_bytes: int
) -> tuple[str, np.ndarray, int]:
    """Return (name, array, bytes of the binary part it used)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput(f"inputs[{index}] must be an object with a string 'name'")
    name = item["name"]
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: 'datatype' must be a string")
    try:
        dtype = to_numpy_dtype(datatype)
    except InvalidInput as exc:
        raise InvalidInput(f"input {name!r}: {exc}") from None
    shape, count = _shape(item.get("shape"), name, len(body), max_bytes)
    parameters = _parameters(item.get("parameters"), f"input {name!r}")
    size = parameters.get("binary_data_size")
    has_data = "data" in item

    if size is None:
        if not has_data:
            raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        flat = _flatten(item["data"], name)
        return name, _from_json(flat, name, datatype, dtype, count).reshape(shape), 0

    if has_data:
        raise InvalidInput(f"input {name!r} has both 'data' and parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise InvalidInput(
            f"input {name!r}: binary_data_size must be a non-negative integer, got "
            f"{_json_type(size)}"
        )
    if not has_header:
        raise InvalidInput(
            f"input {name!r} declares binary_data_size but the request has no "
            f"{HEADER_LENGTH} header to say where its JSON ends"
        )
    if size > len(body) - offset:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} but only {len(body) - offset} "
            f"byte(s) of binary data remain"
        )
    if datatype == "BYTES":
        array = _bytes_from_binary(body, offset, size, name, count)
    else:
        array = _from_binary(body, offset, size, name, datatype, dtype, count, shape)
    return name, array.reshape(shape), size


def _shape(value: Any, name: str, body_len: int, max_bytes: int) -> tuple[tuple[int, ...], int]:
    """The shape and its element count, refused before anything is allocated for it."""
    if not isinstance(value, list):
        raise InvalidInput(f"input {name!r}: 'shape' must be a JSON array of integers")
    if len(value) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: rank {len(value)} is over the limit of {MAX_RANK}")
    nonzero = 1
    for dim in value:
        if type(dim) is not int or dim < 0:
            raise InvalidInput(f"input {name!r}: shape {value!r} must hold non-negative integers")
        nonzero *= max(dim, 1)
        # numpy refuses even an empty array whose other dims multiply past its address space.
        if nonzero > max_bytes:
            raise InvalidInput(f"input {name!r}: shape {value} is absurdly large")
    count = 0 if 0 in value else nonzero
    # Every element takes at least one byte of body, in JSON or binary.
    if count > body_len:
        raise InvalidInput(
            f"input {name!r}: shape {value} has {count} elements, more than a "
            f"{body_len}-byte request can carry"
        )
    return tuple(value), count


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major leaves of flat or nested ``data``; like Triton, only the count must match."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a JSON array")
    if not any(type(x) is list for x in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is list:
                if len(stack) >= MAX_DATA_DEPTH:
                    raise InvalidInput(
                        f"input {name!r}: 'data' is nested deeper than {MAX_DATA_DEPTH} levels"
                    )
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _from_json(
    flat: list[Any], name: str, datatype: str, dtype: np.dtype, count: int
) -> np.ndarray:
    if datatype == "FP16":
        # As Triton and KServe: JSON has no 16-bit float, so FP16 travels only as binary.
        raise InvalidInput(
            f"input {name!r}: FP16 data cannot be sent as JSON; send it as binary data"
        )
    if len(flat) != count:
        raise InvalidInput(
            f"input {name!r}: 'data' has {len(flat)} element(s) but the shape needs {count}"
        )
    # Exact types, not isinstance: a JSON true is a Python bool, which is an int.
    kinds = set(map(type, flat))
    if datatype == "BYTES":
        if kinds - {str}:
            raise InvalidInput(f"input {name!r}: BYTES data in JSON must be strings")
        array = np.empty(count, dtype=object)
        try:
            array[:] = [s.encode("utf-8") for s in flat]
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"input {name!r}: a string is not valid Unicode: {exc}") from None
        return array
    if datatype == "BOOL":
        if kinds - {bool}:
            raise InvalidInput(f"input {name!r}: BOOL data must be true or false")
        return np.array(flat, dtype=dtype)
    if dtype.kind in "iu":
        if kinds - {int}:
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise InvalidInput(
                f"input {name!r}: a value is outside {datatype}'s range [{info.min}, {info.max}]"
            )
        return np.array(flat, dtype=dtype)
    if kinds - {int, float}:
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        raise InvalidInput(f"input {name!r}: an integer is too large for {datatype}") from None
    # A finite double past float32's range becomes inf, as Triton's cast does.
    with np.errstate(over="ignore"):
        return wide.astype(dtype)


def _from_binary(
    body: bytes,
    offset: int,
    size: int,
    name: str,
    datatype: str,
    dtype: np.dtype,
    count: int,
    shape: tuple[int, ...],
) -> np.ndarray:
    need = count * dtype.itemsize
    if size != need:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} but {datatype}{list(shape)} "
            f"needs {need} bytes"
        )
    array = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    # Zero-copy where the bytes allow it; a misaligned offset (the JSON header's length is
    # arbitrary) or a big-endian host gets one aligned, native copy.
    if not (array.flags.aligned and array.dtype.isnative):
        array = array.astype(dtype)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array


def _bytes_from_binary(body: bytes, offset: int, size: int, name: str, count: int) -> np.ndarray:
    if count * 4 > size:
        raise InvalidInput(
            f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes of "
            f"length prefixes, but binary_data_size is {size}"
        )
    array = np.empty(count, dtype=object)
    pos, end = offset, offset + size
    for i in range(count):
        if end - pos < 4:
            raise InvalidInput(
                f"input {name!r}: BYTES data ends inside the length prefix of element {i}"
            )
        (length,) = struct.unpack_from("<I", body, pos)
        pos += 4
        if length > end - pos:
            raise InvalidInput(
                f"input {name!r}: BYTES element {i} claims {length} bytes but only "
                f"{end - pos} remain"
            )
        array[i] = body[pos : pos + length]
        pos += length
    if pos != end:
        raise InvalidInput(
            f"input {name!r}: {end - pos} byte(s) of BYTES data are left over after the "
            f"{count} element(s) its shape holds"
        )
    return array


def encode_infer_request(
    inputs: Mapping[str, np.ndarray], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """A client's request body and headers (``trtserve infer``, the load generator): JSON
    data, or binary tensor data with the header length when ``binary``."""
    described: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for name, array in inputs.items():
        datatype = to_datatype(array.dtype)
        if datatype == "BYTES":
            raise ValueError(f"input '{name}': BYTES tensors are not supported by this client")
        entry: dict[str, object] = {"name": name, "datatype": datatype,
                                    "shape": list(array.shape)}
        # FP16 has no JSON form in the protocol, so it goes binary whatever was asked.
        if binary or datatype == "FP16":
            chunk = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    doc: dict[str, object] = {"inputs": described}
    if binary:
        doc["parameters"] = {"binary_data_output": True}
    header = json.dumps(doc).encode("utf-8")
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {"Content-Type": "application/octet-stream",
                                         HEADER_LENGTH: str(len(header))}


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    *,
    requested: Sequence[RequestedOutput] = (),
    binary_data_output: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Encode outputs as tritonclient.http's InferResult parses them: (body, headers).

    ``requested`` (from the request) picks and orders the outputs; empty means all of them.
    An output that JSON cannot carry exactly goes binary whatever was asked: FP16 (where
    Triton would fail the request after running it) and BYTES that are not UTF-8.
    """
    if requested:
        missing = [r.name for r in requested if r.name not in outputs]
        if missing:
            raise InvalidInput(
                f"requested output(s) {missing} are not produced; the model gives {sorted(outputs)}"
            )
        chosen = [
            (r.name, binary_data_output if r.binary_data is None else r.binary_data)
            for r in requested
        ]
    else:
        chosen = [(name, binary_data_output) for name in outputs]

    described: list[dict[str, Any]] = []
    chunks: list[bytes | np.ndarray] = []
    for name, binary in chosen:
        array = np.asarray(outputs[name])
        datatype = to_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        chunk: bytes | np.ndarray | None = None
        if datatype == "BYTES":
            elements = _bytes_elements(name, array)
            text = None if binary else _utf8_or_none(elements)
            if text is None:
                chunk = b"".join(struct.pack("<I", len(e)) + e for e in elements)
            else:
                entry["data"] = text
        elif binary or datatype == "FP16":
            chunk = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
        else:
            entry["data"] = array.ravel().tolist()
        if chunk is not None:
            entry["parameters"] = {"binary_data_size": memoryview(chunk).nbytes}
            chunks.append(chunk)
        described.append(entry)

    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id:
        response["id"] = request_id
    response["outputs"] = described
    # Non-finite floats come out as NaN/Infinity tokens: what Python's json and tritonclient's
    # rapidjson read back; strict JSON parsers in other languages may not.
    header = json.dumps(response, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _bytes_elements(name: str, array: np.ndarray) -> list[bytes]:
    elements: list[bytes] = []
    for value in array.ravel().tolist():
        if isinstance(value, bytes):
            elements.append(value)
        elif isinstance(value, str):
            elements.append(value.encode("utf-8"))
        else:
            raise TypeError(
                f"BYTES output {name!r} holds a {type(value).__name__}; expected bytes or str"
            )
    return elements


def _utf8_or_none(elements: list[bytes]) -> list[str] | None:
    try:
        return [e.decode("utf-8") for e in elements]
    except UnicodeDecodeError:
        return None


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": to_datatype(tensor.dtype),
        "shape": list(tensor.shape),
    }


def model_metadata(
    name: str, versions: Sequence[str], platform: str, spec: IOSpec
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: dynamic dims are -1, as in the spec and in Triton."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": [_tensor_metadata(t) for t in spec.inputs],
        "outputs": [_tensor_metadata(t) for t in spec.outputs],
    }


def server_metadata() -> dict[str, Any]:
    """``GET /v2``."""
    try:
        version = metadata.version("trtserve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    return {"name": "trtserve", "version": version, "extensions": list(EXTENSIONS)}


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object; tritonclient raises InferenceServerException(message).

    Lone surrogates (a JSON name like "\\ud800" can carry one) are escaped, so a UTF-8 JSON
    encoder such as FastAPI's JSONResponse can always write the body.
    """
    return {"error": message.encode("utf-8", "backslashreplace").decode("utf-8")}
