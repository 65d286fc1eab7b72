"""What TensorRT reports when a context fails, and what that means for the taxonomy.

``execute_async_v3`` answers a bare False. Each context gets an IErrorRecorder, so the adapter
can read TensorRT's error codes for the failed call, and the context's stream is queried,
because a CUDA error inside the enqueue shows up there and nowhere else. Then:

- ``ErrorCodeTRT.INTERNAL_ERROR``: "A non-recoverable TensorRT error occurred. TensorRT is in
  an invalid internal state when this error is emitted and any further calls to TensorRT will
  result in undefined behavior" (NvInferRuntimeBase.h, ErrorCode::kINTERNAL_ERROR, TensorRT
  10.x/11.x and TensorRT-RTX alike): DeviceFailure, the process must go.
- a CUDA error, on the stream or quoted by TensorRT ("cudaError 700: ..."): its class from
  cuda.error_for (sticky or process-level: DeviceFailure; deterministic: ExecutionError; out
  of memory: OutOfMemory).
- ``ErrorCodeTRT.FAILED_ALLOCATION``: OutOfMemory.
- anything else (FAILED_EXECUTION, INVALID_ARGUMENT...): ContextFailure, a fresh context.

The most severe of these wins. With a recorder attached TensorRT reports errors to it instead
of the logger, so its descriptions are what the error message quotes.

Python subclasses override the binding's trampoline names (``get_num_errors``, not the
``num_errors`` that Python callers use: NVIDIA/TensorRT python/src/infer/pyCore.cpp,
PyErrorRecorder); tests/test_tensorrt_api.py drives this class through a real tensorrt_rtx
object to prove TensorRT reaches it.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from . import cuda
from .errors import ContextFailure, DeviceFailure, ExecutionError, OutOfMemory, TrtServeError
from .trt_module import TrtErrorCode

# More severe first: the first class found among the signs is the answer.
_SEVERITY: tuple[type[TrtServeError], ...] = (
    DeviceFailure, ExecutionError, OutOfMemory, ContextFailure,
)
# TensorRT's own codes whose meaning is not "this context failed".
_CODE_CLASSES: dict[str, type[TrtServeError]] = {
    "INTERNAL_ERROR": DeviceFailure,
    "FAILED_ALLOCATION": OutOfMemory,
}
# A recorder keeps at most this many errors (TensorRT asks it whether it overflowed).
_MAX_ERRORS = 64

_CLASSES: dict[str, type] = {}
_CLASSES_LOCK = threading.Lock()


def new_recorder(trt: ModuleType) -> Any:
    """A fresh error recorder for one context of module ``trt``."""
    with _CLASSES_LOCK:
        cls = _CLASSES.get(trt.__name__)
        if cls is None:
            cls = _CLASSES[trt.__name__] = _recorder_class(trt)
    return cls()


def _recorder_class(trt: ModuleType) -> type:
    class Recorder(trt.IErrorRecorder):  # type: ignore[misc, name-defined]
        """Keeps (code name, description) pairs; TensorRT may report from its own threads."""

        def __init__(self) -> None:
            trt.IErrorRecorder.__init__(self)
            self._lock = threading.Lock()
            self._errors: list[tuple[TrtErrorCode, str]] = []
            self._overflowed = False

        def report_error(self, code: TrtErrorCode, desc: str) -> bool:
            with self._lock:
                if len(self._errors) < _MAX_ERRORS:
                    self._errors.append((code, desc))
                else:
                    self._overflowed = True
            return False  # a hint only; TensorRT decides whether to go on

        def get_num_errors(self) -> int:
            with self._lock:
                return len(self._errors)

        def get_error_code(self, index: int) -> TrtErrorCode:
            with self._lock:
                return self._errors[index][0]

        def get_error_desc(self, index: int) -> str:
            with self._lock:
                return self._errors[index][1]

        def has_overflowed(self) -> bool:
            with self._lock:
                return self._overflowed

        def clear(self) -> None:
            with self._lock:
                self._errors.clear()
                self._overflowed = False

        def entries(self) -> list[tuple[str, str]]:
            """(code name, description) of every error since the last clear()."""
            with self._lock:
                return [(getattr(code, "name", str(code)), desc) for code, desc in self._errors]

    return Recorder


def reported(entries: list[tuple[str, str]]) -> str:
    """What TensorRT reported, for an error message."""
    if not entries:
        return "TensorRT reported no error"
    return " | ".join(dict.fromkeys(f"{code}: {desc.strip()}" for code, desc in entries))


def enqueue_failure(entries: list[tuple[str, str]], stream_code: int,
                    what: str) -> TrtServeError:
    """The taxonomy error for an enqueue that returned False, from what the recorder holds
    and what the stream reports (cudaStreamQuery's code)."""
    classes: list[type[TrtServeError]] = []
    stream_said = ""
    if stream_code not in (0, cuda.NOT_READY):
        classes.append(cuda.error_class(stream_code))
        stream_said = f"; {cuda.error_for(stream_code, 'cudaStreamQuery').message}"
    for code, desc in entries:
        classes.append(_CODE_CLASSES.get(code, ContextFailure))
        quoted = cuda.code_in_text(desc)
        if quoted is not None:
            classes.append(cuda.error_class(quoted))
    cls = next((c for c in _SEVERITY if c in classes), ContextFailure)
    return cls(f"{what}: execute_async_v3 rejected the enqueue: {reported(entries)}"
               f"{stream_said}")
