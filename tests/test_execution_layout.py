"""How many executions a replica runs at once, and on how many threads, where the app leaves
it to trtserve: several contexts on a GPU, one execution on a share of the cores on the CPU;
and how many Routers take the requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployments.app import MAX_AUTO_ROUTERS, auto_router_replicas
from deployments.config import AppArgs
from deployments.engine import GPU_POOL_SIZE, ReplicaCore, execution_layout
from engines.cuda import visible_device_count


def test_a_gpu_replica_overlaps_several_contexts_and_keeps_the_backends_threads() -> None:
    assert execution_layout("auto", None, 2, gpu_visible=True, cores=16) == (GPU_POOL_SIZE, None)
    assert execution_layout(2, 3, 2, gpu_visible=True, cores=16) == (2, 3)


def test_a_cpu_replica_runs_one_execution_on_its_share_of_the_cores() -> None:
    assert execution_layout("auto", None, 2, gpu_visible=False, cores=16) == (1, 8)
    assert execution_layout("auto", None, 2, gpu_visible=False, cores=2) == (1, 1)
    assert execution_layout("auto", None, 3, gpu_visible=False, cores=2) == (1, 1)  # never 0


def test_on_the_cpu_a_chosen_pool_shares_the_cores_and_chosen_threads_stay() -> None:
    assert execution_layout(4, None, 2, gpu_visible=False, cores=16) == (4, 2)
    assert execution_layout("auto", 6, 2, gpu_visible=False, cores=16) == (1, 6)


def test_routers_take_every_core_beyond_four_within_bounds() -> None:
    assert auto_router_replicas(2) == 1
    assert auto_router_replicas(4) == 1
    assert auto_router_replicas(16) == 12
    assert auto_router_replicas(256) == MAX_AUTO_ROUTERS


def test_pool_size_is_auto_or_at_least_one() -> None:
    assert AppArgs().pool_size == "auto"
    assert AppArgs(pool_size=3).engine_config()["pool_size"] == 3
    with pytest.raises(ValueError, match="pool_size must be 'auto'"):
        AppArgs(pool_size=0)


@pytest.mark.skipif(visible_device_count() > 0, reason="a GPU is visible: this checks the CPU")
def test_a_cpu_replica_core_applies_the_layout(cache_dir: Path) -> None:
    config = {**AppArgs(models=["tiny"], replicas=2, cache_dir=str(cache_dir)).engine_config()}
    core = ReplicaCore(config, "r1")
    try:
        runner = core.runners["tiny"]
        assert core.concurrency == 1 and runner.pool.size == 1
        sessions = runner.engine.inner.sessions.values()
        threads = {s.get_session_options().intra_op_num_threads for s in sessions}
        assert threads == {max(1, len(os.sched_getaffinity(0)) // 2)}
    finally:
        core.close()
