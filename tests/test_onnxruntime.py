"""The ONNX Runtime backend on real sessions: numbers, specs, old IR, several tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines import models
from engines.backend import LoadOptions, load_engine
from engines.errors import ContextFailure, EngineLoadFailure, InvalidInput
from engines.runner import ModelRunner
from engines.spec import DYNAMIC


def test_tiny_equals_its_numpy_reference(tiny: models.ModelSource) -> None:
    runner = ModelRunner(load_engine(tiny, "onnxruntime"))
    x = np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32)
    outputs, trail = runner.infer({"x": x}, local_retries=0)
    want = models.tiny_reference(x)
    np.testing.assert_allclose(outputs["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["probs"], want["probs"], rtol=1e-5, atol=1e-6)
    assert [a.outcome for a in trail] == ["ok"]
    runner.close()


def test_resnet50_depends_on_its_input_and_batches_consistently(
    resnet50: models.ModelSource,
) -> None:
    runner = ModelRunner(load_engine(resnet50, "onnxruntime"), pool_size=1)
    images = np.random.default_rng(3).standard_normal((4, 3, 224, 224)).astype(np.float32)
    batched, _ = runner.infer({"data": images}, local_retries=0)
    singles = [
        runner.infer({"data": images[i : i + 1]}, local_retries=0)[0]["prob"] for i in range(4)
    ]
    prob = batched["prob"]
    assert prob.shape == (4, 1000)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-4)
    assert np.abs(prob[0] - prob[1]).max() > 1e-3
    assert prob.std(axis=1).min() > 1e-5  # not the shipped constant 0.001 per class
    np.testing.assert_allclose(np.concatenate(singles), prob, rtol=1e-4, atol=1e-6)
    runner.close()


def test_old_ir_initializers_listed_as_inputs_are_not_model_inputs() -> None:
    path = models.light_resnet50_path()
    model = onnx.load(str(path))
    assert model.ir_version < 4 and len(model.graph.input) > 200
    engine = load_engine(models.resolve(str(path)), "onnxruntime")
    assert engine.spec.input_names == ("gpu_0/data_0",)
    assert engine.spec.inputs[0].shape == (1, 3, 224, 224)
    assert engine.spec.output_names == ("gpu_0/softmax_1",)


def _two_in_two_out(path: str) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["features", "ids_f"], ["sum"]),
            helper.make_node("ReduceSum", ["sum"], ["total"], keepdims=0),
        ],
        "two",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def test_several_inputs_and_outputs(tmp_path) -> None:
    path = tmp_path / "two.onnx"
    _two_in_two_out(str(path))
    runner = ModelRunner(load_engine(models.resolve(str(path)), "onnxruntime"))
    spec = runner.spec
    assert spec.input_names == ("features", "ids")
    assert spec.inputs[1].dtype == np.int64 and spec.inputs[1].shape == (DYNAMIC, 3)
    assert spec.outputs[1].shape == ()
    features = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    outputs, _ = runner.infer({"features": features, "ids": ids}, local_retries=0)
    np.testing.assert_array_equal(outputs["sum"], features + ids)
    assert float(outputs["total"]) == float((features + ids).sum())
    with pytest.raises(InvalidInput, match="disagree on the batch size"):
        spec.validate({"features": features, "ids": ids[:1]})
    runner.close()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"y": np.zeros((1, 16), np.float32)}, r"unknown input tensor\(s\) \['y'\].*x: float32"),
        ({}, r"missing input tensor\(s\) \['x'\]"),
        ({"x": np.zeros((1, 16), np.float64)}, "'x': expected dtype float32, got float64"),
        ({"x": np.zeros((1, 15), np.float32)}, r"'x': expected shape \[\?, 16\], got \[1, 15\]"),
        ({"x": np.zeros(16, np.float32)}, r"'x': expected shape \[\?, 16\] \(rank 2\)"),
        ({"x": np.zeros((9, 16), np.float32)}, "'x': batch 9 is over this model's limit of 8"),
        ({"x": np.zeros((0, 16), np.float32)}, "'x': dimension 0 is 0"),
        ({"x": [[0.0] * 16]}, "'x': expected a numpy array of float32, got list"),
    ],
)
def test_bad_inputs_name_the_tensor(tiny: models.ModelSource, inputs, message: str) -> None:
    spec = load_engine(tiny, "onnxruntime", LoadOptions(max_batch=8)).spec
    with pytest.raises(InvalidInput, match=message):
        spec.validate(inputs)


class _Unreadable:
    """Array-shaped, but its data cannot be read: numpy raises on the copy."""

    shape = (1, 16)
    ndim = 2

    def __array__(self, *_: object, **__: object) -> np.ndarray:
        raise ValueError("the buffer went away")


def test_a_failure_preparing_the_inputs_is_a_context_failure(tiny: models.ModelSource) -> None:
    """Every failure of an execution is a taxonomy error, so the runner retries it on a fresh
    context instead of an unexpected exception ending the request."""
    context = load_engine(tiny, "onnxruntime").create_context(0)
    with pytest.raises(ContextFailure, match="the buffer went away"):
        context.execute({"x": _Unreadable()})  # type: ignore[dict-item]


def test_a_file_onnx_runtime_rejects_is_a_load_failure(tmp_path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(EngineLoadFailure, match="ONNX Runtime cannot load model 'broken'"):
        load_engine(models.resolve(str(path)), "onnxruntime")


def test_auto_without_a_gpu_is_onnx_runtime(tiny: models.ModelSource) -> None:
    assert load_engine(tiny, "auto").backend == "onnxruntime"


def test_unknown_backend_lists_the_known_ones(tiny: models.ModelSource) -> None:
    with pytest.raises(ValueError, match="auto, onnxruntime, tensorrt, tensorrt-rtx"):
        load_engine(tiny, "tvm")
