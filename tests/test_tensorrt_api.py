"""The TensorRT names the adapter uses exist in the installed tensorrt_rtx, and the adapter uses
no name it does not declare; plus, on a GPU, tiny run through a TensorRT engine.

No GPU was available where this was written, so the adapter's execution path never ran there:
these checks are what stands between a misspelt or full-TensorRT-only name and a replica that
fails its first request on a GPU machine.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

trt = pytest.importorskip(
    "tensorrt_rtx", reason="needs TensorRT-RTX: pip install tensorrt-rtx-cu13"
)

import engines  # noqa: E402
from engines import build as build_module  # noqa: E402
from engines import tensorrt as adapter  # noqa: E402
from engines import trt_module  # noqa: E402
from engines.backend import Context, Engine, LoadOptions  # noqa: E402
from engines.cuda import visible_device_count  # noqa: E402
from engines.errors import EngineLoadFailure  # noqa: E402
from engines.models import resolve, tiny_reference  # noqa: E402

ADAPTER_FILES = (Path(adapter.__file__), Path(build_module.__file__))


def _resolves(module: types.ModuleType, path: str) -> bool:
    obj: Any = module
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _declared() -> set[str]:
    return {
        *trt_module.TRT_API_USED,
        *trt_module.TRT_API_OPTIONAL,
        *trt_module.TRT_API_RTX_ONLY,
        *trt_module.TRT_API_FULL_ONLY,
    }


def test_every_declared_name_exists_in_tensorrt_rtx() -> None:
    names = (*trt_module.TRT_API_USED, *trt_module.TRT_API_OPTIONAL, *trt_module.TRT_API_RTX_ONLY)
    missing = [name for name in names if not _resolves(trt, name)]
    assert not missing, f"tensorrt_rtx {trt.__version__} has no {missing}"
    assert trt_module.missing_api(trt) == []


def test_full_tensorrt_only_names_are_absent_from_rtx_and_explained() -> None:
    for name, why in trt_module.TRT_API_FULL_ONLY.items():
        assert why.strip(), f"{name}: say why the full-TensorRT path needs it"
        assert not _resolves(trt, name), f"{name} exists in tensorrt_rtx: declare it as shared"
    for name, why in trt_module.TRT_API_RTX_ONLY.items():
        assert why.strip(), f"{name}: say why the RTX path needs it"


def _used_names(path: Path) -> tuple[set[str], set[str]]:
    """(every attribute name the file reads or writes, including getattr/hasattr string
    names, every dotted path rooted at the module variable ``trt``)."""
    tree = ast.parse(path.read_text())
    attrs: set[str] = set()
    rooted: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attrs.add(node.attr)
            parts = []
            base: ast.expr = node
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == "trt":
                rooted.add(".".join(reversed(parts)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            attrs.add(node.args[1].value)
    return attrs, rooted


def _project_names() -> set[str]:
    """Names defined by trtserve itself: module members, class members, and every attribute
    the engines/ sources assign on ``self`` or declare (dataclass fields)."""
    names: set[str] = set()
    package = Path(engines.__file__).parent
    for source in package.glob("*.py"):
        module = importlib.import_module(f"engines.{source.stem}")
        for value in vars(module).values():
            names.update(dir(value) if isinstance(value, type) else ())
        names.update(vars(module))
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


# Everything other than TensorRT that the adapter's files touch. An attribute name found on
# none of these, and not defined by trtserve, can only be a TensorRT name: it must be declared.
_NOT_TENSORRT: tuple[Any, ...] = (
    builtins, dict, list, tuple, set, str, bytes, int, float, memoryview, type, Exception,
    np, np.ndarray, np.dtype, pathlib, Path, json, os, hashlib, hashlib.sha256(), time,
    logging, logging.Logger,
    threading, threading.Lock(), ctypes, fcntl, tempfile, importlib, importlib.util, contextlib,
    dataclasses, collections.abc, types,
)


def test_the_adapter_uses_only_declared_tensorrt_names() -> None:
    declared = _declared()
    declared_parts = {part for name in declared for part in name.split(".")}
    known = _project_names() | {name for obj in _NOT_TENSORRT for name in dir(obj)}
    try:
        from cuda.bindings import runtime
    except ImportError:
        pass
    else:
        known |= set(dir(runtime)) | set(dir(runtime.cudaDeviceProp))
    undeclared: dict[str, set[str]] = {}
    for path in ADAPTER_FILES:
        attrs, rooted = _used_names(path)
        for name in attrs:
            if not name.startswith("__") and name not in known | declared_parts:
                undeclared.setdefault(path.name, set()).add(name)
        # A path from the module itself can be checked exactly.
        for dotted in rooted:
            # What follows a Python dunder (trt.ILogger.__init__, X.__members__.items) is not
            # TensorRT API; __version__ is.
            parts: list[str] = []
            for part in dotted.split("."):
                if part.startswith("__") and part != "__version__":
                    break
                parts.append(part)
            dotted = ".".join(parts)
            if dotted and not any(d == dotted or d.startswith(dotted + ".") for d in declared):
                undeclared.setdefault(path.name, set()).add(f"trt.{dotted}")
    assert not undeclared, (
        f"TensorRT names used but not declared in engines/tensorrt.py's TRT_API_*: {undeclared}"
    )


def test_the_scan_catches_an_undeclared_name(tmp_path: Path) -> None:
    # The check above is only as good as its scan: a made-up method must show up in it.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(trt, engine):\n"
        "    engine.get_tensor_profile_shap('x', 0)\n"
        "    return hasattr(trt.Runtime, 'get_engine_validty'), trt.ICudaEngine.num_io_tensors\n"
    )
    attrs, rooted = _used_names(probe)
    assert {"get_tensor_profile_shap", "get_engine_validty"} <= attrs
    assert "ICudaEngine.num_io_tensors" in rooted
    assert not _resolves(trt, "ICudaEngine.get_tensor_profile_shap")


def test_the_adapter_imports_without_tensorrt(tmp_path: Path) -> None:
    # A fresh interpreter in which neither TensorRT module can be imported.
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'tensorrt_rtx'):\n"
        "            raise ImportError(f'{name} is blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pathlib import Path\n"
        "import engines.tensorrt, engines.build\n"
        "from engines.backend import LoadOptions\n"
        "from engines.errors import EngineLoadFailure\n"
        "from engines.models import resolve\n"
        f"cache = Path({str(tmp_path)!r})\n"
        "options = LoadOptions(cache_dir=cache)\n"
        "try:\n"
        "    engines.tensorrt.load_tensorrt_rtx(resolve('tiny', cache), options)\n"
        "except EngineLoadFailure as exc:\n"
        "    print(exc)\n"
    )
    root = Path(engines.__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=120, check=True)
    assert "pip install tensorrt-rtx-cu13" in done.stdout, done.stdout + done.stderr


def test_the_build_does_not_import_the_adapter() -> None:
    # build.py and tensorrt.py once imported each other (one of them inside a function);
    # both now take the shared pieces from trt_module.py, and only the adapter needs the build.
    script = "import sys, engines.build; print(sorted(m for m in sys.modules if 'engines.' in m))"
    root = Path(engines.__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=120, check=True)
    assert "engines.trt_module" in done.stdout and "engines.tensorrt'" not in done.stdout


# --- on a GPU ------------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(visible_device_count() == 0,
                                  reason="needs a CUDA GPU: CUDA sees none here")


def _runnable_backend(cache_dir: Path) -> str:
    """A TensorRT backend whose runtime accepts this GPU, or skip naming what is missing."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    plan = build_module.build_plan(resolve("tiny", cache_dir), "tensorrt-rtx", None, cache_dir,
                                   progress=lambda _: None)
    runtime = trt.Runtime(trt_module.process_logger(trt))
    validity, diagnostics = runtime.get_engine_validity(plan.path.read_bytes())
    if validity == trt.EngineValidity.INVALID:
        pytest.skip(f"needs full TensorRT (pip install tensorrt-cu13) or a GPU TensorRT-RTX "
                    f"accepts: it rates this one INVALID (diagnostics {int(diagnostics)})")
    return "tensorrt-rtx"


@pytest.mark.gpu
@requires_gpu
def test_tiny_runs_through_tensorrt(tmp_path: Path) -> None:
    backend = _runnable_backend(tmp_path)
    source = resolve("tiny", tmp_path)
    engine = adapter._load(backend, source, LoadOptions(cache_dir=tmp_path, max_batch=16))
    try:
        assert isinstance(engine, Engine)
        assert engine.spec.max_batch == 16
        rng = np.random.default_rng(7)
        for generation, batch in enumerate((1, 5, 16)):
            context = engine.create_context(generation)
            assert isinstance(context, Context) and context.generation == generation
            try:
                x = rng.standard_normal((batch, 16)).astype(np.float32)
                got = context.execute({"x": x})
                want = tiny_reference(x)
                for name in ("logits", "probs"):
                    assert got[name].shape == want[name].shape
                    error = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
                    assert error < 1e-3, f"{name}: relative error {error}"
            finally:
                context.close()
        # Three contexts one after another: the first one's slot served all three.
        assert engine.allocated_slots == 1
        spare = engine.create_context(10)
        busy = engine.create_context(11)
        assert engine.allocated_slots == 2
        spare.close()
        busy.close()
    finally:
        engine.close()
    assert engine.allocated_slots == 0


@pytest.mark.gpu
@requires_gpu
def test_a_refused_gpu_gets_a_clear_error(tmp_path: Path) -> None:
    source = resolve("tiny", tmp_path)
    plan = build_module.build_plan(source, "tensorrt-rtx", None, tmp_path,
                                   progress=lambda _: None)
    runtime = trt.Runtime(trt_module.process_logger(trt))
    validity, _ = runtime.get_engine_validity(plan.path.read_bytes())
    if validity != trt.EngineValidity.INVALID:
        pytest.skip("TensorRT-RTX accepts this GPU: needs one it refuses (an H100, say)")
    from engines.cuda import device_info

    gpu = device_info(0)
    assert gpu is not None
    with pytest.raises(EngineLoadFailure) as caught:
        adapter.load_tensorrt_rtx(source, LoadOptions(cache_dir=tmp_path))
    message = str(caught.value)
    assert f"compute capability {gpu.compute_capability}" in message
    assert "refuses this GPU's compute capability" in message
    # The runtime's own words (deserialize_cuda_engine logs them; the validity check may not).
    assert "The runtime said: " in message and "nothing (no warning" not in message
