"""The attempt loop: one validated request, tried on one replica after another within one
deadline, alone or in a dynamic batch.

Each attempt is one call telling the replica the attempt's time and the local retries it
may spend. Where every replica is on the Router's node it goes over the chosen replica's
own socket (``lane.py``), and inputs of 100 KiB or more in shared memory (``handoff.py``);
elsewhere it is one ``handle.remote()``, inputs through Ray's object store, and the request
router reports the replica that accepted it (``routed.py``). Either way even an attempt
that times out or dies knows whom to blame. A batch
(``batcher.py``) is one attempt for all its requests; after it fails, each request goes on as
its own (``_after_batch_failure``). What to do after each failure is decided by
``policy.RequestRetries``; this module only acts: it waits, cancels an abandoned attempt,
splits a batch, and remembers queries of death.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from engines.errors import PoisonInput, ReplicaFailure, TrtServeError
from engines.runner import Attempt

from . import metrics
from .batcher import Batcher, Pending, concatenate, own_request, router_slots, split
from .catalogue import ModelInfo
from .handoff import Outbox
from .lane import Full, LaneCall, LaneClosed, Lanes
from .lane import available as lanes_available
from .policy import Ejections, PoisonedInputs, RequestRetries, RetryBudget, RetryPolicy
from .ray_errors import FailedAttempt, failed_attempt, outcome
from .routed import Routed, dead, on_this_node

Outputs = dict[str, np.ndarray]
Trail = list[dict[str, Any]]
# Every replica that could take the attempt is full: wait, then try again (or Overloaded).
_QUEUES_FULL = (BackPressureError, Full)


class AttemptLoop:
    """``live`` gives the ids of the engine replicas the handle's router knows (None while
    unknown)."""

    def __init__(
        self, engine: DeploymentHandle, live: Callable[[], frozenset[str] | None]
    ) -> None:
        self.engine = engine
        self.live = live
        self.policy = RetryPolicy()
        self.budget = RetryBudget.for_policy(self.policy)
        self.ejections = Ejections()
        self.poisoned = PoisonedInputs()
        self.metrics = metrics.RouterMetrics()
        # The Router's deployment sets both (batcher.router_slots).
        self.routers = 1
        self.batches_in_flight: str | int = "auto"
        self._batchers: dict[str, Batcher] = {}
        self.outbox = Outbox()
        self.lanes = Lanes() if lanes_available() else None

    def reconfigure(self, policy: RetryPolicy) -> None:
        if (policy.budget_ratio, policy.budget_window_s, policy.budget_min_per_s) != (
            self.policy.budget_ratio,
            self.policy.budget_window_s,
            self.policy.budget_min_per_s,
        ):
            self.budget = RetryBudget.for_policy(policy)
        self.policy = policy

    async def run(
        self, info: ModelInfo, inputs: dict[str, np.ndarray], timeout: float | None,
        request_id: str | None = None,
    ) -> tuple[Outputs, Trail]:
        """Outputs and the trail; raises a taxonomy error carrying the trail otherwise.
        ``request_id``: the protocol's ``id``, when the client sent one (for the log)."""
        req = metrics.Request(info.name, info.version, metrics.rows(inputs),
                              metrics.request_id(request_id))
        self.metrics.started(req)
        label, error, trail = "ok", None, []
        try:
            outputs, trail = await self._run(info, inputs, timeout, req)
            return outputs, trail
        except BaseException as exc:
            label = "cancelled" if isinstance(exc, asyncio.CancelledError) else outcome(exc)
            error, trail = exc, getattr(exc, "trail", [])
            raise
        finally:
            self.metrics.finished(req, label, error, trail)

    async def _run(
        self, info: ModelInfo, inputs: dict[str, np.ndarray], timeout: float | None,
        req: metrics.Request,
    ) -> tuple[Outputs, Trail]:
        policy = self.policy
        if self.poisoned.refused(info.name, inputs):
            self.metrics.refused_query_of_death(info.name)
            raise PoisonInput(
                f"{info.name}: this request is identical to one that broke two replicas within "
                f"the last {policy.poison_window_s:g} s; refused without running it"
            )
        deadline = time.monotonic() + policy.deadline_for(timeout)
        retries = RequestRetries(policy, self.budget, self.ejections, deadline, info.name)
        self.budget.record_request()
        batcher = self._batcher(info)
        if batcher is None:
            return await self._alone(info.name, inputs, retries)
        pending = Pending(inputs, deadline, retries)
        try:
            return await batcher.submit(pending)  # type: ignore[no-any-return]
        finally:
            req.batch_wait_s = pending.waited_s

    def _batcher(self, info: ModelInfo) -> Batcher | None:
        if not info.batching.enabled:
            return None
        batcher = self._batchers.get(info.name)
        if batcher is None or batcher.policy != info.batching:
            batcher = Batcher(
                info.name,
                info.batching,
                lambda: router_slots(len(self.live() or ("one",)) * info.concurrency,
                                     self.routers, self.batches_in_flight),
                functools.partial(self._batch, info.name),
            )
            self._batchers[info.name] = batcher
        return batcher

    async def _alone(
        self, model: str, inputs: dict[str, np.ndarray], retries: RequestRetries
    ) -> tuple[Outputs, Trail]:
        """One request, tried on one replica after another."""
        while True:
            retries.before_attempt(self.live())
            started = time.perf_counter()
            try:
                outputs, trail = await self._attempt(model, inputs, retries)
            except _QUEUES_FULL:
                await asyncio.sleep(retries.after_backpressure())
                continue
            except FailedAttempt as failed:
                self._with_router_entry(model, failed, started, metrics.rows(inputs))
                self._count(model, failed.error.trail)
                self._after_failure(model, inputs, retries, failed)
                continue
            self._count(model, trail)
            retries.trail.extend(trail)
            return outputs, retries.trail

    async def _batch(self, model: str, batch: list[Pending]) -> None:
        """One attempt for the whole batch; then, on a failure, what is best for each of its
        requests: a deterministic failure splits the batch in halves (so only the request
        that causes it fails), any other failure sends each request on alone, with its own
        deadline and retries, the failed replica excluded."""
        batch = [p for p in batch if not p.future.done()]
        if batch:
            await _while_wanted(batch, self._batch_attempts(model, batch))

    async def _batch_attempts(self, model: str, batch: list[Pending]) -> None:
        if len(batch) == 1:
            await _settle(batch[0], self._alone(model, batch[0].inputs, batch[0].payload))
            return
        retries: list[RequestRetries] = [p.payload for p in batch]
        shared = RequestRetries(
            self.policy, self.budget, self.ejections, min(r.deadline for r in retries), model,
            excluded=set().union(*(r.excluded for r in retries)),
        )
        inputs = concatenate(batch)
        while True:
            started = time.perf_counter()
            try:
                shared.before_attempt(self.live())
                outputs, trail = await self._attempt(model, inputs, shared)
            except _QUEUES_FULL:
                try:
                    await asyncio.sleep(shared.after_backpressure())
                except TrtServeError as final:
                    _fail(batch, final)
                    return
                continue
            except FailedAttempt as failed:
                self._with_router_entry(model, failed, started, metrics.rows(inputs))
                self._count(model, failed.error.trail)
                await self._after_batch_failure(model, batch, failed)
                return
            except TrtServeError:  # the earliest deadline passed, or nothing left for all
                await asyncio.gather(*(own_request(self._go_alone(model, p)) for p in batch))
                return
            break
        self._count(model, trail)
        for pending, part in zip(batch, split(outputs, batch), strict=True):
            pending.payload.trail.extend(trail)
            if not pending.future.done():
                pending.future.set_result((part, pending.payload.trail))

    async def _after_batch_failure(
        self, model: str, batch: list[Pending], failed: FailedAttempt
    ) -> None:
        err = failed.error
        if err.retry == "never":
            # Deterministic: the same batch would fail again anywhere. Halves find the culprit.
            for pending in batch:
                pending.payload.trail.extend(err.trail)
            half = len(batch) // 2
            await asyncio.gather(own_request(self._batch(model, batch[:half])),
                                 own_request(self._batch(model, batch[half:])))
            return
        going_on = []
        for i, pending in enumerate(p for p in batch if not p.future.done()):
            own = FailedAttempt(_copy(err), failed.replica, failed.timed_out, failed.died)
            try:
                # One failover of a batch spends one unit of retry budget, as one request would.
                self._after_failure(model, pending.inputs, pending.payload, own, spend=i == 0)
            except TrtServeError as final:
                if not pending.future.done():
                    pending.future.set_exception(final)
                continue
            going_on.append(pending)
        await asyncio.gather(*(own_request(self._go_alone(model, p)) for p in going_on))

    async def _go_alone(self, model: str, pending: Pending) -> None:
        if not pending.future.done():
            await _while_wanted(
                [pending], _settle(pending, self._alone(model, pending.inputs, pending.payload))
            )

    def _after_failure(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        retries: RequestRetries,
        failed: FailedAttempt,
        *,
        spend: bool = True,
    ) -> None:
        ejected, went_on = self.ejections.current(), False
        try:
            retries.after_failure(failed.error, failed.replica, timed_out=failed.timed_out,
                                  died=failed.died, spend=spend)
            went_on = True
        except PoisonInput:
            self.poisoned.add(model, inputs, self.policy.poison_window_s)
            raise
        finally:
            self.metrics.after_failure(
                model, failed, went_on=went_on, budget_refused=retries.budget_refused,
                newly_ejected=len(self.ejections.current() - ejected))

    def _local(self) -> frozenset[str]:
        """The live replicas, when every one is on this node (its lifeline watched here) and
        none is known to have died; else none."""
        live = self.live()
        if live is None or not on_this_node(live):
            return frozenset()
        return live - dead()

    def _by_lane(self, local: frozenset[str], retries: RequestRetries) -> str | None:
        """The replica to send the attempt to over its lane (lane.py); None sends it
        through Serve's handle, which is also what happens until every local replica's lane
        is open."""
        if self.lanes is None:
            return None
        return self.lanes.choose(local, retries.exclude_now(), retries.ejected_now())

    def _gone(self, replica: str, how: str, started: float) -> FailedAttempt:
        """The replica went away with the attempt in flight. A death while Serve still
        lists it counts as broken (ejection; a second one makes a query of death). One that
        Serve no longer lists was being stopped (Serve stops routing to a replica before it
        stops it, and waits only for its own calls, not a lane's): unavailable, no worse."""
        live = self.live()
        died = live is None or replica in live
        what = "died" if died else "was stopped by Serve"
        err = ReplicaFailure(
            f"replica {replica} {what} with this request in flight (its {how} "
            f"{(time.perf_counter() - started):.3f} s into the attempt)",
            replica_id=replica,
        )
        return FailedAttempt(err, replica, died=died)

    @staticmethod
    def _with_router_entry(model: str, failed: FailedAttempt, started: float, rows: int) -> None:
        """A failure the replica did not describe (a death, a timeout) gets the Router's own
        trail entry; ``rows``: those sent together in the attempt."""
        err = failed.error
        if not err.trail:
            ms = round((time.perf_counter() - started) * 1000.0, 3)
            err.trail = [Attempt(model, type(err).__name__, ms, failed.replica, None,
                                 err.message, rows).to_dict()]

    def _count(self, model: str, trail: Trail) -> None:
        """Once per attempt, however many requests of a batch share its trail."""
        self.metrics.attempt(model, trail)

    async def _attempt(
        self, model: str, inputs: dict[str, np.ndarray], retries: RequestRetries
    ) -> tuple[Outputs, Trail]:
        response: DeploymentResponse | LaneCall | None = None
        started = time.perf_counter()
        routed = Routed(retries.remaining_s(), retries.attempt_timeout_s)
        local = self._local()
        # Inputs in shared memory (handoff.py) only where every replica could map them.
        lent = self.outbox.lend(inputs) if local else None
        payload = inputs if lent is None else lent.shared
        replica_done = False
        try:
            async with routed:
                replica = self._by_lane(local, retries)
                if replica is None:
                    response = self.engine.infer.remote(
                        model,
                        payload,
                        local_retries=retries.policy.local_retries,
                        deadline_s=retries.attempt_timeout_s(),
                        exclude=retries.exclude_now(),
                        ejected=retries.ejected_now(),
                        attempt_id=routed.attempt_id,
                    )
                else:
                    routed.sent_to(replica)
                    response = self.lanes.lane(replica).call(  # type: ignore[union-attr]
                        model,
                        payload,
                        local_retries=retries.policy.local_retries,
                        deadline_s=retries.attempt_timeout_s(),
                    )
                outputs, trail = await response
                replica_done = True
        except TimeoutError:
            if response is not None:
                response.cancel()  # the replica stops it: no execution left running
            if routed.replica_id is None:
                raise retries.deadline_exceeded() from None
            if routed.died:
                raise self._gone(routed.replica_id, "lifeline ended", started) from None
            err = ReplicaFailure(
                f"attempt on replica {routed.replica_id} timed out after "
                f"{(time.perf_counter() - started):.3f} s",
                replica_id=routed.replica_id,
            )
            raise FailedAttempt(err, routed.replica_id, timed_out=True) from None
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()  # the caller is gone: so is the work done for it
            raise
        except _QUEUES_FULL:
            replica_done = True  # no replica took it
            raise
        except LaneClosed:
            # The replica's end of the socket closed: its process is gone (or going).
            assert routed.replica_id is not None  # a lane is chosen before it is used
            raise self._gone(routed.replica_id, "lane closed", started) from None
        except Exception as exc:  # Ray's errors and the replica's, in the taxonomy
            replica_done = True
            self.outbox.after_failure(exc, routed.replica_id)
            raise failed_attempt(exc, routed.replica_id) from None
        finally:
            if lent is not None:
                self.outbox.give_back(lent, reusable=replica_done)
        if trail:
            # The attempt as the Router saw it, beside the replica's own ``ms``: the
            # difference is the hop there and back.
            trail[-1]["router_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        return outputs, trail


def _copy(err: TrtServeError) -> TrtServeError:
    """The same failure for another request of the batch: its own trail list."""
    return type(err)(err.message, trail=list(err.trail), replica_id=err.replica_id)


def _fail(batch: list[Pending], error: TrtServeError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(_copy(error))


async def _while_wanted(batch: list[Pending], work: Coroutine[Any, Any, None]) -> None:
    """``work`` for ``batch``'s requests, stopped (its attempt cancelled in the replica) once
    every one of their callers has gone: nobody is left to answer, so nothing may run on, be
    retried or be failed over for them."""
    task = asyncio.ensure_future(work)

    def stop_if_unwanted(_: asyncio.Future[Any]) -> None:
        if all(p.future.cancelled() for p in batch):
            task.cancel()

    for pending in batch:
        pending.future.add_done_callback(stop_if_unwanted)
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not task.cancelled() or (current is not None and current.cancelling()):
            raise  # the Router itself is stopping, not the callers
    finally:
        for pending in batch:
            pending.future.remove_done_callback(stop_if_unwanted)


async def _settle(pending: Pending, work: Awaitable[tuple[Outputs, Trail]]) -> None:
    try:
        result = await work
    except TrtServeError as exc:
        if not pending.future.done():
            pending.future.set_exception(exc)
        return
    if not pending.future.done():
        pending.future.set_result(result)
