"""ONNX -> TensorRT plan, cached under everything a plan is tied to.

A plan is built with one optimization profile over the batch dimension (min 1, opt
``opt_batch(max)``, max ``max_batch`` or DEFAULT_TRT_MAX_BATCH), a workspace limit, a
strongly typed network, and, for full TensorRT, the timing cache kept in the cache dir. Full
TensorRT builds on the GPU that will run the plan; TensorRT-RTX builds with no GPU at all,
for the compute capabilities named in the build (the visible GPU's where the module can
target it, else every Ampere-or-later target the module knows, which is its own portable
default).

Plans live in ``<cache_dir>/plans/`` under a key made of the ONNX file's sha256, the module
and its version, the GPU (name and compute capability) or the RTX targets, the profile and the
build options. A build with a key already there builds nothing.

What ``trtserve build MODEL [--backend tensorrt|tensorrt-rtx] [--max-batch N]
[--cache-dir DIR]`` does with this (deployments/cli.py)::

    source = models.resolve(MODEL, cache_dir)
    build_plan(source, backend or default_backend(), max_batch, cache_dir, progress=print)

``progress`` receives every line to show: the build's phases as TensorRT reports them, then
one last line, ``cache hit: <plan path>`` when the plan was already there and nothing was
built, else ``built <plan path> (<size> MB) in <seconds> s``. A failure (no GPU for full
TensorRT, an ONNX node the parser rejects, a failed build) raises EngineLoadFailure with the
whole story in its message: print it and exit non-zero.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import cuda
from .backend import DEFAULT_CACHE_DIR, DEFAULT_TRT_MAX_BATCH
from .errors import EngineLoadFailure
from .files import locked, write_atomic
from .models import ModelSource
from .spec import IOSpec, TensorSpec
from .trt_module import (
    MODULES,
    TrtBuilder,
    TrtBuilderConfig,
    TrtHostMemory,
    TrtNetwork,
    TrtParser,
    TrtParserError,
    TrtTensor,
    import_trt,
    io_spec,
    is_rtx,
    np_dtype,
    process_logger,
    said,
)
from .trt_module import tensor_spec as make_tensor_spec

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# The backends a plan can be built for (the CLI's --backend choices).
BACKENDS: tuple[str, ...] = tuple(MODULES)

# Bump when the build steps change what a plan of the same key would contain.
BUILD_RECIPE = "1"
DEFAULT_WORKSPACE_BYTES = 1 << 30
# Nested phases deeper than this are not reported: they repeat per layer and drown the rest.
_PROGRESS_DEPTH = 2


def default_backend(device: int = 0) -> str:
    """The backend ``backend="auto"`` tries first where it can: full TensorRT when it is
    installed and a GPU is visible (it builds only on one), else TensorRT-RTX."""
    if importlib.util.find_spec("tensorrt") is not None and cuda.device_info(device) is not None:
        return "tensorrt"
    return "tensorrt-rtx"


def opt_batch(max_batch: int) -> int:
    """The batch TensorRT tunes kernels for. Requests reach a replica one at a time (there is
    no server-side batching), so small batches are the common case: 8, or max if smaller."""
    return min(8, max_batch)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    cache_hit: bool
    key: str
    seconds: float
    # What the key is made of (and the IOSpec the plan was built with), as stored beside it.
    fields: dict[str, Any]

    def expects(self) -> str:
        """What a machine needs to run this plan, in words."""
        target = self.fields["target"]
        if "compute_capabilities" in target:
            gpu = "a GPU of compute capability " + " or ".join(target["compute_capabilities"])
        else:
            gpu = f"{target['gpu']} (compute capability {target['compute_capability']})"
        return (f"{gpu} with a working NVIDIA driver, and {self.fields['module']} "
                f"{self.fields['module_version']}")


def build_plan(
    source: ModelSource,
    backend: str = "tensorrt-rtx",
    max_batch: int | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Progress | None = None,
    *,
    device: int = 0,
) -> BuildResult:
    """Build ``source`` into a plan for ``backend``, or reuse the cached one with its key."""
    report: Progress = progress or log.info
    trt = import_trt(backend)
    if max_batch is None:
        max_batch = DEFAULT_TRT_MAX_BATCH
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    fields = _key_fields(trt, backend, source, max_batch, device)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    plans = Path(cache_dir).expanduser() / "plans"
    plan_path = plans / f"{source.name}.{backend}.{key}.plan"
    meta_path = plan_path.with_suffix(".json")
    start = time.monotonic()
    # One builder per key at a time: replicas starting together wait, then find the plan.
    with locked(plans / f"{source.name}.{backend}.{key}.lock"):
        cached = _cached_fields(plan_path, meta_path, key)
        if cached is not None:
            report(f"cache hit: {plan_path}")
            return BuildResult(plan_path, True, key, time.monotonic() - start, cached)
        batch = fields["profile"]
        report(f"building {source.name} ({source.path}) with {trt.__name__} "
               f"{trt.__version__} for {_target_text(fields['target'])}, batch "
               f"{batch['min_batch']}/{batch['opt_batch']}/{batch['max_batch']} (min/opt/max)")
        plan, spec = _build(trt, source, fields, Path(cache_dir).expanduser(), report)
        write_atomic(plan_path, memoryview(plan))
        stored = {**fields, "key": key, "spec": spec.to_dict()}
        write_atomic(meta_path, json.dumps(stored, indent=2, sort_keys=True).encode())
    seconds = time.monotonic() - start
    report(f"built {plan_path} ({plan.nbytes / 1e6:.1f} MB) in {seconds:.1f} s")
    return BuildResult(plan_path, False, key, seconds, stored)


def network_spec(source: ModelSource, backend: str = "tensorrt-rtx",
                 max_batch: int | None = None) -> IOSpec:
    """The IOSpec a plan of ``source`` would have: the TensorRT parser's network inputs and
    outputs and the batch profile. Needs no GPU."""
    trt = import_trt(backend)
    _builder, network, _parser = _parse(trt, source)
    limit = DEFAULT_TRT_MAX_BATCH if max_batch is None else max_batch
    profile = _batch_profile(network, source.name, limit)
    return _network_spec(trt, network, source.name, profile)


# --- the key -------------------------------------------------------------------------------


def _key_fields(trt: ModuleType, backend: str, source: ModelSource, max_batch: int,
                device: int) -> dict[str, Any]:
    return {
        "recipe": BUILD_RECIPE,
        "onnx_sha256": source.sha256,
        "module": trt.__name__,
        "module_version": trt.__version__,
        "target": _target(trt, backend, device),
        "profile": {"min_batch": 1, "opt_batch": opt_batch(max_batch), "max_batch": max_batch},
        "workspace_bytes": DEFAULT_WORKSPACE_BYTES,
        "strongly_typed": True,
    }


def _target(trt: ModuleType, backend: str, device: int) -> dict[str, Any]:
    gpu = cuda.device_info(device)
    if not is_rtx(trt):
        if gpu is None:
            raise EngineLoadFailure(
                f"backend '{backend}': full TensorRT builds a plan on the GPU that will run it, "
                f"and this machine has no usable GPU or driver "
                f"({cuda.no_device_reason(device)}). TensorRT-RTX builds without one: "
                f"--backend tensorrt-rtx"
            )
        return {"gpu": gpu.name, "compute_capability": gpu.compute_capability}
    if gpu is not None and hasattr(trt.ComputeCapability, f"SM{gpu.major}{gpu.minor}"):
        return {"compute_capabilities": [gpu.compute_capability]}
    # No GPU, or one this module has no target for (the runtime will say so at load): every
    # Ampere-or-later target it knows. Turing (SM75) is left out as NVIDIA's default does:
    # it cannot compile FP32 GEMMs, so it takes a build of its own.
    return {"compute_capabilities": [
        f"{int(name[2:-1])}.{name[-1]}"
        for name in trt.ComputeCapability.__members__
        if name.startswith("SM") and int(name[2:]) >= 80
    ]}


def _target_text(target: dict[str, Any]) -> str:
    if "compute_capabilities" in target:
        return "compute capability " + ", ".join(target["compute_capabilities"])
    return f"{target['gpu']} (compute capability {target['compute_capability']})"


def _cached_fields(plan_path: Path, meta_path: Path, key: str) -> dict[str, Any] | None:
    # The metadata is written after the plan, so a plan without it is an interrupted build.
    if not (plan_path.is_file() and meta_path.is_file()):
        return None
    try:
        stored: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == key else None


# --- parse and build -----------------------------------------------------------------------


def _parse(trt: ModuleType, source: ModelSource) -> tuple[TrtBuilder, TrtNetwork, TrtParser]:
    """Builder, strongly typed network and parser (the network needs the other two alive)."""
    logger = process_logger(trt)
    with logger.capture() as messages:
        builder = trt.Builder(logger)
    if builder is None:
        raise EngineLoadFailure(f"{trt.__name__}: cannot create a builder: {said(messages)}")
    flags = 0
    # TensorRT 11 ignores the flag (every network is strongly typed) and may drop it; in 10.x
    # and TensorRT-RTX it asks for the strongly typed network trtserve is written for.
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # The path lets the parser find weights stored beside the file.
    if not parser.parse(source.read_bytes(), str(source.path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineLoadFailure(
            f"the ONNX parser of {trt.__name__} {trt.__version__} rejected model "
            f"'{source.name}' ({source.path}): " + "; ".join(errors or ["no error recorded"])
        )
    return builder, network, parser


def _parser_error(error: TrtParserError) -> str:
    where = f"{error.file()}:{error.line()} {error.func()}"
    if error.node() < 0:
        return f"{error.code()} (not tied to one node): {error.desc()} [{where}]"
    return (f"ONNX node {error.node()} '{error.node_name()}' ({error.node_operator()}) "
            f"rejected: {error.code()}: {error.desc()} [{where}]")


Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _batch_profile(network: TrtNetwork, model: str, max_batch: int) -> Profile:
    """input name -> (min, opt, max) shapes, for every input with a dynamic batch."""
    profile: Profile = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        dynamic = [axis for axis, d in enumerate(shape) if d < 0]
        if not dynamic:
            continue
        if dynamic != [0]:
            raise EngineLoadFailure(
                f"model '{model}': input '{tensor.name}' {list(shape)} has dynamic dimensions "
                f"{dynamic}; trtserve builds one profile over the leading batch dimension "
                f"only, so every other dimension must be fixed in the ONNX file"
            )
        rest = shape[1:]
        profile[tensor.name] = ((1, *rest), (opt_batch(max_batch), *rest), (max_batch, *rest))
    return profile


def _network_spec(trt: ModuleType, network: TrtNetwork, model: str, profile: Profile) -> IOSpec:
    def spec(tensor: TrtTensor, bounds: tuple[Any, ...] | None) -> TensorSpec:
        dtype = np_dtype(trt, tensor.dtype, model, tensor.name)
        return make_tensor_spec(tensor.name, dtype, tuple(tensor.shape),
                                (bounds[0], bounds[2]) if bounds else None)

    inputs = [spec(network.get_input(i), profile.get(network.get_input(i).name))
              for i in range(network.num_inputs)]
    outputs = [spec(network.get_output(i), None) for i in range(network.num_outputs)]
    return io_spec(inputs, outputs)


def _build(trt: ModuleType, source: ModelSource, fields: dict[str, Any], cache_dir: Path,
           report: Progress) -> tuple[TrtHostMemory, IOSpec]:
    builder, network, _parser = _parse(trt, source)
    shapes = _batch_profile(network, source.name, fields["profile"]["max_batch"])
    spec = _network_spec(trt, network, source.name, shapes)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, fields["workspace_bytes"])
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise EngineLoadFailure(f"model '{source.name}': TensorRT rejected the batch "
                                    f"profile {shapes}")
    target = fields["target"]
    if is_rtx(trt):
        ccs = target["compute_capabilities"]
        config.num_compute_capabilities = len(ccs)
        for index, cc in enumerate(ccs):
            value = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""))
            if not config.set_compute_capability(value, index):
                raise EngineLoadFailure(f"{trt.__name__} refuses build target {cc}")
    timing_path = None
    if not is_rtx(trt):
        timing_path = _attach_timing_cache(trt, config, cache_dir, target)
    monitor = _progress_monitor(trt, report)
    if monitor is not None:
        config.progress_monitor = monitor
    logger = process_logger(trt)
    with logger.capture() as messages:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineLoadFailure(
            f"{trt.__name__} {trt.__version__} failed to build model '{source.name}' for "
            f"{_target_text(target)}: {said(messages)}"
        )
    if timing_path is not None:
        write_atomic(timing_path, memoryview(config.get_timing_cache().serialize()))
    return plan, spec


def _attach_timing_cache(trt: ModuleType, config: TrtBuilderConfig, cache_dir: Path,
                         target: dict[str, Any]) -> Path:
    """Full TensorRT times tactics on the GPU; the timing cache keeps those timings for the
    next build on the same kind of GPU. Returns where to save it after the build."""
    gpu = "".join(c if c.isalnum() else "-" for c in target["gpu"])
    path = cache_dir / "timing" / f"{trt.__name__}-{trt.__version__}-{gpu}.cache"
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not fit this GPU or version; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return path


def _progress_monitor(trt: ModuleType, report: Progress) -> Any:
    """An IProgressMonitor that reports phases; None where the module has none (then the
    start and end lines are all the progress there is)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None,
                        num_steps: int) -> None:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            if depth < _PROGRESS_DEPTH:
                report(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self._depth.pop(phase_name, None)

    return Monitor()
