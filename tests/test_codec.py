"""Where the Router's HTTP codec runs: short work on the event loop, long work off it (plain
asyncio, the real protocol code; the wrappers below only note the thread)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deployments import protocol
from deployments.http import INLINE_JSON_BYTES, INLINE_JSON_VALUES, Codec
from engines.spec import IOSpec, TensorSpec

SPEC = IOSpec(inputs=(TensorSpec("x", np.dtype("float32"), (-1, 4)),),
              outputs=(TensorSpec("y", np.dtype("float32"), (-1, 4)),))


def _binary_body(rows: int) -> tuple[bytes, dict[str, str]]:
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    header = json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    return header + data.tobytes(), {protocol.HEADER_LENGTH: str(len(header))}


def _json_body(rows: int) -> bytes:
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                   "data": data.ravel().tolist()}]}).encode()


def _threads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    seen: list[int] = []
    real: Callable[..., Any] = getattr(protocol, name)

    def noting(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, name, noting)
    return seen


def _decode_on_loop(body: bytes, headers: dict[str, str],
                    monkeypatch: pytest.MonkeyPatch) -> bool:
    seen = _threads(monkeypatch, "decode_infer_request")

    async def run() -> tuple[int, protocol.InferRequest]:
        decoded = await Codec().decode(body, headers, SPEC, 1 << 30, 1 << 30)
        return threading.get_ident(), decoded

    loop_thread, decoded = asyncio.run(run())
    assert decoded.inputs["x"].shape[1] == 4  # decoded for real, wherever it ran
    return seen == [loop_thread]


def test_a_small_binary_body_is_decoded_on_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    body, headers = _binary_body(1000)
    assert _decode_on_loop(body, headers, monkeypatch)


def test_a_compressed_body_is_decoded_on_a_worker_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    body, headers = _binary_body(10)
    assert not _decode_on_loop(gzip.compress(body), {**headers, "Content-Encoding": "gzip"},
                               monkeypatch)


def test_a_large_json_body_is_decoded_on_a_worker_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = _json_body(100), _json_body(20_000)
    assert len(small) <= INLINE_JSON_BYTES < len(large)
    assert _decode_on_loop(small, {}, monkeypatch)
    monkeypatch.undo()
    assert not _decode_on_loop(large, {}, monkeypatch)


@pytest.mark.parametrize(("values", "binary", "on_loop"), [
    (INLINE_JSON_VALUES, False, True),
    (INLINE_JSON_VALUES + 4, False, False),
    (100_000, True, True),
])
def test_answers_are_encoded_on_the_loop_when_short(
        values: int, binary: bool, on_loop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _threads(monkeypatch, "encode_infer_response")
    outputs = {"y": np.ones((values // 4, 4), np.float32)}

    async def run() -> tuple[int, bytes]:
        body, _ = await Codec().encode("m", "1", None, outputs, requested=(),
                                       binary_data_output=binary)
        return threading.get_ident(), body

    loop_thread, body = asyncio.run(run())
    assert len(body) >= (outputs["y"].nbytes if binary else values)
    assert (seen == [loop_thread]) is on_loop
