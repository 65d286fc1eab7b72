"""Every TensorRT use in the adapter's files, checked class by class against the installed
tensorrt_rtx; what TensorRT reports when a context fails, and what trtserve makes of it; and,
on a GPU TensorRT accepts, tiny run through TensorRT engines, one context after another and
several at once.

No GPU that a TensorRT module accepts was available where this was written, so the adapter's
execution path never ran there: the static check (tests/trt_api_check.py) is what stands
between a wrong call and a replica that fails its first request on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
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
from engines.errors import (  # noqa: E402
    ContextFailure,
    DeviceFailure,
    EngineLoadFailure,
    ExecutionError,
    OutOfMemory,
)
from engines.models import resolve, tiny_reference  # noqa: E402
from engines.trt_recorder import enqueue_failure, new_recorder  # noqa: E402

from . import trt_api_check  # noqa: E402

PACKAGE = Path(engines.__file__).parent
# Every file that touches a TensorRT object.
ADAPTER_FILES = ("tensorrt.py", "build.py", "trt_module.py", "trt_recorder.py",
                 "runtime_cache.py")


def _sources() -> dict[str, str]:
    return {name: (PACKAGE / name).read_text() for name in ADAPTER_FILES}


def _check(sources: dict[str, str]) -> trt_api_check.Report:
    return trt_api_check.check(trt, sources["trt_module.py"], sources)


def _declared() -> set[str]:
    return {
        *trt_module.TRT_API_USED,
        *trt_module.TRT_API_OPTIONAL,
        *trt_module.TRT_API_RTX_ONLY,
        *trt_module.TRT_API_FULL_ONLY,
    }


def test_every_required_name_exists_in_tensorrt_rtx() -> None:
    names = (*trt_module.TRT_API_USED, *trt_module.TRT_API_OPTIONAL,
             *trt_module.TRT_API_RTX_ONLY)
    missing = [name for name in names if not trt_api_check._lookup(trt, name)[0]]
    assert not missing, f"tensorrt_rtx {trt.__version__} has no {missing}"
    assert trt_module.missing_api(trt) == []


def test_full_tensorrt_only_names_are_explained_and_not_required_of_rtx() -> None:
    required = set(trt_module.required_api(trt))
    for name, why in trt_module.TRT_API_FULL_ONLY.items():
        assert why.strip(), f"{name}: say why the full-TensorRT path needs it"
        assert name not in required
    for name, why in trt_module.TRT_API_RTX_ONLY.items():
        assert why.strip(), f"{name}: say why the RTX path needs it"
    # The timing cache is deprecated in TensorRT-RTX 1.2, and the strongly typed flag is
    # ignored from TensorRT 11 on: neither may be what makes a module unusable.
    assert "IBuilderConfig.create_timing_cache" in trt_module.TRT_API_FULL_ONLY
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in required


def test_every_tensorrt_use_fits_its_class_and_is_declared() -> None:
    report = _check(_sources())
    assert not report.problems, "\n".join(report.problems)
    declared = _declared()
    undeclared = sorted(u for u in report.uses
                        if not any(d == u or d.startswith(u + ".") for d in declared))
    assert not undeclared, f"used but not declared in trt_module.TRT_API_*: {undeclared}"
    # The check saw the calls that matter, on the classes that have them.
    assert {"IExecutionContext.set_device_memory", "ICudaEngine.device_memory_size_v2",
            "IExecutionContext.execute_async_v3", "IRuntimeCache.serialize",
            "Builder.build_serialized_network", "ParserError.node_name"} <= report.uses


# Each mistake, planted in a copy of the source, and the words the check must answer with.
PLANTED = {
    "calling a property": (
        "tensorrt.py", "int(engine.device_memory_size_v2)",
        "int(engine.device_memory_size_v2())",
        "ICudaEngine.device_memory_size_v2 is a property, and is called"),
    "set_device_memory with one argument": (
        "tensorrt.py", "context.set_device_memory(slot.scratch.ptr, slot.scratch.nbytes)",
        "context.set_device_memory(slot.scratch.ptr)",
        "IExecutionContext.set_device_memory called with 1 argument(s)"),
    "a profile query on a context": (
        "tensorrt.py", "shape = tuple(int(d) for d in context.get_tensor_shape(t.name))",
        "shape = tuple(int(d) for d in context.get_tensor_profile_shape(t.name, 0))",
        "IExecutionContext has no 'get_tensor_profile_shape'"),
    "a property read as a method on a builder object": (
        "build.py", "range(parser.num_errors)", "range(parser.num_errors())",
        "OnnxParser.num_errors is a property, and is called"),
    "a method not called": (
        "build.py", "config.create_timing_cache(data)", "config.create_timing_cache",
        "IBuilderConfig.create_timing_cache is a method, and is not called"),
    "a TensorRT parameter without its alias": (
        "tensorrt.py", "engine: TrtEngine, model: str) -> IOSpec:",
        "engine: Any, model: str) -> IOSpec:",
        "parameter 'engine' of engine_spec() is annotated Any"),
}


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_the_check_catches_a_planted_mistake(mistake: str) -> None:
    file, right, wrong, expected = PLANTED[mistake]
    sources = _sources()
    assert sources[file].count(right) == 1, f"the source changed: update PLANTED[{mistake!r}]"
    sources[file] = sources[file].replace(right, wrong)
    problems = _check(sources).problems
    assert any(expected in p for p in problems), problems


def test_an_old_tensorrt_is_refused_with_the_version_floor() -> None:
    # TensorRT 10.0 had neither device_memory_size_v2 nor set_device_memory(memory, size).
    engine_class = types.SimpleNamespace(**{
        name: getattr(trt.ICudaEngine, name) for name in dir(trt.ICudaEngine)
        if name != "device_memory_size_v2"
    })
    old = types.ModuleType("tensorrt")
    old.__dict__.update({k: v for k, v in vars(trt).items() if not k.startswith("__")})
    old.__version__ = "10.0.1"
    old.ICudaEngine = engine_class  # type: ignore[attr-defined]
    with pytest.raises(EngineLoadFailure, match=r"lacks ICudaEngine.device_memory_size_v2.*"
                                                r"TensorRT 10\.1 or newer"):
        trt_module.refuse_incomplete(old)


# --- what TensorRT reports, and what it means -------------------------------------------


def test_the_error_recorder_receives_tensorrts_reports() -> None:
    # A real tensorrt_rtx object, no GPU needed: a duplicate input name is an API usage error.
    recorder = new_recorder(trt)
    builder = trt.Builder(trt_module.process_logger(trt))
    builder.error_recorder = recorder
    network = builder.create_network(0)
    network.add_input("x", trt.float32, (-1, 4))
    network.add_input("x", trt.float32, (-1, 4))
    entries = recorder.entries()
    assert entries and entries[0][0] == "INVALID_ARGUMENT", entries
    # TensorRT's C++ side reaches the overrides (the binding calls get_num_errors, not
    # num_errors): through the base class's methods, as TensorRT itself calls them.
    assert trt.IErrorRecorder.num_errors(recorder) == len(entries)
    assert trt.IErrorRecorder.get_error_code(recorder, 0) == trt.ErrorCodeTRT.INVALID_ARGUMENT
    assert "addInput" in trt.IErrorRecorder.get_error_desc(recorder, 0)
    trt.IErrorRecorder.clear(recorder)
    assert recorder.entries() == []


def test_the_codes_the_classification_names_exist() -> None:
    from engines.trt_recorder import _CODE_CLASSES

    assert set(_CODE_CLASSES) <= set(trt.ErrorCodeTRT.__members__)


@pytest.mark.parametrize(
    ("entries", "stream", "cls"),
    [
        ([("INTERNAL_ERROR", "Assertion failed")], 0, DeviceFailure),
        ([("FAILED_EXECUTION", "[executionContext.cpp] kernel failed")], 700, DeviceFailure),
        ([("FAILED_EXECUTION", "Error Code 1: Cuda Runtime (cudaError 719: launch failure)")],
         0, DeviceFailure),
        ([("FAILED_EXECUTION", "Error Code 1: Cuda Runtime (cudaError 1: invalid argument)")],
         0, ExecutionError),
        ([("FAILED_ALLOCATION", "out of device memory")], 600, OutOfMemory),
        ([("FAILED_EXECUTION", "enqueue failed")], 0, ContextFailure),
        ([("INVALID_ARGUMENT", "tensor address not set")], 600, ContextFailure),
        ([], 0, ContextFailure),
        ([], 35, DeviceFailure),
    ],
)
def test_a_rejected_enqueue_is_classified(entries: list[tuple[str, str]], stream: int,
                                          cls: type) -> None:
    err = enqueue_failure(entries, stream, "tiny (context 3)")
    assert type(err) is cls
    assert err.message.startswith("tiny (context 3): execute_async_v3 rejected the enqueue")
    for code, desc in entries:
        assert f"{code}: {desc}" in err.message


class _FakeEngine:
    """The ICudaEngine methods refuse_unfeedable reads, for one tensor."""

    def __init__(self, location: Any, shape_io: bool) -> None:
        self.location, self.shape_io = location, shape_io

    def get_tensor_location(self, name: str) -> Any:
        return self.location

    def is_shape_inference_io(self, name: str) -> bool:
        return self.shape_io


@pytest.mark.parametrize(
    ("location", "shape_io", "words"),
    [
        (trt.TensorLocation.HOST, False, "lives in host memory"),
        (trt.TensorLocation.DEVICE, True, "read or written by shape inference"),
        (trt.TensorLocation.HOST, True, "host memory (TensorLocation.HOST) and is read"),
    ],
)
def test_a_tensor_the_adapter_cannot_feed_is_refused(location: Any, shape_io: bool,
                                                      words: str) -> None:
    with pytest.raises(EngineLoadFailure, match=rf"model 'm': tensor 'shape'.*{re.escape(words)}"):
        adapter.refuse_unfeedable(trt, _FakeEngine(location, shape_io), "shape", "m")
    adapter.refuse_unfeedable(trt, _FakeEngine(trt.TensorLocation.DEVICE, False), "x", "m")


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
def test_several_contexts_run_at_once(tmp_path: Path) -> None:
    # Each context has its own USER_MANAGED scratch block and I/O buffers; were two running
    # contexts to share one, their answers would mix. Every thread checks its own answers.
    backend = _runnable_backend(tmp_path)
    engine = adapter._load(backend, resolve("tiny", tmp_path),
                           LoadOptions(cache_dir=tmp_path, max_batch=16))
    threads, rounds = 4, 20
    contexts = [engine.create_context(g) for g in range(threads)]
    start = threading.Barrier(threads)
    errors: list[str] = []

    def run(index: int) -> None:
        rng = np.random.default_rng(index)
        start.wait()
        try:
            for _ in range(rounds):
                x = rng.standard_normal((int(rng.integers(1, 17)), 16)).astype(np.float32)
                got = contexts[index].execute({"x": x})["probs"]
                want = tiny_reference(x)["probs"]
                error = np.linalg.norm(got - want) / np.linalg.norm(want)
                if got.shape != want.shape or error >= 1e-3:
                    errors.append(f"context {index}: shape {got.shape}, relative error {error}")
        except Exception as exc:  # a thread's exception would otherwise vanish
            errors.append(f"context {index}: {type(exc).__name__}: {exc}")

    try:
        assert engine.allocated_slots == threads  # one slot each: none shared
        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not errors, errors
    finally:
        for context in contexts:
            context.close()
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
