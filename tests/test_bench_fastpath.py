"""The saturation benchmark end to end, as short as it goes: every row of its table is there
and every ratio to the ceiling is a finite number. Timings are never asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from deployments.bench_fastpath import (
    MODES,
    PEER_MODE,
    FastpathSetup,
    run_fastpath,
)

pytestmark = pytest.mark.integration


def test_a_tiny_fastpath_run_has_every_row(cache_dir: Path) -> None:
    setup = FastpathSetup(
        cache_dir=str(cache_dir), concurrency=(1, 4), seconds=0.5, warmup_s=0.3,
        ceiling_batch_sizes=(1, 4), ceiling_threads=(1,), ceiling_seconds=0.2,
        breakdown_concurrency=4, recovery_concurrency=4, recovery_faults=("context",),
        context_requests=1, recovery_limit_s=30,
    )
    result = run_fastpath(setup, progress=lambda _: None)

    expected = {(m, b, c) for m in MODES for b in ("off", "on") for c in (1, 4)}
    expected |= {(PEER_MODE, "on", c) for c in (1, 4)}
    assert set(result.points) == expected
    for key, m in result.points.items():
        assert math.isfinite(result.ratio(m)) and result.ratio(m) > 0, key
    table = result.table()
    assert len(table.splitlines()) == 3 + len(expected)  # header, rule, ceiling, the points
    assert [r.fault for r in result.recovery] == ["context"]
    assert result.recovery[0].injected >= 1
    assert "nan" not in result.breakdown()
