"""cluster.yaml, checked by the Ray cluster launcher's own schema (no cloud is reached)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from deployments.ray_config import SYSTEM_CONFIG

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"
README = Path(__file__).parent.parent / "README.md"


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


def test_the_head_and_the_readmes_serve_run_carry_trtserves_ray_settings() -> None:
    (head,) = [c for c in _config()["head_start_ray_commands"] if "ray start" in c]
    found = re.search(r"--system-config='([^']*)'", head)
    assert found and json.loads(found.group(1)) == SYSTEM_CONFIG
    serve_run = next(line for line in README.read_text().splitlines() if "serve run" in line)
    for name, value in SYSTEM_CONFIG.items():
        assert f"RAY_{name}={value} " in serve_run
