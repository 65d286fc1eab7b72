"""Built-in models, and ONNX files as models.

Every built-in model is generated from a seed, so its file is byte-identical on every
machine with the same onnx package: plan caches key on the file's hash, and tests compare
outputs across processes.

- ``tiny``: a two-layer MLP, input ``x`` float32[batch, 16], outputs ``logits`` [batch, 8]
  and ``probs`` (softmax of logits). It has a numpy reference (``tiny_reference``).
- ``resnet50``: the architecture the onnx package ships as
  onnx/backend/test/data/light/light_resnet50.onnx. That file builds every weight with a
  ConstantOfShape of 0.02 (it answers 0.001 for every class, whatever the input), lists its
  initializers as graph inputs (IR 3), and reshapes to a constant [1, 2048]. Here the weights
  become seeded random initializers, the graph inputs are only the image ``data``
  float32[batch, 3, 224, 224], the Reshape keeps the batch, and the output is ``prob``
  float32[batch, 1000].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import write_atomic

DEFAULT_CACHE_DIR = Path("~/.cache/trtserve").expanduser()

# Bump a recipe's version when its output changes, so cached files are regenerated.
_RECIPES: dict[str, str] = {"tiny": "v1", "resnet50": "v1"}
BUILTIN: tuple[str, ...] = tuple(_RECIPES)

_OPSET = 13
_IR_VERSION = 8


@dataclass(frozen=True)
class ModelSource:
    """An ONNX model on disk: its served name, path and the sha256 of the file."""

    name: str
    path: Path
    sha256: str
    builtin: bool = False

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _seal(model: object) -> bytes:
    import onnx

    assert isinstance(model, onnx.ModelProto)
    model.ir_version = _IR_VERSION
    model.producer_name = "trtserve"
    model.producer_version = "1"
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", _OPSET))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _tiny_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261125)
    return {
        "w1": (rng.standard_normal((16, 32)) / 4).astype(np.float32),
        "b1": (rng.standard_normal(32) / 10).astype(np.float32),
        "w2": (rng.standard_normal((32, 8)) / 5).astype(np.float32),
        "b2": (rng.standard_normal(8) / 10).astype(np.float32),
    }


def tiny_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """What ``tiny`` computes, in numpy (float64 inside, float32 out)."""
    w = {k: v.astype(np.float64) for k, v in _tiny_weights().items()}
    hidden = np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0.0)
    logits = hidden @ w["w2"] + w["b2"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return {
        "logits": logits.astype(np.float32),
        "probs": (e / e.sum(axis=1, keepdims=True)).astype(np.float32),
    }


def tiny_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights = _tiny_weights()
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["l0"], name="fc2"),
        helper.make_node("Add", ["l0", "b2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 8]),
        ],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return _seal(helper.make_model(graph))


def light_resnet50_path() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"


def _param_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Seeded weights that keep activations in range through 50 layers.

    He-normal convolutions; batch norm as identity, except the last one of each residual
    branch (``branch2c``), scaled down so the residual sum does not grow with depth.
    """
    kind = name.rsplit("_", 2)[-2]
    if kind == "w":
        fan_in = int(np.prod(shape[1:]))
        gain = 2.0 if len(shape) == 4 else 1.0
        return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)
    if kind == "s":
        scale = 0.2 if "branch2c" in name else 1.0
        return (scale * (1.0 + 0.1 * rng.standard_normal(shape))).astype(np.float32)
    if kind in ("b", "rm"):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "riv":
        return (1.0 + 0.1 * rng.random(shape)).astype(np.float32)
    raise ValueError(f"unexpected parameter {name} in light_resnet50.onnx")


def resnet50_onnx() -> bytes:
    import onnx
    from onnx import helper, numpy_helper

    src = onnx.load(str(light_resnet50_path()))
    graph = src.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    renames = {"gpu_0/data_0": "data", "gpu_0/softmax_1": "prob"}
    rng = np.random.default_rng(50)

    params: dict[str, tuple[int, ...]] = {}
    for node in graph.node:
        if node.op_type == "ConstantOfShape":
            params[node.output[0]] = tuple(int(d) for d in consts[node.input[0]])
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and tensor.name in _consumed(graph):
            params.setdefault(tensor.name, tuple(tensor.dims))

    nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape":
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[:] = [renames.get(i, i) for i in node.input]
        new.output[:] = [renames.get(o, o) for o in node.output]
        if node.op_type == "Reshape":
            # Keep the batch: the shipped graph reshapes to a constant [1, 2048].
            new.input[1] = "flatten_shape"
        if node.op_type == "Softmax":
            del new.attribute[:]
            new.attribute.append(helper.make_attribute("axis", 1))
        nodes.append(new)

    initializers = [
        numpy_helper.from_array(_param_values(name, shape, rng), name)
        for name, shape in params.items()
    ]
    initializers.append(
        numpy_helper.from_array(np.array([-1, 2048], dtype=np.int64), "flatten_shape")
    )
    out = helper.make_graph(
        nodes,
        "resnet50",
        [helper.make_tensor_value_info("data", onnx.TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("prob", onnx.TensorProto.FLOAT, ["batch", 1000])],
        initializer=initializers,
    )
    return _seal(helper.make_model(out))


def _consumed(graph: object) -> set[str]:
    return {name for node in graph.node for name in node.input}  # type: ignore[attr-defined]


_GENERATORS: dict[str, Callable[[], bytes]] = {"tiny": tiny_onnx, "resnet50": resnet50_onnx}


def builtin_path(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Where the generated file for built-in ``name`` lives; generated on first use."""
    path = cache_dir / "models" / f"{name}-{_RECIPES[name]}.onnx"
    if not path.exists():
        write_atomic(path, _GENERATORS[name]())
    return path


def resolve(model: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> ModelSource:
    """A built-in name or a path to an .onnx file (served under the file's stem)."""
    if model in _RECIPES:
        path = builtin_path(model, cache_dir)
        return ModelSource(model, path, _sha256(path.read_bytes()), builtin=True)
    path = Path(model).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        known = ", ".join(BUILTIN)
        raise FileNotFoundError(
            f"model '{model}' is neither a built-in model ({known}) nor an existing .onnx file"
        )
    return ModelSource(path.stem, path.resolve(), _sha256(path.read_bytes()))
