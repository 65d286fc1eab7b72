"""The chaos harness itself, in a short run: it drives both paths and logs its faults, and
trtserve's path loses nothing to context faults (a burst of 3 outlasts local_retries=2, so
the Router must go to another replica). It serves resnet50, whose batches are handed to the
replicas in shared memory (handoff.py), as ``trtserve chaos --model resnet50`` does."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.chaos import PATHS, run

from .serving import local_serve

pytestmark = pytest.mark.integration


def test_a_short_chaos_run_loses_nothing_through_the_router(cache_dir: Path) -> None:
    with local_serve():
        result = run(str(cache_dir), replicas=2, seconds=8, callers=2, every_s=2,
                     kinds=["context"], seed=0, progress=lambda _: None, model="resnet50")
    assert len(result.faults) >= 2
    trtserve = result.outcomes["trtserve"].totals()
    assert trtserve["ok"] > 0 and sum(trtserve.values()) == trtserve["ok"], trtserve
    assert result.outcomes[PATHS[1]].totals()["ok"] > 0
    table = result.table()
    assert all(f"| {path} |" in table for path in PATHS)
