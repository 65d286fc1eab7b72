"""With ``replica_huge_pages`` (off by default) the engine replicas' processes start with
glibc's malloc on transparent huge pages: a replica that dies frees its memory before Ray can
report the death, and huge pages free about ten times faster than 4 KiB ones
(docs/benchmarks.md). Timings are never asserted; what is checked is that each replica's
process has the setting, that its heap is on huge pages where the host offers them, and that
by default the process is left as Ray starts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.app import HUGE_PAGES_ENV
from tests.serving import deploy, describe_all, local_serve

pytestmark = pytest.mark.integration

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in raw if b"=" in entry)


def _anon_huge_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _thp_offered() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def test_engine_replicas_run_on_huge_pages_when_asked(cache_dir: Path) -> None:
    [(name, value)] = HUGE_PAGES_ENV.items()
    with local_serve():
        deploy(cache_dir, replica_huge_pages=True)
        replicas = describe_all()
        assert len(replicas) == 2
        for r in replicas:
            assert _environ(r["pid"]).get(name) == value, r["replica_id"]
            if _thp_offered():
                assert _anon_huge_kb(r["pid"]) > 0, r["replica_id"]

        deploy(cache_dir)
        replicas = describe_all()
        assert len(replicas) == 2
        for r in replicas:
            assert name not in _environ(r["pid"]), r["replica_id"]
