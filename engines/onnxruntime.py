"""ONNX Runtime backend: the engine is an InferenceSession, a context its own RunOptions on
that session.

A session is expensive (graph optimization, weights on the device) and safe to run from
several threads at once; a context is cheap and belongs to one request at a time, which
is the same split as a TensorRT engine and its execution contexts. The CUDA provider is used
when onnxruntime-gpu is installed and a GPU is visible; otherwise the CPU provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .backend import LoadOptions
from .cuda import error_from_text, visible_device_count
from .errors import ContextFailure, EngineLoadFailure, InvalidInput, TrtServeError
from .models import ModelSource
from .spec import DYNAMIC, IOSpec, TensorSpec

_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}


def _tensor_spec(arg: Any, model: str) -> TensorSpec:
    if arg.type not in _DTYPES:
        raise EngineLoadFailure(
            f"model '{model}': tensor '{arg.name}' has type {arg.type}, which trtserve "
            f"does not serve"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else DYNAMIC for d in arg.shape)
    return TensorSpec(arg.name, _DTYPES[arg.type], shape)


def spec_of(session: ort.InferenceSession, model: str, max_batch: int | None) -> IOSpec:
    """The IOSpec of a session. Old-IR files list initializers as graph inputs; ONNX Runtime
    already leaves those out of get_inputs(), and this drops any that remain overridable."""
    overridable = {i.name for i in session.get_overridable_initializers()}
    inputs = [_tensor_spec(a, model) for a in session.get_inputs() if a.name not in overridable]
    outputs = [_tensor_spec(a, model) for a in session.get_outputs()]
    return IOSpec(tuple(inputs), tuple(outputs), max_batch)


def map_error(exc: Exception, what: str) -> TrtServeError:
    """ONNX Runtime's exceptions onto the taxonomy."""
    if isinstance(exc, TrtServeError):
        return exc
    text = str(exc)
    if isinstance(exc, ort_state.InvalidArgument):
        return InvalidInput(f"{what}: {text}")
    cuda = error_from_text(text, what)
    if cuda is not None:
        return cuda
    return ContextFailure(f"{what}: {type(exc).__name__}: {text}")


def session_options(options: LoadOptions, use_cuda: bool) -> ort.SessionOptions:
    """Thread pools sized for a server: one replica process holds a session per model, next
    to Serve's own processes, so idle threads do not spin and the CUDA provider (which only
    schedules on the CPU) gets one thread unless told otherwise."""
    so = ort.SessionOptions()
    threads = options.threads if options.threads is not None else (1 if use_cuda else 0)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


class OnnxRuntimeContext:
    """One RunOptions (its own ``terminate`` flag) on the engine's sessions: one request at a
    time.

    ``InferenceSession.run`` copies the inputs to the device and the outputs back inside the
    part of the call that releases the GIL. An IOBinding's ``bind_cpu_input`` made the same
    copy holding it, which stalled every other thread of a loaded replica for as long as the
    copy took (docs/benchmarks.md)."""

    def __init__(self, engine: OnnxRuntimeEngine, generation: int) -> None:
        self.engine = engine
        self.generation = generation
        self.closed = False
        self._run_options: Any = ort.RunOptions()
        self._run_options.logid = f"{engine.name}-ctx{generation}"

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise ContextFailure(f"{self.engine.name}: context {self.generation} is closed")
        what = f"{self.engine.name} (context {self.generation})"
        rows = _rows(inputs)
        bucket = self.engine.bucket_for(rows)
        try:
            feeds = {name: _padded(np.ascontiguousarray(value), bucket)
                     for name, value in inputs.items()}
            values = self.engine.sessions[bucket].run(self.engine.spec.output_names, feeds,
                                                      self._run_options)
        except Exception as exc:  # every ORT failure becomes a taxonomy error
            raise map_error(exc, what) from exc
        if bucket != ANY_ROWS and bucket != rows:
            values = [v[:rows] for v in values]
        return dict(zip(self.engine.spec.output_names, values, strict=True))

    def cancel(self) -> None:
        """Ask a run in progress to stop (ONNX Runtime checks the flag between nodes)."""
        self._run_options.terminate = True

    def close(self) -> None:
        self.closed = True


ANY_ROWS = 0  # the session that takes any batch size


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else ANY_ROWS


def _padded(value: np.ndarray, bucket: int) -> np.ndarray:
    """``value`` with zero rows appended up to ``bucket`` rows (they are computed, then
    dropped)."""
    if bucket == ANY_ROWS or value.shape[0] == bucket:
        return value
    out = np.zeros((bucket, *value.shape[1:]), value.dtype)
    out[: value.shape[0]] = value
    return out


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, source: ModelSource, options: LoadOptions) -> None:
        self.name = source.name
        self.source = source
        use_cuda = (
            "CUDAExecutionProvider" in ort.get_available_providers()
            and visible_device_count() > 0
        )
        providers: list[Any] = (
            [("CUDAExecutionProvider", {"device_id": options.device}), "CPUExecutionProvider"]
            if use_cuda
            else ["CPUExecutionProvider"]
        )
        try:
            self.session = ort.InferenceSession(
                str(source.path), session_options(options, use_cuda), providers=providers
            )
            self.spec = spec_of(self.session, source.name, options.max_batch)
            # One session per batch bucket, each only ever seeing one shape (LoadOptions says
            # why); only where every input has a batch dimension to pad.
            buckets = sorted(set(options.batch_buckets))
            if not all(t.batched for t in self.spec.inputs):
                buckets = []
            self.sessions = {ANY_ROWS: self.session} | {
                rows: ort.InferenceSession(
                    str(source.path), session_options(options, use_cuda), providers=providers
                )
                for rows in buckets
            }
        except EngineLoadFailure:
            raise
        except Exception as exc:
            raise EngineLoadFailure(
                f"ONNX Runtime cannot load model '{source.name}' from {source.path}: {exc}"
            ) from exc
        on_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.ort_device = "cuda" if on_cuda else "cpu"
        self.device_id = options.device if on_cuda else 0
        self.device = f"cuda:{options.device}" if on_cuda else "cpu"

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds ``rows``, else the session for any size."""
        if rows == ANY_ROWS:
            return ANY_ROWS
        return next((b for b in self.sessions if b >= rows and b != ANY_ROWS), ANY_ROWS)

    def create_context(self, generation: int) -> OnnxRuntimeContext:
        return OnnxRuntimeContext(self, generation)

    def close(self) -> None:
        # A session frees its memory when the last reference goes; contexts hold one.
        self.session = None  # type: ignore[assignment]
        self.sessions = {}


def load(source: ModelSource, options: LoadOptions) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(source, options)
