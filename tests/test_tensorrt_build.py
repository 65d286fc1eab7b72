"""The TensorRT-RTX build path, run for real on a machine with no GPU: plans are written and
cached, loading them fails with the runtime's own no-GPU verdict, backend "auto" falls back to
ONNX Runtime, the TensorRT network's IOSpec matches ONNX Runtime's, and a parser failure
names the ONNX node.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX: pip install tensorrt-rtx-cu13")

from engines.backend import DEFAULT_TRT_MAX_BATCH, LoadOptions, load_engine  # noqa: E402
from engines.build import build_plan, network_spec, opt_batch  # noqa: E402
from engines.cuda import visible_device_count  # noqa: E402
from engines.errors import EngineLoadFailure  # noqa: E402
from engines.models import BUILTIN, ModelSource, resolve  # noqa: E402
from engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

no_gpu_only = pytest.mark.skipif(
    visible_device_count() > 0, reason="a CUDA GPU is visible: the no-GPU path cannot happen"
)


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # This module's own cache: its first build of each model must find no plan there, and
    # the later tests reuse what it built, as `trtserve build` run twice would.
    return tmp_path_factory.mktemp("plan-cache")


@pytest.mark.parametrize("model", BUILTIN)
def test_build_writes_a_plan_then_hits_the_cache(model: str, plan_cache: Path) -> None:
    source = resolve(model, plan_cache)
    lines: list[str] = []
    first = build_plan(source, "tensorrt-rtx", None, plan_cache, progress=lines.append)
    assert not first.cache_hit
    assert first.path.is_file() and first.path.stat().st_size > 0
    assert first.path.parent == plan_cache / "plans"
    assert lines[0].startswith(f"building {model}")
    assert any("Building engine" in line for line in lines), "no progress from TensorRT"
    assert lines[-1].startswith(f"built {first.path}")
    assert first.fields["profile"] == {
        "min_batch": 1, "opt_batch": opt_batch(DEFAULT_TRT_MAX_BATCH),
        "max_batch": DEFAULT_TRT_MAX_BATCH,
    }
    assert first.fields["onnx_sha256"] == source.sha256
    assert first.fields["module"] == "tensorrt_rtx"
    # No GPU here, so the plan targets every compute capability the module can build for.
    if visible_device_count() == 0:
        assert "8.6" in first.fields["target"]["compute_capabilities"]

    written = first.path.stat().st_mtime_ns
    again: list[str] = []
    second = build_plan(source, "tensorrt-rtx", None, plan_cache, progress=again.append)
    assert second.cache_hit
    assert (second.path, second.key) == (first.path, first.key)
    assert again == [f"cache hit: {first.path}"], "a cache hit must build nothing"
    assert first.path.stat().st_mtime_ns == written


def test_the_key_follows_the_profile(plan_cache: Path) -> None:
    source = resolve("tiny", plan_cache)
    default = build_plan(source, "tensorrt-rtx", None, plan_cache, progress=lambda _: None)
    small = build_plan(source, "tensorrt-rtx", 4, plan_cache, progress=lambda _: None)
    assert small.key != default.key and small.path != default.path
    assert small.fields["profile"] == {"min_batch": 1, "opt_batch": 4, "max_batch": 4}
    assert small.fields["spec"]["max_batch"] == 4


@no_gpu_only
@pytest.mark.parametrize("model", BUILTIN)
def test_loading_a_plan_without_a_gpu_says_so(model: str, plan_cache: Path) -> None:
    source = resolve(model, plan_cache)
    with pytest.raises(EngineLoadFailure) as caught:
        load_engine(source, "tensorrt-rtx", LoadOptions(cache_dir=plan_cache))
    message = str(caught.value)
    assert f"cannot run the plan for model '{model}'" in message
    assert "no usable GPU or driver" in message
    # What the plan expects, and the runtime's own words about this machine.
    assert "expects a GPU of compute capability" in message
    assert "tensorrt_rtx" in message
    assert "The runtime said: " in message and "nothing (no warning" not in message


@pytest.mark.parametrize("model", BUILTIN)
def test_auto_falls_back_to_onnxruntime(model: str, plan_cache: Path) -> None:
    # Without a GPU, or with one neither TensorRT module can run a plan on, auto must still
    # serve the model.
    if visible_device_count() > 0 and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT and a GPU are here: auto may rightly pick TensorRT")
    engine = load_engine(resolve(model, plan_cache), "auto", LoadOptions(cache_dir=plan_cache))
    try:
        assert engine.backend == "onnxruntime"
    finally:
        engine.close()


@pytest.mark.parametrize("model", BUILTIN)
def test_network_spec_matches_onnxruntime(model: str, plan_cache: Path) -> None:
    source = resolve(model, plan_cache)
    trt_spec = network_spec(source, "tensorrt-rtx")
    ort = OnnxRuntimeEngine(source, LoadOptions(cache_dir=plan_cache))
    try:
        ort_spec = ort.spec
    finally:
        ort.close()

    def plain(spec_tensors: tuple) -> list[tuple]:
        return [(t.name, t.dtype, t.shape) for t in spec_tensors]

    assert plain(trt_spec.inputs) == plain(ort_spec.inputs)
    assert plain(trt_spec.outputs) == plain(ort_spec.outputs)
    assert trt_spec.max_batch == DEFAULT_TRT_MAX_BATCH
    for t in trt_spec.inputs:
        assert t.shape[0] == -1
        assert t.min_shape == (1, *t.shape[1:])
        assert t.max_shape == (DEFAULT_TRT_MAX_BATCH, *t.shape[1:])


def _write_onnx_with_an_unknown_op(path: Path) -> ModelSource:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["h"], name="fine_relu"),
            helper.make_node("FrobnicateZ", ["h"], ["y"], name="the_bad_node"),
        ],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return resolve(str(path))


def test_a_parser_failure_names_the_node(tmp_path: Path) -> None:
    source = _write_onnx_with_an_unknown_op(tmp_path / "bad.onnx")
    with pytest.raises(EngineLoadFailure) as caught:
        build_plan(source, "tensorrt-rtx", None, tmp_path / "cache", progress=lambda _: None)
    message = str(caught.value)
    assert "rejected model 'bad'" in message
    assert "ONNX node 1 'the_bad_node' (FrobnicateZ)" in message
    assert not list((tmp_path / "cache" / "plans").glob("*.plan"))


def test_a_dynamic_non_batch_dimension_is_refused_clearly(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "wide.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(EngineLoadFailure, match=r"input 'x' \[-1, -1\] has dynamic dimensions"):
        network_spec(resolve(str(tmp_path / "wide.onnx")), "tensorrt-rtx")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="full TensorRT is installed here")
def test_missing_full_tensorrt_names_the_package(plan_cache: Path) -> None:
    with pytest.raises(EngineLoadFailure, match=r"pip install tensorrt-cu13"):
        load_engine(resolve("tiny", plan_cache), "tensorrt", LoadOptions(cache_dir=plan_cache))


def test_the_cli_prints_cache_hit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deployments.cli import main

    argv = ["build", "tiny", "--backend", "tensorrt-rtx", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "Building engine" in first and "\nbuilt " in first and "cache hit" not in first
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("cache hit: ")
    assert len(list((tmp_path / "plans").glob("*.plan"))) == 1
