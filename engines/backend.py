"""The Engine/Context split every backend implements, and the backend registry.

An Engine is loaded once per process (a TensorRT ICudaEngine, an ONNX Runtime
InferenceSession) and owns the weights; a Context is a cheap, disposable execution state on it
(an IExecutionContext with its stream and buffers, an ONNX Runtime RunOptions). A failed
context is thrown away and replaced; a failed engine (DeviceFailure) poisons the process.

Backends are looked up by name and imported only when asked for, so a machine without
TensorRT never imports it. ``backend="auto"`` picks TensorRT where a plan can run on the
visible GPU and ONNX Runtime otherwise, logging why.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import EngineLoadFailure
from .models import DEFAULT_CACHE_DIR, ModelSource
from .spec import IOSpec

log = logging.getLogger(__name__)

DEFAULT_TRT_MAX_BATCH = 64


@runtime_checkable
class Context(Protocol):
    """One execution state. Not thread-safe: the pool lends it to one request at a time."""

    generation: int

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on validated inputs. Raises only taxonomy errors."""
        ...

    def cancel(self) -> None:
        """Ask an execution in progress on another thread to stop soon (best effort; an
        abandoned request calls it). The pool never lends a cancelled context again."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """A model loaded once per process."""

    name: str
    backend: str
    device: str
    spec: IOSpec

    def create_context(self, generation: int) -> Context: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    ``max_batch``: ONNX Runtime's batch limit (None: unbounded); for TensorRT, the profile
    max the plan is built with (None: DEFAULT_TRT_MAX_BATCH). ``device``: the CUDA ordinal
    inside this process (Ray sets CUDA_VISIBLE_DEVICES, so a pinned replica sees its GPU as 0).
    ``threads``: ONNX Runtime's intra-op threads (None: 1 on the CUDA provider, where the GPU
    does the work, ONNX Runtime's own default on the CPU; 0: ONNX Runtime's own default).
    ``allow_spinning``: whether its idle threads spin (they then compete with Serve's processes
    for the cores). ``batch_buckets`` (ONNX Runtime): batch sizes that each get a session of
    their own; a batch runs on the smallest that holds it, padded with zero rows (larger ones
    on the general session). Measured on an H200 (docs/benchmarks.md): the CUDA provider pays
    150-700 ms each time a session's input shape changes between runs, warmed or not, while a
    session that keeps one shape runs ResNet-50 at 6,300 img/s.
    """

    max_batch: int | None = None
    device: int = 0
    cache_dir: Path = DEFAULT_CACHE_DIR
    threads: int | None = None
    allow_spinning: bool = False
    batch_buckets: tuple[int, ...] = ()


Loader = Callable[[ModelSource, LoadOptions], Engine]

# Module paths, not imports: a backend's libraries load only when it is asked for.
_BACKENDS: dict[str, str] = {
    "onnxruntime": "engines.onnxruntime:load",
    "tensorrt": "engines.tensorrt:load_tensorrt",
    "tensorrt-rtx": "engines.tensorrt:load_tensorrt_rtx",
}
# The order "auto" tries where a GPU is visible; ONNX Runtime is always the last resort.
_AUTO_ORDER: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")

BACKENDS: tuple[str, ...] = ("auto", *_BACKENDS)


def loader(name: str) -> Loader:
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend '{name}'; choose one of {', '.join(['auto', *_BACKENDS])}"
        ) from None
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def load_engine(
    source: ModelSource, backend: str = "auto", options: LoadOptions | None = None
) -> Engine:
    """Load ``source`` with ``backend``; "auto" never fails where ONNX Runtime can load it."""
    options = options or LoadOptions()
    if backend != "auto":
        return loader(backend)(source, options)
    from .cuda import visible_device_count

    if visible_device_count() == 0:
        log.info("backend auto: no visible CUDA GPU, using ONNX Runtime for %s", source.name)
        return loader("onnxruntime")(source, options)
    for name in _AUTO_ORDER:
        try:
            engine = loader(name)(source, options)
        except EngineLoadFailure as exc:
            log.warning("backend auto: %s cannot serve %s here: %s", name, source.name, exc)
            continue
        log.info("backend auto: serving %s with %s on %s", source.name, name, engine.device)
        return engine
    log.warning("backend auto: falling back to ONNX Runtime for %s", source.name)
    return loader("onnxruntime")(source, options)
