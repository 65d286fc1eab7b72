"""Built-in models: generated, seeded, byte-identical; ONNX paths as models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines import models
from engines.backend import LoadOptions, load_engine
from engines.spec import DYNAMIC

# The sha256 of the tiny model's file. Pinned so that a change in the generator (or in how
# the installed onnx serializes) shows up here, not as a silent plan-cache miss elsewhere.
TINY_SHA256 = "fbd0313b1217a254582c8a7c213d0b1832ccffda769cee94eb9303c16072c5eb"


def test_tiny_is_byte_identical_every_time(tiny: models.ModelSource) -> None:
    assert models.tiny_onnx() == models.tiny_onnx()
    assert hashlib.sha256(models.tiny_onnx()).hexdigest() == TINY_SHA256
    assert tiny.sha256 == TINY_SHA256


def test_resnet50_is_byte_identical_every_time(resnet50: models.ModelSource) -> None:
    assert hashlib.sha256(models.resnet50_onnx()).hexdigest() == resnet50.sha256


def test_resnet50_has_random_weights_and_a_dynamic_batch(resnet50: models.ModelSource) -> None:
    model = onnx.load(str(resnet50.path))
    assert [i.name for i in model.graph.input] == ["data"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    conv1 = next(t for t in model.graph.initializer if t.name == "gpu_0/conv1_w_0")
    weights = onnx.numpy_helper.to_array(conv1)
    assert weights.shape == (64, 3, 7, 7)
    assert len(np.unique(weights)) > 9000  # seeded random, not the shipped constant 0.02


def test_builtin_names() -> None:
    assert models.BUILTIN == ("tiny", "resnet50")


def test_an_onnx_path_is_a_model_named_by_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "scorer.onnx"
    path.write_bytes(models.tiny_onnx())
    source = models.resolve(str(path))
    assert source.name == "scorer"
    engine = load_engine(source, "onnxruntime")
    assert engine.spec.input_names == ("x",)


def test_unknown_model_says_what_it_accepts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tiny, resnet50"):
        models.resolve(str(tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        models.resolve("resnet51")


def test_max_batch_is_unbounded_unless_configured(tiny: models.ModelSource) -> None:
    assert load_engine(tiny, "onnxruntime").spec.max_batch is None
    engine = load_engine(tiny, "onnxruntime", LoadOptions(max_batch=8))
    assert engine.spec.max_batch == 8
    assert engine.spec.inputs[0].shape == (DYNAMIC, 16)


def test_trtserve_models_prints_one_name_per_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "models"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["tiny", "resnet50"]
