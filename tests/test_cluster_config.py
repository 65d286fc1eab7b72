"""cluster.yaml, checked by the Ray cluster launcher's own schema (no cloud is reached)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


def _config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_up_accepts_cluster_yaml() -> None:
    validate_config(prepare_config(_config()))


def test_a_misspelt_key_would_be_refused() -> None:
    broken = copy.deepcopy(_config())
    broken["available_node_types"]["gpu_worker"]["node_confg"] = {}
    with pytest.raises(jsonschema.ValidationError, match="node_confg"):
        validate_config(prepare_config(broken))


def test_gpus_are_on_the_workers_and_the_checkout_reaches_every_node() -> None:
    config = _config()
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["GPU"] == 0
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    assert nodes["gpu_worker"]["min_workers"] >= 2  # a replica to retry on
    assert config["file_mounts"] == {"~/trtserve": "."}
