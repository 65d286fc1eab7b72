"""The pure parts of deployments/metrics.py: failure reasons, the per-request log line, the
relabelling regex."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from deployments import metrics
from deployments.metrics import RELABEL_REGEX, SPECS, Request, log_request, reason
from engines.errors import (
    DeadlineExceeded,
    ExecutionError,
    InvalidInput,
    Overloaded,
    PoisonInput,
    ReplicaFailure,
    RetriesExhausted,
)

OK = {"model": "tiny", "outcome": "ok", "ms": 1.0, "replica": "b"}
FAILED = {"model": "tiny", "outcome": "DeviceFailure", "ms": 2.0, "replica": "a"}


@pytest.mark.parametrize(("error", "label"), [
    (Overloaded("full"), "REJECTED"),
    (asyncio.CancelledError(), "CANCELED"),
    (ExecutionError("bad"), "BACKEND"),
    (DeadlineExceeded("late"), "DEADLINE"),
    (PoisonInput("qod"), "POISON"),
    (RetriesExhausted("spent"), "EXHAUSTED"),
    (InvalidInput("shape"), "INVALID"),
    (ReplicaFailure("gone"), "OTHER"),
])
def test_failure_reasons(error: BaseException, label: str) -> None:
    assert reason(error) == label


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records]


def test_one_json_line_per_retried_or_failed_request_none_for_a_first_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    req = Request("tiny", "1", 2, "client-1")
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        log_request(req, "ok", [OK], 0.001)
        assert caplog.records == []
        log_request(req, "ok", [FAILED, OK], 0.004)
        log_request(req, "DeadlineExceeded", [], 0.002)
    retried, failed = _lines(caplog)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
    assert retried == {"event": "trtserve_request", "request_id": "client-1", "model": "tiny",
                       "version": "1", "outcome": "ok", "total_ms": 4.0,
                       "attempts": [FAILED, OK]}
    assert failed["outcome"] == "DeadlineExceeded" and failed["attempts"] == []


def test_the_relabelling_restores_every_name() -> None:
    for spec in SPECS:
        exported = {"counter": [f"ray_{spec.name}_total"], "gauge": [f"ray_{spec.name}"],
                    "histogram": [f"ray_{spec.name}_{s}" for s in ("bucket", "sum", "count")]}
        for name in exported[spec.kind]:
            restored = re.fullmatch(RELABEL_REGEX, name)
            assert restored is not None, name
            assert restored.group(1) == name[4:].removesuffix("_total"), name


class _Recorded:
    """Where a Tally's calls land in these tests, in place of Ray's exporter."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))


def test_a_tally_records_sums_and_last_values_once_a_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "FLUSH_S", 0.01)
    counter, gauge = _Recorded(), _Recorded()
    tally = metrics.Tally({"c": counter, "g": gauge})  # type: ignore[dict-item]

    async def traffic() -> None:
        for i in range(100):
            tally.inc("c", 2.0, {"model": "tiny"})
            tally.inc("c", tags={"model": "other"})
            tally.set("g", i, {"model": "tiny"})
        assert counter.calls == gauge.calls == []  # nothing recorded per call
        for _ in range(200):
            await asyncio.sleep(0.01)
            if counter.calls:
                break

    asyncio.run(traffic())
    assert sorted(counter.calls, key=str) == [("inc", 100.0, {"model": "other"}),
                                              ("inc", 200.0, {"model": "tiny"})]
    assert gauge.calls == [("set", 99, {"model": "tiny"})]


def test_a_tally_keeps_recording_in_a_later_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "FLUSH_S", 0.01)
    counter = _Recorded()
    tally = metrics.Tally({"c": counter})  # type: ignore[dict-item]

    async def count_until_recorded(n: int) -> None:
        tally.inc("c", float(n), {"model": "tiny"})
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(counter.calls) == n:
                return

    asyncio.run(count_until_recorded(1))
    asyncio.run(count_until_recorded(2))
    assert counter.calls == [("inc", 1.0, {"model": "tiny"}), ("inc", 2.0, {"model": "tiny"})]
