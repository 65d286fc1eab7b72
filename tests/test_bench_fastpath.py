"""The saturation benchmark end to end, as short as it goes: every row of its table is there
and every ratio to the ceiling is a finite number, as is every scaling ratio of the replica
sweep, which deployed the replica counts it names; a kill counts when its replica died.
Timings are never asserted."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deployments.bench_fastpath import (
    PEER_MODE,
    FastpathSetup,
    kill_replica,
    run_fastpath,
)
from engines.models import builtin_path
from tests.serving import deploy, load, local_serve, replica_ids

pytestmark = pytest.mark.integration


def test_a_tiny_fastpath_run_has_every_row(cache_dir: Path) -> None:
    # Given as a path, as a user's own model is: the app serves it under the file's stem.
    setup = FastpathSetup(
        model=str(builtin_path("tiny", cache_dir)), cache_dir=str(cache_dir),
        concurrency=(1, 4), seconds=0.5, warmup_s=0.3,
        ceiling_batch_sizes=(1, 4), ceiling_threads=(1,), ceiling_seconds=0.2,
        breakdown_concurrency=4, recovery_concurrency=4, recovery_faults=("context",),
        context_requests=1, recovery_limit_s=30, replica_sweep=(2, 1),
    )
    lines: list[str] = []
    result = run_fastpath(setup, progress=lines.append)

    expected = {(m, b, c) for m in setup.modes for b in ("off", "on") for c in (1, 4)}
    expected |= {(PEER_MODE, "on", c) for c in (1, 4)}
    assert set(result.points) == expected
    for key, m in result.points.items():
        assert math.isfinite(result.ratio(m)) and result.ratio(m) > 0, key
    # Rows per execution, read from the answers' trails: one with batching off, at most the
    # callers with it on; a handle call's answer has no trail.
    for (mode, batching, c), m in result.points.items():
        if mode == "http binary" and batching == "off":
            assert m.mean_batch == 1.0, (mode, c)
        elif mode == "http binary":
            assert 1.0 <= m.mean_batch <= c, (mode, c, m.mean_batch)
        elif mode == "handle":
            assert math.isnan(m.mean_batch), (mode, c)
    # The replica's share of a request, from the trails, inside the attempt as the Router
    # timed it, inside the request's own time.
    for (mode, _, c), m in result.points.items():
        if mode.startswith("http"):
            assert 0 < m.replica_p50_ms <= m.router_p50_ms <= m.pct(50), (
                mode, c, m.replica_p50_ms, m.router_p50_ms)
        else:
            assert math.isnan(m.replica_p50_ms) and math.isnan(m.router_p50_ms), (mode, c)
    point_lines = [line for line in lines if line.startswith("  trtserve ")]
    assert point_lines and all("attempt p50 " in line and "(in replica " in line
                               for line in point_lines)
    table = result.table()
    assert len(table.splitlines()) == 3 + len(expected)  # header, rule, ceiling, the points
    assert [r.fault for r in result.recovery] == ["context"]
    recovery = result.recovery[0]
    assert recovery.injected >= 1 and len(recovery.affected_ms) >= 1
    # The attempt that met the fault is a part of its request's time, known for each.
    assert len(recovery.faulted_attempt_ms) == len(recovery.affected_ms)
    assert all(0 < f <= total for f, total in
               zip(recovery.faulted_attempt_ms, recovery.affected_ms, strict=True))
    assert "nan" not in result.recovery_table()
    assert "nan" not in result.breakdown()

    assert set(result.scaling) == {(m, c, n) for m in setup.modes for c in (1, 4)
                                   for n in (1, 2)}
    assert {n: len(devices) for n, devices in result.placements.items()} == {1: 1, 2: 2}
    scaling = result.scaling_table()
    assert "nan" not in scaling
    for mode in setup.modes:  # the smallest count is its own baseline
        [row] = [line for line in scaling.splitlines() if line.startswith(f"| {mode} | 4 | 1 |")]
        assert "| 1.00 |" in row, row


def test_a_kill_counts_when_the_replica_dies_not_when_its_crash_is_armed(cache_dir: Path
                                                                         ) -> None:
    # The bench once counted a kill when the arming call answered: under load the crash
    # often ends the process first, and a death went uncounted (12 seen, 7 counted on an
    # H100). Armed with nothing to execute, the crash waits and nothing has died.
    with local_serve():
        router = deploy(cache_dir)
        target = sorted(replica_ids())[0]
        assert not kill_replica(target, limit_s=2.0)
        assert target in replica_ids()
        with ThreadPoolExecutor(1) as pool:
            killed = pool.submit(kill_replica, target, 30.0)
            for _ in range(20):
                if killed.done():
                    break
                load(router, 50, in_flight=4)
            assert killed.result()
        assert target not in replica_ids()
