"""TensorRT and TensorRT-RTX engines and contexts: one adapter for two modules.

The module, the names used and the logger come from trt_module.py; plans from build.py.

Loading: build.build_plan builds the plan (or finds it in the plan cache), then the runtime
itself decides whether this machine can run it: ``Runtime.get_engine_validity`` where the
module has it, then ``deserialize_cuda_engine``, which returns None and only logs. The
process's one TensorRT logger captures what the runtime says, and the EngineLoadFailure quotes
it with what the plan expects (its targets, its TensorRT version) and what this machine has.
No list of GPUs is kept here.

Contexts: every context is created with ExecutionContextAllocationStrategy.USER_MANAGED and
gets one preallocated slot: a scratch block of ``device_memory_size_v2`` bytes, a device and a
pinned host buffer per I/O tensor, sized for the profile maximum. A closed context's slot
goes back to the engine's free list, and the next context takes it, so replacing a failed
context allocates nothing in steady state. Each context has its own stream. TensorRT-RTX
contexts share one runtime cache, so a kernel JIT-compiled for one context (the engine
compiles once at load, in the probe context) serves all the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from . import cuda, runtime_cache
from .backend import LoadOptions
from .build import BuildResult, build_plan
from .errors import (
    ContextFailure,
    DeviceFailure,
    EngineLoadFailure,
    InvalidInput,
    TrtServeError,
)
from .models import ModelSource
from .spec import IOSpec, TensorSpec
from .trt_module import (
    TrtContext,
    TrtEngine,
    TrtRuntime,
    TrtRuntimeCache,
    import_trt,
    io_spec,
    is_rtx,
    np_dtype,
    process_logger,
    said,
    tensor_spec,
)
from .trt_recorder import enqueue_failure, new_recorder, reported

log = logging.getLogger(__name__)

# EngineInvalidityDiagnostics bits in words, for the load error.
_DIAGNOSES: dict[str, str] = {
    "VERSION_MISMATCH": "the plan was built by another TensorRT version",
    "UNSUPPORTED_CC": "the runtime refuses this GPU's compute capability for this plan",
    "OLD_CUDA_DRIVER": "the CUDA driver is too old for this plan",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for this plan",
    "INSUFFICIENT_GPU_MEMORY": "the GPU has too little memory for this plan",
    "MALFORMED_ENGINE": "the plan file is malformed (delete it and build again)",
    "CUDA_ERROR": "a CUDA call failed while the runtime checked this GPU",
}


def engine_spec(trt: ModuleType, engine: TrtEngine, model: str) -> IOSpec:
    """The IOSpec of a deserialized engine; EngineLoadFailure for a tensor trtserve cannot
    feed (see refuse_unfeedable)."""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        refuse_unfeedable(trt, engine, name, model)
        dtype = np_dtype(trt, engine.get_tensor_dtype(name), model, name)
        shape = tuple(engine.get_tensor_shape(name))
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            outputs.append(tensor_spec(name, dtype, shape))
            continue
        profile = None
        if any(d < 0 for d in shape):
            lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile = (lo, hi)
        inputs.append(tensor_spec(name, dtype, shape, profile))
    return io_spec(inputs, outputs)


def refuse_unfeedable(trt: ModuleType, engine: TrtEngine, name: str, model: str) -> None:
    """Every I/O tensor gets a device buffer, so a tensor TensorRT wants in host memory (a
    shape tensor, TensorLocation.HOST) or reads through infer_shapes would silently receive
    a device pointer: refuse such an engine at load instead."""
    why = []
    if engine.get_tensor_location(name) == trt.TensorLocation.HOST:
        why.append("lives in host memory (TensorLocation.HOST)")
    if engine.is_shape_inference_io(name):
        why.append("is read or written by shape inference (a shape tensor)")
    if why:
        raise EngineLoadFailure(
            f"model '{model}': tensor '{name}' {' and '.join(why)}; trtserve feeds every "
            f"input and output through device memory and cannot serve this engine"
        )


# --- engine and contexts -------------------------------------------------------------------


def _nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


@dataclass
class _Slot:
    """What one context needs on the device, allocated once and handed from context to
    context: the USER_MANAGED scratch block and the I/O buffers."""

    scratch: cuda.DeviceBuffer
    device: dict[str, cuda.DeviceBuffer]
    host: dict[str, cuda.PinnedBuffer]

    def free(self) -> None:
        """Free every buffer, then raise the first failure, if any."""
        first: TrtServeError | None = None
        for buf in (self.scratch, *self.device.values(), *self.host.values()):
            try:
                buf.free()
            except TrtServeError as exc:
                first = first or exc
        if first is not None:
            raise first


class TensorRTEngine:
    """A deserialized plan on one GPU: the Engine protocol for both TensorRT modules."""

    def __init__(self, backend: str, trt: ModuleType, source: ModelSource,
                 options: LoadOptions, build: BuildResult) -> None:
        self.name = source.name
        self.backend = backend
        self.device = f"cuda:{options.device}"
        self.ordinal = options.device
        self.plan_path = build.path
        self._trt: ModuleType = trt
        self._logger = process_logger(trt)
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._allocated = 0
        self._closed = False
        # A DeviceFailure seen by a context: TensorRT's state may be invalid, so the runtime
        # cache is not serialized from it at close.
        self.broken = False
        self._runtime_cache: TrtRuntimeCache | None = None
        self._cache_path: Path | None = None

        plan = build.path.read_bytes()
        gpu = cuda.device_info(options.device)
        if gpu is not None:
            try:
                cuda.set_device(options.device)
            except TrtServeError as exc:
                raise EngineLoadFailure(f"{backend}: cannot use {gpu.describe()}: {exc}") from exc
        self._runtime: TrtRuntime = trt.Runtime(self._logger)
        refused, reasons, messages = self._validity(plan, build)
        # Deserialize even after a refusal: get_engine_validity gives flags and often logs
        # nothing, while deserialize_cuda_engine logs the runtime's explanation in words.
        with self._logger.capture() as deserializing:
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None or refused:
            reasons = reasons or ["deserialize_cuda_engine returned None"]
            raise self._refusal(reasons, messages + deserializing, gpu, build)
        self._engine: TrtEngine = engine
        self.spec = engine_spec(trt, engine, self.name)
        self._scratch_bytes = int(engine.device_memory_size_v2)
        if is_rtx(trt) and gpu is not None:
            self._cache_path = self._runtime_cache_path(options, build, gpu)
        self._output_shapes = self._probe_output_shapes()
        # The probe compiled the kernels for this GPU: keep them for the next process.
        self._save_runtime_cache()

    # The runtime's verdict ----------------------------------------------------------------

    def _validity(self, plan: bytes, build: BuildResult) -> tuple[bool, list[str], list[str]]:
        """The runtime's verdict on ``plan`` where it can give one before deserializing:
        (refused, reasons in words, what it logged)."""
        if not hasattr(self._runtime, "get_engine_validity"):
            return False, [], []
        trt = self._trt
        with self._logger.capture() as messages:
            validity, diagnostics = self._runtime.get_engine_validity(plan)
        reasons = [
            _DIAGNOSES.get(name, name)
            for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
            if int(diagnostics) & int(flag)
        ]
        if validity == trt.EngineValidity.INVALID:
            return True, reasons, messages
        if validity != trt.EngineValidity.VALID:
            log.warning("%s: the runtime rates plan %s %s for this GPU: %s (it said: %s)",
                        self.name, build.path, validity.name, reasons, said(messages))
        return False, [], messages

    def _refusal(self, reasons: list[str], messages: list[str],
                 gpu: cuda.DeviceInfo | None, build: BuildResult) -> EngineLoadFailure:
        trt = self._trt
        if gpu is None:
            reasons = ["no usable GPU or driver", *reasons]
            here = f"no usable GPU ({cuda.no_device_reason(self.ordinal)})"
        else:
            here = gpu.describe()
        return EngineLoadFailure(
            f"{self.backend} cannot run the plan for model '{self.name}' on this machine: "
            f"{'; '.join(reasons) or 'the runtime gave no diagnostic'}. "
            f"The plan ({build.path}) expects {build.expects()}; this machine has {here} "
            f"and {trt.__name__} {trt.__version__}. The runtime said: {said(messages)}"
        )

    # Contexts -----------------------------------------------------------------------------

    def _execution_context(self, what: str) -> tuple[TrtContext, tuple[object, ...]]:
        """A new IExecutionContext with user-managed scratch, and what must outlive it."""
        trt = self._trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        with self._lock, self._logger.capture() as messages:
            if self._closed:
                raise ContextFailure(f"{what}: the engine is closed")
            if is_rtx(trt):
                config = self._engine.create_runtime_config()
                config.set_execution_context_allocation_strategy(strategy)
                if self._runtime_cache is None:
                    self._runtime_cache = config.create_runtime_cache()
                    self._load_runtime_cache()
                if not config.set_runtime_cache(self._runtime_cache):
                    raise ContextFailure(f"{what}: the runtime cache was refused: "
                                         f"{said(messages)}")
                context = self._engine.create_execution_context(config)
                keep: tuple[object, ...] = (self._engine, config, self._runtime_cache)
            else:
                context = self._engine.create_execution_context(strategy)
                keep = (self._engine,)
        if context is None:
            raise ContextFailure(f"{what}: create_execution_context failed: {said(messages)}")
        return context, keep

    # The runtime cache on disk (TensorRT-RTX) ----------------------------------------------

    def _runtime_cache_path(self, options: LoadOptions, build: BuildResult,
                            gpu: cuda.DeviceInfo) -> Path | None:
        try:
            versions = cuda.versions()
        except TrtServeError as exc:
            log.warning("%s: no runtime cache on disk: %s", self.name, exc)
            return None
        return runtime_cache.cache_path(options.cache_dir, build.key, gpu,
                                        self._trt.__version__, versions)

    def _load_runtime_cache(self) -> None:
        if self._cache_path is None or self._runtime_cache is None:
            return
        try:
            if runtime_cache.load(self._runtime_cache, self._cache_path):
                log.info("%s: runtime cache loaded from %s", self.name, self._cache_path)
        except OSError as exc:
            log.warning("%s: cannot read runtime cache %s: %s", self.name, self._cache_path, exc)

    def _save_runtime_cache(self) -> None:
        if self._cache_path is None or self._runtime_cache is None or self.broken:
            return
        try:
            runtime_cache.save(self._runtime_cache, self._cache_path)
        except OSError as exc:  # a cache that cannot be written costs time, not correctness
            log.warning("%s: cannot write runtime cache %s: %s", self.name, self._cache_path,
                        exc)

    def _probe_output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shapes at the profile maximum, which size the output buffers.

        The probe is a real context, so on TensorRT-RTX it also fills the runtime cache.
        """
        what = f"{self.name}: probing output shapes"
        try:
            context, _keep = self._execution_context(what)
        except ContextFailure as exc:
            raise EngineLoadFailure(str(exc)) from exc
        with self._logger.capture() as messages:
            for t in self.spec.inputs:
                if not context.set_input_shape(t.name, t.max_shape or t.shape):
                    raise EngineLoadFailure(
                        f"{what}: input '{t.name}' rejects its own profile maximum "
                        f"{list(t.max_shape or t.shape)}: {said(messages)}"
                    )
            shapes = {t.name: tuple(int(d) for d in context.get_tensor_shape(t.name))
                      for t in self.spec.outputs}
        dynamic = {name: list(s) for name, s in shapes.items() if any(d < 0 for d in s)}
        if dynamic:
            raise EngineLoadFailure(
                f"model '{self.name}': outputs {dynamic} have data-dependent shapes; trtserve "
                f"preallocates outputs and needs their shapes to follow from the input shapes"
            )
        return shapes

    def _take_slot(self, what: str) -> _Slot:
        with self._lock:
            if self._free:
                return self._free.pop()
        device: dict[str, cuda.DeviceBuffer] = {}
        host: dict[str, cuda.PinnedBuffer] = {}
        scratch: cuda.DeviceBuffer | None = None
        sizes = {t.name: _nbytes(t.dtype, t.max_shape or t.shape) for t in self.spec.inputs}
        sizes.update({t.name: _nbytes(t.dtype, self._output_shapes[t.name])
                      for t in self.spec.outputs})
        try:
            scratch = cuda.DeviceBuffer(self._scratch_bytes)
            for name, nbytes in sizes.items():
                device[name] = cuda.DeviceBuffer(nbytes)
                host[name] = cuda.PinnedBuffer(nbytes)
        except TrtServeError as exc:
            for buf in (scratch, *device.values(), *host.values()):
                if buf is not None:
                    _free_quietly(buf, what)
            exc.message = f"{what}: {exc.message}"
            raise
        with self._lock:
            self._allocated += 1
        return _Slot(scratch, device, host)

    def _release(self, slot: _Slot, reusable: bool, what: str) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._free.append(slot)
                return
            self._allocated -= 1
        try:
            slot.free()
        except TrtServeError as exc:
            log.warning("%s: freeing its buffers failed: %s", what, exc)

    @property
    def allocated_slots(self) -> int:
        """Context slots allocated and not yet freed (in use or on the free list)."""
        with self._lock:
            return self._allocated

    def create_context(self, generation: int) -> TensorRTContext:
        return TensorRTContext(self, generation)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
        # Kernels compiled after load (shapes first seen by requests) are kept too.
        self._save_runtime_cache()
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._allocated -= len(free)
        for slot in free:
            try:
                slot.free()
            except TrtServeError as exc:
                log.warning("%s: freeing a context slot failed: %s", self.name, exc)
        # Contexts still open hold their own references and free their slot on close.
        self._runtime_cache = None
        self._engine = None
        self._runtime = None


def _free_quietly(buf: cuda.DeviceBuffer | cuda.PinnedBuffer, what: str) -> None:
    try:
        buf.free()
    except TrtServeError as exc:
        log.warning("%s: freeing a buffer failed: %s", what, exc)


class TensorRTContext:
    """One IExecutionContext with its stream and slot: one request at a time."""

    def __init__(self, engine: TensorRTEngine, generation: int) -> None:
        self.engine = engine
        self.generation = generation
        self._what = f"{engine.name} (context {generation})"
        cuda.set_device(engine.ordinal)
        self._slot = engine._take_slot(self._what)
        self._stream: cuda.Stream | None = None
        self._context: TrtContext | None = None
        # TensorRT reports this context's errors here rather than to the logger, with codes
        # that say how bad they are (trt_recorder.py).
        self._recorder = new_recorder(engine._trt)
        try:
            self._stream = cuda.Stream()
            context, self._keep = engine._execution_context(self._what)
            context.error_recorder = self._recorder
            slot = self._slot
            context.set_device_memory(slot.scratch.ptr, slot.scratch.nbytes)
            for name, buf in slot.device.items():
                if not context.set_tensor_address(name, buf.ptr):
                    raise ContextFailure(f"{self._what}: set_tensor_address('{name}') failed: "
                                         f"{reported(self._recorder.entries())}")
            self._context = context
        except BaseException:
            self._context = None
            if self._stream is not None:
                _destroy_quietly(self._stream, self._what)
            # Nothing ran on the slot, so it is as good as new.
            engine._release(self._slot, True, self._what)
            raise

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None or self._stream is None:
            raise ContextFailure(f"{self._what}: the context is closed")
        try:
            return self._execute(inputs, self._context, self._stream)
        except DeviceFailure:
            self.engine.broken = True
            raise
        except TrtServeError:
            raise
        except Exception as exc:  # a foreign exception must not escape the backend
            raise ContextFailure(f"{self._what}: {type(exc).__name__}: {exc}") from exc

    def _execute(self, inputs: Mapping[str, np.ndarray], context: TrtContext,
                 stream: cuda.Stream) -> dict[str, np.ndarray]:
        engine, slot, what, recorder = self.engine, self._slot, self._what, self._recorder
        logger = engine._logger
        cuda.set_device(engine.ordinal)
        recorder.clear()
        for t in engine.spec.inputs:
            value = np.ascontiguousarray(inputs[t.name], dtype=t.dtype)
            with logger.capture() as messages:
                accepted = context.set_input_shape(t.name, value.shape)
            if not accepted:
                raise InvalidInput(f"input '{t.name}': the engine rejects shape "
                                   f"{list(value.shape)}: {reported(recorder.entries())}; "
                                   f"logged: {said(messages)}")
            np.copyto(slot.host[t.name].view(t.dtype, value.shape), value)
            cuda.copy_to_device_async(slot.device[t.name], slot.host[t.name], value.nbytes,
                                      stream, what)
        outputs: list[tuple[TensorSpec, tuple[int, ...]]] = []
        for t in engine.spec.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(t.name))
            if _nbytes(t.dtype, shape) > slot.device[t.name].nbytes:
                raise InvalidInput(f"output '{t.name}' would be {list(shape)}, larger than "
                                   f"its shape at the profile maximum "
                                   f"{list(engine._output_shapes[t.name])}")
            outputs.append((t, shape))
        if not context.execute_async_v3(stream.handle):
            raise enqueue_failure(recorder.entries(), stream.query(), what)
        for t, shape in outputs:
            cuda.copy_to_host_async(slot.host[t.name], slot.device[t.name],
                                    _nbytes(t.dtype, shape), stream, what)
        stream.synchronize(what)
        # Copies: the pinned buffers belong to the slot and are overwritten by the next run.
        return {t.name: slot.host[t.name].view(t.dtype, shape).copy() for t, shape in outputs}

    def cancel(self) -> None:
        """TensorRT cannot stop an enqueued execution: it finishes on its stream, and the pool
        then closes this context (which synchronizes) instead of lending it again."""

    def close(self) -> None:
        if self._context is None or self._stream is None:
            return
        stream = self._stream
        reusable = True
        try:
            cuda.set_device(self.engine.ordinal)
            stream.synchronize(f"{self._what}: closing")
        except TrtServeError as exc:
            # Work may still be in flight on these buffers: never hand them to another context.
            reusable = False
            log.warning("%s: %s; its buffers are freed, not reused", self._what, exc)
        # TensorRT must let go of the scratch block before another context is given it.
        self._context = None
        self._keep = ()
        self._stream = None
        _destroy_quietly(stream, self._what)
        self.engine._release(self._slot, reusable, self._what)


def _destroy_quietly(stream: cuda.Stream, what: str) -> None:
    try:
        stream.destroy()
    except TrtServeError as exc:
        log.warning("%s: destroying its stream failed: %s", what, exc)


def _load(backend: str, source: ModelSource, options: LoadOptions) -> TensorRTEngine:
    trt = import_trt(backend)
    build = build_plan(source, backend, options.max_batch, options.cache_dir,
                       device=options.device)
    return TensorRTEngine(backend, trt, source, options, build)


def load_tensorrt(source: ModelSource, options: LoadOptions) -> TensorRTEngine:
    return _load("tensorrt", source, options)


def load_tensorrt_rtx(source: ModelSource, options: LoadOptions) -> TensorRTEngine:
    return _load("tensorrt-rtx", source, options)
