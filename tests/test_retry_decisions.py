"""The retry path's decisions, on replica ids and taxonomy errors alone: which replicas a
request may go to, when to answer at once, what a timeout or a death means, queries of
death, overload, deadlines, stale specs, and Ray's errors unwrapped. No cluster needed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from deployments.catalogue import ModelCatalogue
from deployments.policy import (
    Ejections,
    PoisonedInputs,
    RequestRetries,
    RetryBudget,
    RetryPolicy,
)
from deployments.ray_errors import failed_attempt, outcome
from deployments.routing import by_own_load, eligible
from engines.errors import (
    ContextFailure,
    DeadlineExceeded,
    DeviceFailure,
    Overloaded,
    PoisonInput,
    ReplicaFailure,
    RetriesExhausted,
    UnknownModel,
)
from engines.spec import IOSpec, TensorSpec


def _retries(now: float | None = None, **policy: object) -> RequestRetries:
    now = time.monotonic() if now is None else now
    p = RetryPolicy.from_dict(policy)
    return RequestRetries(p, RetryBudget.for_policy(p), Ejections(), now + p.deadline_s, "m")


# --- eligible: replica ids in, replica ids out -----------------------------------------------

def test_excluded_replicas_are_never_eligible() -> None:
    assert eligible(["a", "b", "c"], ["a", "b", "c"], ["a"], [], None) == ["b", "c"]
    assert eligible(["a", "b"], ["a", "b"], ["a", "b"], [], None) == []


def test_capacity_comes_before_the_ejection_preference() -> None:
    # b is not ejected but full; a is ejected and has room: a, rather than waiting for b.
    assert eligible(["a", "b"], ["a"], [], ["a"], None) == ["a"]
    # With room on both, the ejected one is avoided.
    assert eligible(["a", "b"], ["a", "b"], [], ["a"], None) == ["b"]


def test_when_every_allowed_replica_looks_full_serve_probes_them_all() -> None:
    assert eligible(["a", "b", "c"], [], ["c"], ["a"], None) == ["a", "b"]


def test_a_target_is_the_only_candidate() -> None:
    assert eligible(["a", "b"], ["a", "b"], [], [], "b") == ["b"]
    assert eligible(["a", "b"], ["a", "b"], [], [], "gone") == []


def test_the_replicas_with_fewest_own_attempts_in_flight_are_tried_first() -> None:
    # b has just answered this process's attempt: it comes before a, still busy with one.
    assert by_own_load(["a", "b"], {"a": 1}, {}) == [["b"], ["a"]]
    ranks = by_own_load(["a", "b", "c", "d"], {"a": 2, "b": 1}, {})
    assert sorted(ranks[0] + ranks[1]) == ["c", "d"] and ranks[2:] == [["b"], ["a"]]


def test_of_two_picked_at_random_the_shorter_cached_queue_comes_first_alone() -> None:
    # One replica alone in the first rank: the attempt is counted there before it is sent.
    lens = {"a": 3, "b": 1, "c": 2}
    seen = set()
    for _ in range(200):
        first, second = by_own_load(["a", "b", "c"], {}, lens)
        assert len(first) == len(second) == 1 and lens[first[0]] <= lens[second[0]]
        seen.add((first[0], second[0]))
    assert seen == {("b", "a"), ("c", "a"), ("b", "c")}


def test_a_replica_with_no_cached_queue_length_is_not_passed_over() -> None:
    # A replacement has no entry yet: counted as empty, it wins and Serve probes it.
    assert by_own_load(["old", "new"], {}, {"old": 1, "new": None})[0] == ["new"]


# --- answering at once -------------------------------------------------------------------------

def test_a_request_that_failed_on_every_live_replica_is_answered_at_once() -> None:
    r = _retries(max_attempts=3)
    r.before_attempt(frozenset({"a", "b"}))
    r.after_failure(ContextFailure("1"), "a")
    r.before_attempt(frozenset({"a", "b"}))
    r.after_failure(ContextFailure("2"), "b")
    # max_attempts (3) would allow a third attempt; nothing is left to take it.
    with pytest.raises(RetriesExhausted, match="no healthy replica left.*a, b"):
        r.before_attempt(frozenset({"a", "b"}))
    r.before_attempt(frozenset({"a", "b", "c"}))  # a new replica came up: try it
    r.before_attempt(None)  # unknown: no verdict


# --- timeouts, deaths, queries of death --------------------------------------------------------

def test_a_timed_out_attempt_excludes_the_replica_but_ejects_it_for_nobody() -> None:
    r = _retries()
    r.after_failure(ReplicaFailure("slow"), "a", timed_out=True)
    assert r.exclude_now() == ["a"]
    assert r.ejections.current() == frozenset()


def test_an_unavailable_replica_is_ejected_but_is_no_sign_of_poison() -> None:
    r = _retries(max_attempts=5)
    r.after_failure(ReplicaFailure("gone"), "a")
    r.after_failure(DeviceFailure("sticky"), "b")
    assert r.ejections.current() == {"a", "b"}
    assert r.broke_on == 1


@pytest.mark.parametrize("second", ["device", "died"])
def test_two_replicas_broken_under_one_request_make_it_a_query_of_death(second: str) -> None:
    r = _retries(max_attempts=5)
    r.after_failure(DeviceFailure("sticky", trail=[{"outcome": "DeviceFailure"}]), "a")
    with pytest.raises(PoisonInput, match="two replicas broke") as caught:
        if second == "device":
            r.after_failure(DeviceFailure("sticky again"), "b")
        else:
            r.after_failure(ReplicaFailure("died"), "b", died=True)
    assert caught.value.http_status == 422
    assert caught.value.trail[0] == {"outcome": "DeviceFailure"}


def test_identical_inputs_are_refused_for_the_window_and_nothing_else_is() -> None:
    poisoned = PoisonedInputs()
    bad = {"x": np.arange(16, dtype=np.float32).reshape(1, 16)}
    poisoned.add("m", bad, seconds=10, now=100)
    assert poisoned.refused("m", {"x": bad["x"].copy()}, now=105)
    assert not poisoned.refused("other", bad, now=105)
    assert not poisoned.refused("m", {"x": bad["x"] + 1}, now=105)
    assert not poisoned.refused("m", {"x": bad["x"].astype(np.float64)}, now=105)
    assert not poisoned.refused("m", bad, now=111)  # the window passed


def test_inputs_are_not_hashed_while_no_query_of_death_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poisoned = PoisonedInputs()
    calls = []
    real = PoisonedInputs.fingerprint
    monkeypatch.setattr(PoisonedInputs, "fingerprint",
                        staticmethod(lambda m, i: calls.append(m) or real(m, i)))
    assert not poisoned.refused("m", {"x": np.zeros(4, np.float32)})
    assert calls == []
    poisoned.add("m", {"x": np.ones(4, np.float32)}, seconds=10)
    assert not poisoned.refused("m", {"x": np.zeros(4, np.float32)})
    assert len(calls) == 2


# --- overload and deadlines --------------------------------------------------------------------

def test_backpressure_waits_then_sheds_the_request() -> None:
    r = _retries(now=0.0, backpressure_wait_s=1.0, backoff_max_s=0.25)
    assert 0 <= r.after_backpressure(now=0.0) <= 0.25
    assert 0 <= r.after_backpressure(now=0.9) <= 0.1 + 1e-9
    with pytest.raises(Overloaded, match="queue stayed full"):
        r.after_backpressure(now=1.0)


def test_backpressure_never_waits_past_the_deadline() -> None:
    r = _retries(now=0.0, deadline_s=0.5, backpressure_wait_s=1.0)
    with pytest.raises(DeadlineExceeded):
        r.after_backpressure(now=0.6)


def test_a_requested_deadline_is_capped_server_side() -> None:
    p = RetryPolicy(max_deadline_s=300)
    assert p.deadline_for(2.0**64 / 1e6) == 300
    assert p.deadline_for(None) == 30
    assert p.deadline_for(2.5) == 2.5
    with pytest.raises(DeadlineExceeded, match="not > 0"):
        p.deadline_for(0)


# --- Ray's errors ------------------------------------------------------------------------------

def _as_ray_raises_it(cause: BaseException) -> BaseException:
    """What Ray raises in the caller for an exception raised in a replica."""
    trace = "Traceback (most recent call last): ..."
    return RayTaskError("infer", trace, cause).as_instanceof_cause()


def test_an_error_from_a_replica_keeps_its_taxonomy_name_and_gets_the_chosen_replica() -> None:
    raised = _as_ray_raises_it(DeviceFailure("sticky"))
    assert isinstance(raised, DeviceFailure)  # both classes at once: the trap
    failed = failed_attempt(raised, "r7")
    assert type(failed.error) is DeviceFailure
    assert failed.error.replica_id == "r7"
    assert outcome(raised) == "DeviceFailure"


def test_a_replica_that_ran_out_of_the_attempts_time_is_a_timeout_not_the_end() -> None:
    raised = _as_ray_raises_it(DeadlineExceeded("late", trail=[{"outcome": "DeadlineExceeded"}]))
    failed = failed_attempt(raised, "r1")
    assert isinstance(failed.error, ReplicaFailure) and failed.timed_out
    assert failed.error.trail == [{"outcome": "DeadlineExceeded"}]


def test_a_death_and_an_unavailable_replica_are_told_apart() -> None:
    died = failed_attempt(ActorDiedError(), "r1")
    assert died.died and isinstance(died.error, ReplicaFailure)
    gone = failed_attempt(ReplicaUnavailableError("r2 is gone"), "r2")
    assert not gone.died and not gone.timed_out


# --- the model catalogue -----------------------------------------------------------------------

def _report(model: str) -> dict:
    spec = IOSpec((TensorSpec("x", np.float32, (-1, 4)),), (TensorSpec("y", np.float32, (-1,)),))
    return {"models": {model: {"version": "1", "backend": "onnxruntime", "spec": spec,
                               "batching": {"batch_size": 8}, "concurrency": 2}}}


def test_specs_are_asked_again_when_the_replicas_change() -> None:
    answers = iter([_report("old"), _report("new")])
    asked = []
    live = {"ids": frozenset({"a", "b"})}

    async def describe() -> dict:
        asked.append(1)
        return next(answers)

    async def scenario() -> None:
        catalogue = ModelCatalogue(describe, lambda: live["ids"])
        assert (await catalogue.model("old")).name == "old"
        assert (await catalogue.model("old")).name == "old"
        assert len(asked) == 1  # cached while the replicas stay
        live["ids"] = frozenset({"c", "d"})  # redeployed
        assert (await catalogue.model("new")).name == "new"
        with pytest.raises(UnknownModel, match="no model 'old'"):
            await catalogue.model("old")

    asyncio.run(scenario())
