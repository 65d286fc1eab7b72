"""The benchmarks' load generator on a real local Ray cluster: one generator process runs
load point after load point, whatever event loop Serve's handles are bound to, and its
handle calls by value go by value."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from deployments.app import APP_NAME
from deployments.loadgen import LoadGenerator, Target, app_handle
from engines import models
from engines.backend import load_engine

from .serving import X, deploy, local_serve

pytestmark = pytest.mark.integration


def test_handle_calls_keep_working_from_one_load_point_to_the_next(
    cache_dir: Path, tiny: models.ModelSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_engine(tiny, "onnxruntime").spec
    with local_serve():
        deploy(cache_dir, replicas=1)
        # Read by the spawned generator processes (Ray's import reads it): their handles then
        # route on the caller's own event loop, as under RAY_SERVE_THROUGHPUT_OPTIMIZED=1.
        monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
        with LoadGenerator(1, ray.get_runtime_context().gcs_address) as gen:
            for seed in (0, 1):
                m = gen.run(Target("handle", "tiny", APP_NAME), spec, 2, warmup_s=0.2,
                            seconds=0.5, seed=seed)
                assert m.failed == 0 and len(m.latency_ms) > 0, (seed, m.failed)


def test_handle_calls_by_value_go_through_serves_grpc(
    cache_dir: Path, tiny: models.ModelSource
) -> None:
    spec = load_engine(tiny, "onnxruntime").spec
    with local_serve():
        deploy(cache_dir, replicas=1)
        for kind, by_reference in (("handle", True), ("handle_by_value", False)):
            response = app_handle(Target(kind, "tiny", APP_NAME)).infer.remote("tiny", X)
            assert response.by_reference is by_reference, kind
            assert set(response.result()) == {"logits", "probs"}
        with LoadGenerator(1, ray.get_runtime_context().gcs_address) as gen:
            m = gen.run(Target("handle_by_value", "tiny", APP_NAME), spec, 2, warmup_s=0.2,
                        seconds=0.5, seed=0)
        assert m.failed == 0 and len(m.latency_ms) > 0, m.failed
