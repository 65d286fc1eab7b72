"""The retry policy in plain Python: decisions, budget, ejections, deadlines."""

from __future__ import annotations

import random
import time

import pytest

from deployments.policy import Ejections, RequestRetries, RetryBudget, RetryPolicy
from engines.errors import (
    ContextFailure,
    DeadlineExceeded,
    DeviceFailure,
    InvalidInput,
    ReplicaFailure,
    RetriesExhausted,
)


def test_defaults_are_the_documented_ones() -> None:
    p = RetryPolicy()
    assert (p.local_retries, p.max_attempts, p.deadline_s, p.attempt_timeout_s) == (2, 3, 30, 5)
    assert (p.budget_ratio, p.budget_window_s, p.budget_min_per_s) == (0.2, 10, 10)


def test_unknown_or_invalid_knobs_are_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown retry setting\(s\) \['retires'\]"):
        RetryPolicy.from_dict({"retires": 3})
    with pytest.raises(ValueError, match="deadline_s must be > 0"):
        RetryPolicy.from_dict({"deadline_s": 0})
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        RetryPolicy(max_attempts=0)
    assert RetryPolicy.from_dict({"max_attempts": 5}).max_attempts == 5


def test_backoff_has_full_jitter_under_a_growing_cap() -> None:
    p = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.1)
    rng = random.Random(1)
    draws = [p.backoff_s(0, rng) for _ in range(200)]
    assert all(0 <= d <= 0.01 for d in draws) and len(set(draws)) > 100
    assert all(0 <= p.backoff_s(20, rng) <= 0.1 for _ in range(200))
    assert max(p.backoff_s(3, rng) for _ in range(500)) > 0.05  # the cap grew to 0.08


def test_budget_allows_a_floor_plus_a_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, window_s=10, min_per_s=1)
    for i in range(100):
        budget.record_request(now=i * 0.01)
    assert budget.allowed(now=1.0) == pytest.approx(0.2 * 100 + 1 * 10)
    spent = sum(budget.try_spend(now=1.0) for _ in range(100))
    assert spent == 30
    # Eleven seconds later the window holds nothing: only the floor is left.
    assert budget.allowed(now=12.0) == pytest.approx(10)
    assert sum(budget.try_spend(now=12.0) for _ in range(100)) == 10


def test_ejections_expire() -> None:
    ej = Ejections()
    ej.eject("a", 5, now=100)
    ej.eject("b", 1, now=100)
    assert ej.current(now=100.5) == {"a", "b"}
    assert ej.current(now=102) == {"a"}
    assert ej.current(now=106) == frozenset()


def _retries(now: float = 0.0, **policy: object) -> RequestRetries:
    p = RetryPolicy.from_dict(policy)
    return RequestRetries(p, RetryBudget.for_policy(p), Ejections(), now + p.deadline_s, "m")


def _trail(replica: str, outcome: str) -> list[dict[str, object]]:
    return [{"model": "m", "replica": replica, "outcome": outcome, "ms": 1.0}]


def test_a_context_failure_moves_on_without_ejecting() -> None:
    r = _retries(time.monotonic())
    r.after_failure(ContextFailure("spent", trail=_trail("a", "ContextFailure")), "a")
    assert r.exclude_now() == ["a"]
    assert r.ejections.current() == frozenset()
    assert r.trail == _trail("a", "ContextFailure")


@pytest.mark.parametrize("error", [DeviceFailure("sticky"), ReplicaFailure("died")])
def test_device_and_replica_failures_eject_for_everyone(error: Exception) -> None:
    r = _retries(time.monotonic(), eject_s=30)
    r.after_failure(error, "a")  # type: ignore[arg-type]
    assert "a" in r.ejections.current()
    other = RequestRetries(r.policy, r.budget, r.ejections, r.deadline, "m")
    assert other.ejected_now() == ["a"]  # another request avoids it too
    assert other.exclude_now() == []  # but may still use it when nothing else is left


def test_invalid_input_is_never_retried_and_keeps_the_trail() -> None:
    r = _retries(time.monotonic())
    r.after_failure(ContextFailure("x", trail=_trail("a", "ContextFailure")), "a")
    with pytest.raises(InvalidInput) as caught:
        r.after_failure(InvalidInput("bad", trail=_trail("b", "InvalidInput")), "b")
    assert [a["replica"] for a in caught.value.trail] == ["a", "b"]


def test_attempts_run_out_after_max_attempts_distinct_replicas() -> None:
    r = _retries(time.monotonic(), max_attempts=3)
    r.after_failure(ContextFailure("1"), "a")
    r.after_failure(DeviceFailure("2"), "b")
    with pytest.raises(RetriesExhausted, match="3 replica.s. failed this request; last: "
                                               "ReplicaFailure: 3"):
        r.after_failure(ReplicaFailure("3"), "c")


def test_a_spent_budget_stops_retries() -> None:
    r = _retries(time.monotonic(), budget_ratio=0, budget_min_per_s=0, max_attempts=5)
    with pytest.raises(RetriesExhausted, match="retry budget spent"):
        r.after_failure(ContextFailure("1"), "a")


def test_the_deadline_ends_the_request() -> None:
    r = _retries(now=-1000.0, deadline_s=1)  # its deadline passed long ago
    assert r.attempt_timeout_s() == 0
    with pytest.raises(DeadlineExceeded, match="deadline passed after 1 failed attempt"):
        r.after_failure(ContextFailure("1"), "a")


def test_the_attempt_timeout_never_passes_the_deadline() -> None:
    r = _retries(time.monotonic(), deadline_s=2, attempt_timeout_s=5)
    assert 0 < r.attempt_timeout_s() <= 2
    assert _retries(time.monotonic(), attempt_timeout_s=5).attempt_timeout_s() == 5


def test_a_final_error_raised_by_the_request_keeps_its_trail_once() -> None:
    r = _retries(time.monotonic())
    r.after_failure(ContextFailure("x", trail=_trail("a", "ContextFailure")), "a")
    final = r.no_replica()
    with pytest.raises(RetriesExhausted) as caught:
        r.after_failure(final, None)
    assert caught.value.trail == _trail("a", "ContextFailure")
    assert "failed this request: a" in caught.value.message
