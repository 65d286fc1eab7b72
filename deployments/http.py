"""The HTTP face of the Router: the FastAPI app, its error answers, and reading a body.

Every answer is the Open Inference Protocol's ``{"error": ...}`` shape, FastAPI's own 404,
405 and validation failures included, so tritonclient can read them.

Where the codec (``protocol``) runs depends on how long it holds the GIL. A JSON body over
``JSON_IN_PROCESS_BYTES`` is decoded in a separate process: measured here, a 64 MiB JSON
body of small numbers took 3.5 s to decode, 1.1 s of it in ``json.loads``, during which a
thread would stall the loop just the same. Work that ends well within the interpreter's
switch interval (5 ms) runs on the event loop itself: a worker thread would hold the GIL for
all of it too, so the hop (about 0.15 ms each way, measured here) bought the loop nothing.
That is a request with at most ``INLINE_JSON_BYTES`` of JSON and ``INLINE_BYTES`` in all,
uncompressed (a 600 KB binary image decodes in 0.09 ms), and an answer in binary or with at
most ``INLINE_JSON_VALUES`` numbers in JSON (1,000 take 1.2 ms). The rest goes to a worker
thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from engines.errors import InvalidInput, Overloaded, PayloadTooLarge, TrtServeError
from engines.spec import IOSpec

from . import protocol

DEFAULT_MAX_JSON_BYTES = 16 * 1024 * 1024
JSON_IN_PROCESS_BYTES = 1024 * 1024
INLINE_JSON_BYTES = 64 * 1024
INLINE_BYTES = 8 * 1024 * 1024
INLINE_JSON_VALUES = 4096


def decode(
    body: bytes, headers: Mapping[str, str], spec: IOSpec, max_bytes: int, max_json_bytes: int
) -> protocol.InferRequest:
    """Undo the Content-Encoding, decode, and validate against ``spec``: the one check of an
    HTTP request. ``headers``: names in lower case."""
    header_length = protocol.parse_header_length(headers.get(protocol.HEADER_LENGTH.lower()))
    inflated = protocol.decode_content_encoding(
        body, headers.get("content-encoding"),
        max_bytes if header_length is not None else max_json_bytes,
    )
    return protocol.decode_infer_request(inflated, header_length, spec, max_bytes)


def decodes_inline(body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether decoding ``body`` is short enough for the event loop (names in lower case)."""
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return False
    try:
        header_length = protocol.parse_header_length(headers.get(protocol.HEADER_LENGTH.lower()))
    except InvalidInput:
        return True  # refused before any work
    json_bytes = len(body) if header_length is None else header_length
    return json_bytes <= INLINE_JSON_BYTES and len(body) <= INLINE_BYTES


def encodes_inline(outputs: Mapping[str, np.ndarray], binary_data_output: bool) -> bool:
    """Whether encoding ``outputs`` is short enough for the event loop."""
    if sum(a.nbytes for a in outputs.values()) > INLINE_BYTES:
        return False
    return binary_data_output or sum(a.size for a in outputs.values()) <= INLINE_JSON_VALUES


class Codec:
    """Runs ``decode`` and ``protocol.encode_infer_response`` where they cost the event loop
    least (the module's docstring says where)."""

    def __init__(self) -> None:
        self._processes: ProcessPoolExecutor | None = None

    async def decode(
        self, body: bytes, headers: Mapping[str, str], spec: IOSpec, max_bytes: int,
        max_json_bytes: int,
    ) -> protocol.InferRequest:
        # A plain dict crosses to the decoding process; HTTP header names are case-blind.
        plain = {name.lower(): value for name, value in headers.items()}
        if len(body) > JSON_IN_PROCESS_BYTES and protocol.HEADER_LENGTH.lower() not in plain:
            if self._processes is None:
                # spawn: a process forked from a Ray worker inherits its threads' locks.
                self._processes = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn")
                )
            return await asyncio.get_running_loop().run_in_executor(
                self._processes, decode, body, plain, spec, max_bytes, max_json_bytes
            )
        if decodes_inline(body, plain):
            return decode(body, plain, spec, max_bytes, max_json_bytes)
        return await asyncio.to_thread(decode, body, plain, spec, max_bytes, max_json_bytes)

    async def encode(
        self, model_name: str, model_version: str | None, request_id: str | None,
        outputs: Mapping[str, np.ndarray], *, requested: Sequence[protocol.RequestedOutput],
        binary_data_output: bool,
    ) -> tuple[bytes, dict[str, str]]:
        encode = functools.partial(
            protocol.encode_infer_response, model_name, model_version, request_id, outputs,
            requested=requested, binary_data_output=binary_data_output,
        )
        if encodes_inline(outputs, binary_data_output):
            return encode()
        return await asyncio.to_thread(encode)

    def close(self) -> None:
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)


def error_response(err: TrtServeError, retry_after_s: float = 1.0) -> JSONResponse:
    headers = {protocol.TRAIL_HEADER: json.dumps(err.trail)}
    if isinstance(err, Overloaded):
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return JSONResponse(protocol.error_body(err.message), err.http_status, headers=headers)


def timeout_s(header: str | None, from_body: float | None) -> float | None:
    """The request's deadline in seconds: the trtserve-timeout header, else the protocol's
    ``timeout`` parameter (microseconds on the wire, already seconds here)."""
    if header is None:
        return from_body
    try:
        value = float(header)
    except ValueError:
        raise InvalidInput(f"{protocol.TIMEOUT_HEADER} must be seconds, got {header!r}") from None
    if not value > 0 or value == float("inf"):
        raise InvalidInput(f"{protocol.TIMEOUT_HEADER} must be > 0 seconds, got {header!r}")
    return value


async def read_body(request: Request, max_bytes: int, max_json_bytes: int) -> bytes:
    """The body, decompressed, within its limits: ``max_bytes`` for any body, and
    ``max_json_bytes`` for its JSON (all of it, unless the binary extension's
    Inference-Header-Content-Length says where the JSON ends). JSON costs about ten times
    its size in memory once parsed, so it gets the smaller limit."""
    header_length = protocol.parse_header_length(request.headers.get(protocol.HEADER_LENGTH))
    if header_length is not None and header_length > max_json_bytes:
        raise PayloadTooLarge(
            f"the request's JSON header is {header_length} bytes, over the JSON limit of "
            f"{max_json_bytes}; send tensors as binary data"
        )
    limit = max_bytes if header_length is not None else min(max_bytes, max_json_bytes)
    what = "request body" if header_length is not None else "JSON request body"
    declared = protocol.parse_header_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"the {what} is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the {what} is over the limit of {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


fastapi_app = FastAPI(
    title="trtserve",
    description="Open Inference Protocol v2 (KServe / Triton HTTP) over fault-tolerant Serve",
    # A path the protocol does not define is a 404 in the protocol's shape, not a bodiless
    # 307 to a neighbouring path that a client may or may not follow.
    redirect_slashes=False,
)


@fastapi_app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = (f"no route {request.method} {request.url.path}; the Open Inference "
                   f"Protocol is served under /v2")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = (f"method {request.method} is not allowed on {request.url.path} "
                   f"(allowed: {allowed})")
    else:
        message = str(exc.detail)
    return JSONResponse(protocol.error_body(message), exc.status_code, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # The protocol calls a malformed request 400; FastAPI's 422 would confuse clients.
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return JSONResponse(protocol.error_body(f"malformed request: {problems}"), 400)
