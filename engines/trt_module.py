"""The TensorRT module itself, shared by the adapter (tensorrt.py) and the build (build.py):
which module a backend uses, the TensorRT names trtserve relies on, the process's logger, and
the conversions from TensorRT's types to trtserve's.

Full TensorRT (module ``tensorrt``, 10.1 or newer, 11.x included) and TensorRT-RTX (module
``tensorrt_rtx``) share one Python API. The adapter is written against the names both have;
what only one has is listed apart in the TRT_API_* declarations below.
tests/test_tensorrt_api.py checks every use in the adapter's files against the class it is
made on in the installed tensorrt_rtx, and that each is declared here, so import_trt's
refusal covers everything used. The TensorRT module is always held in a variable ``trt``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Annotated, Any

import numpy as np

from .errors import EngineLoadFailure
from .spec import DYNAMIC, IOSpec, TensorSpec

# TensorRT objects, for annotations. Neither module ships type stubs, so to a type checker
# each is Any; tests/test_tensorrt_api.py reads the class each one names and checks every use
# of a value so annotated (and of what its methods return) against that class of the
# installed tensorrt_rtx. A TensorRT object passed to a function or kept on ``self`` is
# annotated with one of these; locals get their class from the call that made them.
TrtBuilder = Annotated[Any, "Builder"]
TrtBuilderConfig = Annotated[Any, "IBuilderConfig"]
TrtNetwork = Annotated[Any, "INetworkDefinition"]
TrtParser = Annotated[Any, "OnnxParser"]
TrtParserError = Annotated[Any, "ParserError"]
TrtTensor = Annotated[Any, "ITensor"]
TrtHostMemory = Annotated[Any, "IHostMemory"]
TrtRuntime = Annotated[Any, "Runtime"]
TrtEngine = Annotated[Any, "ICudaEngine"]
TrtContext = Annotated[Any, "IExecutionContext"]
TrtRuntimeConfig = Annotated[Any, "IRuntimeConfig"]
TrtRuntimeCache = Annotated[Any, "IRuntimeCache"]
TrtDataType = Annotated[Any, "DataType"]
TrtDims = Annotated[Any, "Dims"]
TrtErrorCode = Annotated[Any, "ErrorCodeTRT"]
TrtSeverity = Annotated[Any, "ILogger.Severity"]

# backend name -> (Python module, pip package that provides it, pyproject extra)
MODULES: dict[str, tuple[str, str, str]] = {
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu13", "tensorrt-rtx"),
}

# Every TensorRT name that tensorrt.py and build.py use and both modules have, as a path from
# the module ("Runtime.deserialize_cuda_engine"). import_trt() refuses a module that lacks one,
# so an old TensorRT fails at load with a list of what is missing, not mid-request. The floor
# is TensorRT 10.1: ICudaEngine.device_memory_size_v2 and the two-argument
# IExecutionContext.set_device_memory(memory, size) first appear in its Python bindings
# (NVIDIA/TensorRT python/src/infer/pyCore.cpp: absent at tag v10.0.1, present at v10.1.0).
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
    "IErrorRecorder",
    "ErrorCodeTRT.INTERNAL_ERROR",
    "ErrorCodeTRT.FAILED_ALLOCATION",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
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
    "MemoryPoolType.WORKSPACE",
    "IHostMemory.nbytes",
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_shape",
    "ICudaEngine.get_tensor_location",
    "ICudaEngine.is_shape_inference_io",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.device_memory_size_v2",
    "ICudaEngine.create_execution_context",
    "TensorIOMode.INPUT",
    "TensorLocation.HOST",
    "ExecutionContextAllocationStrategy.USER_MANAGED",
    "IExecutionContext.error_recorder",
    "IExecutionContext.set_device_memory",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
)

# Used where the module has them (hasattr decides), so neither module is required to.
# Both modules have the progress monitor; full TensorRT's runtime has no get_engine_validity
# (its deserialize_cuda_engine logs the reason instead). STRONGLY_TYPED is deprecated and
# ignored from TensorRT 11.0 on, where every network is strongly typed (NvInfer.h of 11.1,
# NetworkDefinitionCreationFlag), so its eventual removal must not stop a build.
TRT_API_OPTIONAL: tuple[str, ...] = (
    "IProgressMonitor",
    "IProgressMonitor.phase_start",
    "IProgressMonitor.step_complete",
    "IProgressMonitor.phase_finish",
    "IBuilderConfig.progress_monitor",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
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
    "IRuntimeCache.deserialize": "the JIT output of an earlier process, loaded from cache_dir",
    "IRuntimeCache.serialize": "the JIT output, saved to cache_dir for the next process",
}

# Used only on full TensorRT's path, so required only of full TensorRT. tensorrt_rtx still
# has them, deprecated since TensorRT-RTX 1.2: no-ops there that force a GPU query at build
# time ("Timing Cache Migration", docs.nvidia.com/deeplearning/tensorrt-rtx/latest/
# inference-library/timing-cache-migration.html), so the RTX path never touches them.
TRT_API_FULL_ONLY: dict[str, str] = {
    "IBuilderConfig.create_timing_cache": "tactic timings of earlier builds on this GPU",
    "IBuilderConfig.set_timing_cache": "the build reads and extends those timings",
    "IBuilderConfig.get_timing_cache": "the extended timings, to save after the build",
    "ITimingCache.serialize": "the timings as bytes for the cache dir",
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
    refuse_incomplete(trt)
    return trt


def refuse_incomplete(trt: ModuleType) -> None:
    """EngineLoadFailure naming what ``trt`` lacks of what trtserve uses (a TensorRT before
    10.1 lacks device_memory_size_v2 and the two-argument set_device_memory)."""
    missing = missing_api(trt)
    if missing:
        raise EngineLoadFailure(
            f"{trt.__name__} {getattr(trt, '__version__', '?')} lacks {', '.join(missing)}, "
            f"which trtserve uses; it needs TensorRT 10.1 or newer, or TensorRT-RTX 1.x"
        )


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

        def log(self, sev: TrtSeverity, msg: str) -> None:
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


def np_dtype(trt: ModuleType, dtype: TrtDataType, model: str, tensor: str) -> np.dtype:
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
    shape: TrtDims | tuple[int, ...],
    profile: tuple[TrtDims, TrtDims] | None = None,
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
