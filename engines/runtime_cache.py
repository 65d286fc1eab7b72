"""TensorRT-RTX's runtime cache on disk: the kernels it JIT-compiles for this GPU when a
context is created (NVIDIA puts that at up to 15 s), kept for the next process.

A replica that fails with DeviceFailure is replaced by a new process, which would otherwise
compile everything again. The file is keyed by everything the runtime checks before it
accepts a cache (IRuntimeCache.deserialize's documentation: the TensorRT-RTX version, the GPU,
the CUDA driver...): the plan, the GPU's name and compute capability, the TensorRT-RTX
version and the CUDA driver and runtime versions. Loading and saving hold a lock beside the
file, as NVIDIA's TensorRT-RTX demo does (demo/utils/engine.py, with polygraphy's LockFile);
the write goes aside and is renamed, so a reader never sees half a cache. A cache the runtime
rejects is only logged: the engine then compiles as if there were none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .cuda import DeviceInfo
from .files import locked, write_atomic
from .trt_module import TrtRuntimeCache

log = logging.getLogger(__name__)


def cache_path(cache_dir: Path, plan_key: str, gpu: DeviceInfo, rtx_version: str,
               cuda_versions: dict[str, int]) -> Path:
    """Where the runtime cache for this plan on this GPU, runtime and CUDA lives."""
    fields = {
        "plan": plan_key,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_rtx": rtx_version,
        **cuda_versions,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / "runtime" / f"{plan_key}.{key}.rtcache"


def _lock(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def load(cache: TrtRuntimeCache, path: Path) -> bool:
    """Fill the IRuntimeCache ``cache`` from ``path``; False where there is nothing usable."""
    with locked(_lock(path)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
    if not data:
        return False
    if not cache.deserialize(data):
        log.warning("runtime cache %s does not fit this GPU, driver or TensorRT-RTX; the "
                    "kernels will be compiled again and the file replaced", path)
        return False
    return True


def save(cache: TrtRuntimeCache, path: Path) -> None:
    """Write the IRuntimeCache ``cache`` to ``path``, whole or not at all."""
    with locked(_lock(path)):
        data = cache.serialize()
        if data is None:
            raise OSError(f"IRuntimeCache.serialize returned nothing for {path}")
        write_atomic(path, memoryview(data))
