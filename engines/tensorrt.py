"""TensorRT and TensorRT-RTX engines and contexts: one adapter for two modules.

Full TensorRT (module ``tensorrt``, 10.x/11.x) and TensorRT-RTX (module ``tensorrt_rtx``)
share one Python API. The adapter is written against the names both have; what only one has
is listed apart in the TRT_API_* declarations below, which tests/test_tensorrt_api.py checks
against the installed tensorrt_rtx (and checks that this file and build.py use no other
TensorRT name). In both files the TensorRT module is always held in a variable named ``trt``.

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

import importlib
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cuda
from .backend import LoadOptions
from .errors import ContextFailure, EngineLoadFailure, InvalidInput, TrtServeError
from .models import ModelSource
from .spec import DYNAMIC, IOSpec, TensorSpec

if TYPE_CHECKING:
    from .build import BuildResult

log = logging.getLogger(__name__)

# backend name -> (Python module, pip package that provides it, pyproject extra)
MODULES: dict[str, tuple[str, str, str]] = {
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu13", "tensorrt-rtx"),
}

# Every TensorRT name used by this file and build.py that both modules have, as a path from
# the module ("Runtime.deserialize_cuda_engine"). import_trt() refuses a module that lacks one,
# so an old TensorRT fails at load with a list of what is missing, not mid-request.
TRT_API_USED: tuple[str, ...] = (
    "__version__",
    "nptype",
    "ILogger",
    "ILogger.log",
    "ILogger.Severity",
    "ILogger.Severity.INTERNAL_ERROR",
    "ILogger.Severity.ERROR",
    "ILogger.Severity.WARNING",
    "ILogger.Severity.INFO",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "INetworkDefinition.num_inputs",
    "INetworkDefinition.get_input",
    "INetworkDefinition.num_outputs",
    "INetworkDefinition.get_output",
    "ITensor.name",
    "ITensor.shape",
    "ITensor.dtype",
    "OnnxParser",
    "OnnxParser.parse",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "ParserError.code",
    "ParserError.desc",
    "ParserError.node",
    "ParserError.node_name",
    "ParserError.node_operator",
    "ParserError.file",
    "ParserError.line",
    "ParserError.func",
    "IOptimizationProfile.set_shape",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize",
    "MemoryPoolType.WORKSPACE",
    "IHostMemory.nbytes",
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_shape",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.device_memory_size_v2",
    "ICudaEngine.create_execution_context",
    "TensorIOMode.INPUT",
    "ExecutionContextAllocationStrategy.USER_MANAGED",
    "IExecutionContext.set_device_memory",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
)

# Used where the module has them (hasattr decides), so neither module is required to.
# Both exist in tensorrt_rtx; full TensorRT 10.x has IProgressMonitor, and its runtime has no
# get_engine_validity (its deserialize_cuda_engine logs the reason instead).
TRT_API_OPTIONAL: tuple[str, ...] = (
    "IProgressMonitor",
    "IProgressMonitor.phase_start",
    "IProgressMonitor.step_complete",
    "IProgressMonitor.phase_finish",
    "IBuilderConfig.progress_monitor",
    "Runtime.get_engine_validity",
    "EngineValidity.VALID",
    "EngineValidity.INVALID",
    "EngineInvalidityDiagnostics",
)

# Only TensorRT-RTX has these, with why the RTX path needs them; required of tensorrt_rtx.
TRT_API_RTX_ONLY: dict[str, str] = {
    "ComputeCapability": "plans are built for named compute capabilities, with no GPU present",
    "IBuilderConfig.num_compute_capabilities": "how many target compute capabilities to build",
    "IBuilderConfig.set_compute_capability": "sets one build target",
    "ICudaEngine.create_runtime_config": "the runtime cache is attached through a config",
    "IRuntimeConfig.set_execution_context_allocation_strategy": "USER_MANAGED via the config",
    "IRuntimeConfig.create_runtime_cache": "one runtime cache (JIT output) per engine",
    "IRuntimeConfig.set_runtime_cache": "every context of an engine shares that cache",
}

# Only full TensorRT has these. Empty: every name its path uses is in TRT_API_USED, which
# tensorrt_rtx has too; the full path differs only by leaving the RTX-only names out (and by
# actually attaching the timing cache, which RTX's GPU-less builder does not use).
TRT_API_FULL_ONLY: dict[str, str] = {}

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


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__ == "tensorrt_rtx"


def _resolve(trt: ModuleType, path: str) -> bool:
    obj: Any = trt
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def required_api(trt: ModuleType) -> tuple[str, ...]:
    """The names ``trt`` must have for this adapter to use it."""
    extra = TRT_API_RTX_ONLY if is_rtx(trt) else TRT_API_FULL_ONLY
    return TRT_API_USED + tuple(extra)


def missing_api(trt: ModuleType) -> list[str]:
    return [name for name in required_api(trt) if not _resolve(trt, name)]


def import_trt(backend: str) -> ModuleType:
    """The TensorRT module for ``backend``, or EngineLoadFailure saying what to install."""
    try:
        module, package, extra = MODULES[backend]
    except KeyError:
        raise ValueError(f"not a TensorRT backend: '{backend}' (one of {list(MODULES)})") from None
    try:
        trt = importlib.import_module(module)
    except (ImportError, OSError) as exc:
        # OSError: the Python package is there but its shared libraries are not.
        raise EngineLoadFailure(
            f"backend '{backend}' needs the Python module '{module}', which cannot be imported "
            f"here ({type(exc).__name__}: {exc}); install it with `pip install {package}` "
            f"(or `pip install -e '.[{extra}]'`)"
        ) from exc
    missing = missing_api(trt)
    if missing:
        raise EngineLoadFailure(
            f"{module} {getattr(trt, '__version__', '?')} lacks {', '.join(missing)}, which "
            f"trtserve uses; it needs TensorRT 10.x/11.x or TensorRT-RTX 1.x"
        )
    return trt


# --- the process's logger -------------------------------------------------------------------

_LOGGERS: dict[str, Any] = {}
_LOGGERS_LOCK = threading.Lock()


def process_logger(trt: ModuleType) -> Any:
    """The one TensorRT logger of this process for module ``trt`` (TensorRT wants one).

    It forwards to Python logging (errors and warnings as such, info at debug, verbose not
    at all) and, inside ``capture()``, also collects the warnings and errors, which is the
    only way to learn why deserialize_cuda_engine returned None.
    """
    with _LOGGERS_LOCK:
        logger = _LOGGERS.get(trt.__name__)
        if logger is None:
            logger = _logger_class(trt)()
            _LOGGERS[trt.__name__] = logger
        return logger


def _logger_class(trt: ModuleType) -> type:
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }
    trt_log = logging.getLogger(f"{__name__}.{trt.__name__}")

    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            # Every active capture gets every message: TensorRT logs from its own threads
            # too, so the message cannot be pinned to the thread that asked.
            self._captures: list[list[str]] = []

        def log(self, sev: Any, msg: str) -> None:
            level = levels.get(sev)
            if level is None:
                return
            trt_log.log(level, "%s", msg)
            if level >= logging.WARNING:
                with self._lock:
                    for captured in self._captures:
                        captured.append(msg.strip())

        @contextmanager
        def capture(self) -> Iterator[list[str]]:
            captured: list[str] = []
            with self._lock:
                self._captures.append(captured)
            try:
                yield captured
            finally:
                with self._lock:
                    self._captures.remove(captured)

    return CapturingLogger


def said(messages: list[str]) -> str:
    """What TensorRT logged, for an error message."""
    if not messages:
        return "nothing (no warning or error was logged)"
    return " | ".join(dict.fromkeys(messages))


# --- IOSpec from TensorRT ------------------------------------------------------------------


def np_dtype(trt: ModuleType, dtype: Any, model: str, tensor: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise EngineLoadFailure(
            f"model '{model}': tensor '{tensor}' has TensorRT type {dtype}, which has no numpy "
            f"equivalent; trtserve serves numpy tensors"
        ) from None


def tensor_spec(
    name: str,
    dtype: np.dtype,
    shape: Any,
    profile: tuple[Any, Any] | None = None,
) -> TensorSpec:
    """A TensorSpec; ``profile`` is (min, max) for an input with dynamic dimensions."""
    dims = tuple(int(d) if int(d) >= 0 else DYNAMIC for d in shape)
    if profile is None:
        return TensorSpec(name, dtype, dims)
    lo, hi = profile
    return TensorSpec(name, dtype, dims, tuple(int(d) for d in lo), tuple(int(d) for d in hi))


def io_spec(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> IOSpec:
    """The IOSpec, with max_batch from the profile max of the batched inputs."""
    limits = [t.max_shape[0] for t in inputs if t.batched and t.max_shape is not None]
    return IOSpec(tuple(inputs), tuple(outputs), min(limits) if limits else None)


def engine_spec(trt: ModuleType, engine: Any, model: str) -> IOSpec:
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
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
        self._trt = trt
        self._logger = process_logger(trt)
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._allocated = 0
        self._closed = False
        self._runtime_cache: Any = None

        plan = build.path.read_bytes()
        gpu = cuda.device_info(options.device)
        if gpu is not None:
            try:
                cuda.set_device(options.device)
            except TrtServeError as exc:
                raise EngineLoadFailure(f"{backend}: cannot use {gpu.describe()}: {exc}") from exc
        self._runtime = trt.Runtime(self._logger)
        refused, reasons, messages = self._validity(plan, build)
        # Deserialize even after a refusal: get_engine_validity gives flags and often logs
        # nothing, while deserialize_cuda_engine logs the runtime's explanation in words.
        with self._logger.capture() as deserializing:
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None or refused:
            reasons = reasons or ["deserialize_cuda_engine returned None"]
            raise self._refusal(reasons, messages + deserializing, gpu, build)
        self._engine = engine
        self.spec = engine_spec(trt, engine, self.name)
        self._scratch_bytes = int(engine.device_memory_size_v2)
        self._output_shapes = self._probe_output_shapes()

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

    def _execution_context(self, what: str) -> tuple[Any, tuple[Any, ...]]:
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
                if not config.set_runtime_cache(self._runtime_cache):
                    raise ContextFailure(f"{what}: the runtime cache was refused: "
                                         f"{said(messages)}")
                context = self._engine.create_execution_context(config)
                keep: tuple[Any, ...] = (self._engine, config, self._runtime_cache)
            else:
                context = self._engine.create_execution_context(strategy)
                keep = (self._engine,)
        if context is None:
            raise ContextFailure(f"{what}: create_execution_context failed: {said(messages)}")
        return context, keep

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
        try:
            self._stream = cuda.Stream()
            self._context, self._keep = engine._execution_context(self._what)
            slot = self._slot
            self._context.set_device_memory(slot.scratch.ptr, slot.scratch.nbytes)
            for name, buf in slot.device.items():
                if not self._context.set_tensor_address(name, buf.ptr):
                    raise ContextFailure(f"{self._what}: set_tensor_address('{name}') failed")
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
        except TrtServeError:
            raise
        except Exception as exc:  # a foreign exception must not escape the backend
            raise ContextFailure(f"{self._what}: {type(exc).__name__}: {exc}") from exc

    def _execute(self, inputs: Mapping[str, np.ndarray], context: Any,
                 stream: cuda.Stream) -> dict[str, np.ndarray]:
        engine, slot, what = self.engine, self._slot, self._what
        logger = engine._logger
        cuda.set_device(engine.ordinal)
        for t in engine.spec.inputs:
            value = np.ascontiguousarray(inputs[t.name], dtype=t.dtype)
            with logger.capture() as messages:
                accepted = context.set_input_shape(t.name, value.shape)
            if not accepted:
                raise InvalidInput(f"input '{t.name}': the engine rejects shape "
                                   f"{list(value.shape)}: {said(messages)}")
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
        with logger.capture() as messages:
            enqueued = context.execute_async_v3(stream.handle)
        if not enqueued:
            raise ContextFailure(f"{what}: execute_async_v3 rejected the enqueue: "
                                 f"{said(messages)}")
        for t, shape in outputs:
            cuda.copy_to_host_async(slot.host[t.name], slot.device[t.name],
                                    _nbytes(t.dtype, shape), stream, what)
        stream.synchronize(what)
        # Copies: the pinned buffers belong to the slot and are overwritten by the next run.
        return {t.name: slot.host[t.name].view(t.dtype, shape).copy() for t, shape in outputs}

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
    # build.py imports this module's helpers, so it is imported here rather than at the top.
    from .build import build_plan

    trt = import_trt(backend)
    build = build_plan(source, backend, options.max_batch, options.cache_dir,
                       device=options.device)
    return TensorRTEngine(backend, trt, source, options, build)


def load_tensorrt(source: ModelSource, options: LoadOptions) -> TensorRTEngine:
    return _load("tensorrt", source, options)


def load_tensorrt_rtx(source: ModelSource, options: LoadOptions) -> TensorRTEngine:
    return _load("tensorrt-rtx", source, options)
