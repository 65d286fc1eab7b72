"""Attempts over a replica's lane (deployments/lane.py): a call answered with its result or
its own error, a cancel that reaches the run, a replica past its limit refusing, a closed
replica ending its calls at once; and on a real local Ray cluster, a Router sending its
attempts that way once the lanes are open."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import serve

from deployments import lane
from deployments.app import APP_NAME
from deployments.attempts import AttemptLoop
from deployments.lane import Full, Lane, LaneClosed, Lanes, LaneServer
from deployments.policy import Ejections, RequestRetries, RetryBudget, RetryPolicy
from deployments.routed import Routed
from engines.errors import ContextFailure, PoisonInput, ReplicaFailure
from engines.models import tiny_reference

from .serving import (
    deploy,
    deploy_config,
    describe_all,
    engine,
    inject,
    local_serve,
    replica_ids,
    varied_inputs,
    wait_until,
)

pytestmark = pytest.mark.skipif(not lane.available(),
                                reason="needs Linux: abstract Unix sockets and SO_PEERCRED")

_ids = itertools.count()


class Replica:
    """A stand-in for EngineReplica.infer on the far end of a real socket: it answers, fails,
    or holds a call until released, and records what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0
        self.started = asyncio.Event()

    async def infer(self, model: str, inputs: dict[str, np.ndarray], **kwargs: Any) -> Any:
        if model == "fails":
            raise ContextFailure("bad context", replica_id="r")
        if model == "unpicklable":
            return {"y": lambda: None}, []
        if model == "unreadable":
            return {"y": Unreadable()}, []
        if model == "holds":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return {"y": inputs["x"] * 2}, [{"kwargs": kwargs}]


def _refuse_to_load() -> None:
    raise ImportError("no module named 'trtserve_next'")


class Unreadable:
    """Pickles, but cannot be read back: what one end sees of a class that only the other
    end's version of the code has (a rolling update)."""

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _refuse_to_load, ()


Scenario = Callable[[Replica, LaneServer, Lane], Awaitable[None]]


def _run(scenario: Scenario) -> None:
    """``scenario`` on one event loop, with a replica's lane served and this process's lane
    to it open."""

    async def main() -> None:
        replica_id = f"test-{os.getpid()}-{next(_ids)}"
        replica = Replica()
        server = LaneServer(replica_id, replica.infer, limit=lambda: 2, others=lambda: 0)
        lanes = Lanes()
        try:
            await _open(lanes, replica_id)
            await scenario(replica, server, lanes.lane(replica_id))
        finally:
            server.close()

    asyncio.run(main())


async def _open(lanes: Lanes, *replica_ids: str) -> None:
    for _ in range(500):
        if lanes.open_for(frozenset(replica_ids)):
            return
        await asyncio.sleep(0.01)
    pytest.fail("the lane never opened")


def test_a_call_is_answered_with_its_result_and_the_replica_sees_its_arguments() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        outputs, trail = await one.call("m", {"x": x}, deadline_s=1.5)
        np.testing.assert_array_equal(outputs["y"], x * 2)
        assert trail == [{"kwargs": {"deadline_s": 1.5}}]
        assert server.calls == 1
        assert one.ongoing == 0

    _run(scenario)


def test_the_replicas_error_comes_back_as_itself() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        with pytest.raises(ContextFailure, match="bad context") as caught:
            await one.call("fails", {"x": np.zeros(1)})
        assert caught.value.replica_id == "r"

    _run(scenario)


def test_an_answer_that_cannot_be_sent_still_ends_the_call() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        with pytest.raises(RuntimeError, match="unpicklable answer"):
            await asyncio.wait_for(one.call("unpicklable", {"x": np.zeros(1)}), 5)
        assert server.ongoing == 0

    _run(scenario)


def test_an_answer_this_end_cannot_read_fails_that_call_alone_and_the_lane_stays_open() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        held = one.call("holds", {"x": np.zeros(1)})
        await replica.started.wait()
        with pytest.raises(RuntimeError, match="cannot be read here.*trtserve_next"):
            await asyncio.wait_for(one.call("unreadable", {"x": np.zeros(1)}), 5)
        assert one.open
        replica.release.set()
        outputs, _ = await asyncio.wait_for(held, 5)
        np.testing.assert_array_equal(outputs["y"], np.zeros(1))

    _run(scenario)


def test_a_call_the_replica_cannot_read_fails_alone_and_the_lane_stays_open() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        with pytest.raises(RuntimeError, match="cannot read this call.*trtserve_next"):
            await asyncio.wait_for(one.call("m", {"x": Unreadable()}), 5)
        assert one.open
        outputs, _ = await asyncio.wait_for(one.call("m", {"x": np.ones(2)}), 5)
        np.testing.assert_array_equal(outputs["y"], np.full(2, 2.0))

    _run(scenario)


def test_a_cancel_reaches_the_run_in_the_replica() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        call = one.call("holds", {"x": np.zeros(1)})
        await asyncio.wait_for(replica.started.wait(), 5)
        # As the attempt loop does: its task's timeout cancels what it awaits first.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call, 0.05)
        call.cancel()
        for _ in range(500):
            if replica.cancelled:
                break
            await asyncio.sleep(0.01)
        assert replica.cancelled == 1
        assert server.ongoing == 0

    _run(scenario)


def test_past_its_limit_the_replica_refuses_at_once() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        held = [one.call("holds", {"x": np.zeros(1)}) for _ in range(2)]
        await asyncio.wait_for(replica.started.wait(), 5)
        with pytest.raises(Full):
            await asyncio.wait_for(one.call("m", {"x": np.zeros(1)}), 5)
        assert one.ongoing == 2
        replica.release.set()
        for call in held:
            await asyncio.wait_for(call, 5)

    _run(scenario)


def test_serves_calls_in_flight_count_against_the_lanes_limit() -> None:
    async def main() -> None:
        replica_id = f"test-{os.getpid()}-{next(_ids)}"
        replica = Replica()
        serve_calls = [1]
        server = LaneServer(replica_id, replica.infer, limit=lambda: 2,
                            others=lambda: serve_calls[0])
        lanes = Lanes()
        try:
            await _open(lanes, replica_id)
            one = lanes.lane(replica_id)
            held = one.call("holds", {"x": np.zeros(1)})
            await asyncio.wait_for(replica.started.wait(), 5)
            with pytest.raises(Full):  # one lane call and one of Serve's: the limit of 2
                await asyncio.wait_for(one.call("m", {"x": np.zeros(1)}), 5)
            assert one.ongoing == 2  # the replica's whole load, as the Router ranks it
            serve_calls[0] = 0
            outputs, _ = await asyncio.wait_for(one.call("m", {"x": np.ones(1)}), 5)
            np.testing.assert_array_equal(outputs["y"], np.full(1, 2.0))
            replica.release.set()
            await asyncio.wait_for(held, 5)
        finally:
            server.close()

    asyncio.run(main())


def test_after_full_a_replica_with_room_is_chosen_and_the_full_one_again_later(
) -> None:
    async def main() -> None:
        full_id, free_id = (f"test-{os.getpid()}-{next(_ids)}" for _ in range(2))
        full, free = Replica(), Replica()
        servers = [LaneServer(full_id, full.infer, limit=lambda: 1, others=lambda: 0),
                   LaneServer(free_id, free.infer, limit=lambda: 1, others=lambda: 0)]
        lanes = Lanes()
        both = frozenset({full_id, free_id})
        try:
            await _open(lanes, full_id, free_id)
            held = lanes.lane(full_id).call("holds", {"x": np.zeros(1)})
            await asyncio.wait_for(full.started.wait(), 5)
            with pytest.raises(Full):
                await asyncio.wait_for(lanes.lane(full_id).call("m", {"x": np.zeros(1)}), 5)
            # Full from the point of view of this process's count: it has an attempt in
            # flight on the free replica and none on the full one, which the request
            # router's rules (own load first) would choose every time.
            async with Routed(10.0, lambda: 10.0) as routed:
                routed.sent_to(free_id)
                assert {lanes.choose(both, (), ()) for _ in range(50)} == {free_id}
                # Nothing else allowed: the full one, to wait on as for Serve's backpressure.
                assert lanes.choose(both, (free_id,), ()) == full_id
                # The Full is only as fresh as the replica's last answer; later own load
                # decides again.
                await asyncio.sleep(lane.FULL_FOR_S * 1.5)
                assert lanes.choose(both, (), ()) == full_id
            full.release.set()
            await asyncio.wait_for(held, 5)
        finally:
            for server in servers:
                server.close()

    asyncio.run(main())


def test_a_replica_being_stopped_refuses_new_calls_as_unavailable() -> None:
    async def scenario(replica: Replica, server: LaneServer, one: Lane) -> None:
        held = one.call("holds", {"x": np.zeros(1)})
        await asyncio.wait_for(replica.started.wait(), 5)
        server.close()  # as Serve's stop does, through EngineReplica.__del__
        with pytest.raises(ReplicaFailure, match="is stopping"):
            await asyncio.wait_for(one.call("m", {"x": np.zeros(1)}), 5)
        replica.release.set()
        outputs, _ = await asyncio.wait_for(held, 5)  # what it held goes on
        assert outputs["y"].shape == (1,)

    _run(scenario)


def test_a_replica_serve_stopped_under_attempts_is_unavailable_not_broken() -> None:
    """Serve stops routing to a replica before it stops it, and waits only for its own
    calls: lane calls still in flight then end with the process, like a death. Two such
    ends must not make a healthy request a query of death; two deaths of listed replicas
    do."""
    policy = RetryPolicy()

    def after_two(listed: frozenset[str]) -> RequestRetries:
        attempts = AttemptLoop(None, lambda: listed)  # type: ignore[arg-type]
        retries = RequestRetries(policy, RetryBudget.for_policy(policy), Ejections(),
                                 time.monotonic() + 30, "m")
        for replica in ("r1", "r2"):
            failed = attempts._gone(replica, "lane closed", time.perf_counter())
            retries.after_failure(failed.error, failed.replica, died=failed.died)
        return retries

    stopped = after_two(frozenset({"r3"}))
    assert stopped.excluded == {"r1", "r2"}
    with pytest.raises(PoisonInput):
        after_two(frozenset({"r1", "r2", "r3"}))


def _serve_and_hold(replica_id: str, ready: Any) -> None:
    """A replica process whose every call holds until the process is killed."""

    async def main() -> None:
        replica = Replica()
        LaneServer(replica_id, replica.infer, limit=lambda: 8, others=lambda: 0)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def test_a_replica_that_dies_ends_its_calls_at_once() -> None:
    replica_id = f"test-{os.getpid()}-{next(_ids)}"
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    child = spawn.Process(target=_serve_and_hold, args=(replica_id, ready))
    child.start()
    try:
        assert ready.wait(60)

        async def main() -> None:
            lanes = Lanes()
            await _open(lanes, replica_id)
            calls = [lanes.lane(replica_id).call("holds", {"x": np.zeros(1)})
                     for _ in range(3)]
            await asyncio.sleep(0.2)
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            for call in calls:
                with pytest.raises(LaneClosed):
                    await asyncio.wait_for(call, 5)
            assert not lanes.open_for(frozenset({replica_id}))

        asyncio.run(main())
    finally:
        child.kill()
        child.join(10)


def test_no_lane_opens_to_a_replica_that_speaks_another_protocol(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        replica_id = f"test-{os.getpid()}-{next(_ids)}"
        with monkeypatch.context() as older:
            older.setattr(lane, "PROTOCOL", lane.PROTOCOL - 1)
            server = LaneServer(replica_id, Replica().infer, limit=lambda: 2, others=lambda: 0)
        try:
            lanes = Lanes()
            assert not lanes.open_for(frozenset({replica_id}))
            await asyncio.sleep(0.1)
            assert not lanes.open_for(frozenset({replica_id}))
        finally:
            server.close()

    asyncio.run(main())


def test_no_lane_is_open_to_a_replica_without_one() -> None:
    async def main() -> None:
        lanes = Lanes()
        missing = frozenset({f"nobody-{os.getpid()}-{next(_ids)}"})
        assert not lanes.open_for(missing)
        await asyncio.sleep(0.1)
        assert not lanes.open_for(missing)

    asyncio.run(main())


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve() as p:
        yield p


def test_a_router_sends_its_attempts_through_the_lanes_once_open(
    port: int, cache_dir: Path
) -> None:
    router = deploy(cache_dir)
    for i in range(40):
        x = varied_inputs(i)["x"]
        outputs, trail = router.infer_with_trail.remote("tiny", {"x": x}).result()
        np.testing.assert_allclose(outputs["probs"], tiny_reference(x)["probs"],
                                   rtol=1e-5, atol=1e-6)
        assert trail[-1]["outcome"] == "ok"
    # The first attempts go through Serve's handle while the lanes open.
    assert sum(r["lane_calls"] for r in describe_all()) >= 30


def test_the_lanes_limit_follows_serves_when_it_changes_in_place(
    port: int, cache_dir: Path
) -> None:
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    deploy_config(cache_dir)
    before = replica_ids()
    assert {r["lane_limit"] for r in describe_all()} == {32}  # the shipped default
    # serve.yaml's own override of a deployment option, which Serve applies in place.
    deploy_config(cache_dir, deployments=[{"name": "EngineReplica", "max_ongoing_requests": 5}])
    assert wait_until(lambda: {r["lane_limit"] for r in describe_all()} == {5}, 60)
    assert replica_ids() == before


def test_serve_refuses_its_calls_where_lane_calls_hold_the_limit(
    port: int, cache_dir: Path
) -> None:
    # Serve counts only its own calls against max_ongoing_requests: without the replica's
    # own check, lane calls and Serve's together took up to twice the limit.
    deploy(cache_dir, replicas=1, engine_max_ongoing_requests=2)
    [replica] = replica_ids()
    # Long enough for the Serve call below to arrive while both lane calls hold the replica
    # (on one context the second waits behind the first: 16 s in all, within their deadline).
    inject({"kind": "hang", "count": 2, "seconds": 8}, target=replica)
    x = {"x": np.ones((1, 16), np.float32)}

    async def main() -> None:
        lanes = Lanes()
        await _open(lanes, replica)
        held = [lanes.lane(replica).call("tiny", x, deadline_s=60) for _ in range(2)]
        for _ in range(200):  # until both run (each holds the hang)
            [report] = await engine().broadcast("describe").results_async()
            if report["lane_calls"] == 2:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the lane calls never reached the replica")
        with pytest.raises(Full, match="2 lane calls and 0 of Serve's in flight"):
            await engine().infer.remote("tiny", x)
        for call in held:
            outputs, _ = await asyncio.wait_for(call, 60)
            np.testing.assert_allclose(outputs["probs"], tiny_reference(x["x"])["probs"],
                                       rtol=1e-5, atol=1e-6)
        outputs, _ = await engine().infer.remote("tiny", x)  # room again
        np.testing.assert_allclose(outputs["probs"], tiny_reference(x["x"])["probs"],
                                   rtol=1e-5, atol=1e-6)

    asyncio.run(main())
