"""The pure parts of deployments/metrics.py: failure reasons, the per-request log line, the
relabelling regex."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

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
