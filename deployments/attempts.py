"""The attempt loop: one validated request, tried on one replica after another within one
deadline.

Each attempt picks its replica with ``choose_replica`` (so even an attempt that times out
knows whom to blame), sends with ``dispatch`` (telling the replica the attempt's time and the
local retries it may spend) and awaits the answer inside the selection block. What to do
after each failure is decided by ``policy.RequestRetries``; this module only acts: it waits,
cancels an abandoned attempt, and remembers queries of death.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.metrics import Counter

from engines.errors import PoisonInput, ReplicaFailure
from engines.runner import Attempt

from .policy import Ejections, PoisonedInputs, RequestRetries, RetryBudget, RetryPolicy
from .ray_errors import FailedAttempt, failed_attempt, outcome

Outputs = dict[str, np.ndarray]
Trail = list[dict[str, Any]]


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
        self.attempts = Counter(
            "trtserve_attempts",
            description="Attempts to run a request on a replica, by model and outcome.",
            tag_keys=("model", "outcome"),
        )
        self.requests = Counter(
            "trtserve_requests",
            description="Requests answered by the router, by model and outcome.",
            tag_keys=("model", "outcome"),
        )

    def reconfigure(self, policy: RetryPolicy) -> None:
        if (policy.budget_ratio, policy.budget_window_s, policy.budget_min_per_s) != (
            self.policy.budget_ratio,
            self.policy.budget_window_s,
            self.policy.budget_min_per_s,
        ):
            self.budget = RetryBudget.for_policy(policy)
        self.policy = policy

    async def run(
        self, model: str, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> tuple[Outputs, Trail]:
        """Outputs and the trail; raises a taxonomy error carrying the trail otherwise."""
        label = "ok"
        try:
            return await self._run(model, inputs, timeout)
        except BaseException as exc:
            label = "cancelled" if isinstance(exc, asyncio.CancelledError) else outcome(exc)
            raise
        finally:
            self.requests.inc(tags={"model": model, "outcome": label})

    async def _run(
        self, model: str, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> tuple[Outputs, Trail]:
        policy = self.policy
        if self.poisoned.refused(model, inputs):
            raise PoisonInput(
                f"{model}: this request is identical to one that broke two replicas within "
                f"the last {policy.poison_window_s:g} s; refused without running it"
            )
        deadline = time.monotonic() + policy.deadline_for(timeout)
        retries = RequestRetries(policy, self.budget, self.ejections, deadline, model)
        self.budget.record_request()
        while True:
            retries.before_attempt(self.live())
            started = time.perf_counter()
            try:
                outputs, trail = await self._attempt(model, inputs, retries)
            except BackPressureError:
                await asyncio.sleep(retries.after_backpressure())
                continue
            except FailedAttempt as failed:
                err = failed.error
                if not err.trail:
                    ms = round((time.perf_counter() - started) * 1000.0, 3)
                    err.trail = [Attempt(model, type(err).__name__, ms, failed.replica, None,
                                         err.message).to_dict()]
                self._count(model, err.trail)
                try:
                    retries.after_failure(
                        err, failed.replica, timed_out=failed.timed_out, died=failed.died
                    )
                except PoisonInput:
                    self.poisoned.add(model, inputs, policy.poison_window_s)
                    raise
                continue
            self._count(model, trail)
            retries.trail.extend(trail)
            return outputs, retries.trail

    def _count(self, model: str, trail: Trail) -> None:
        for entry in trail:
            self.attempts.inc(tags={"model": model, "outcome": entry["outcome"]})

    async def _attempt(
        self, model: str, inputs: dict[str, np.ndarray], retries: RequestRetries
    ) -> tuple[Outputs, Trail]:
        loop = asyncio.get_running_loop()
        replica: str | None = None
        response: DeploymentResponse | None = None
        started = time.perf_counter()
        method = self.engine.infer
        try:
            # Choosing may wait (every replica full): bounded by the deadline.
            async with asyncio.timeout(retries.remaining_s()) as scope:
                async with method.choose_replica(
                    model, exclude=retries.exclude_now(), ejected=retries.ejected_now()
                ) as chosen:
                    replica = chosen.replica_id
                    budget_s = retries.attempt_timeout_s()
                    scope.reschedule(loop.time() + budget_s)
                    response = method.dispatch(
                        chosen,
                        model,
                        inputs,
                        local_retries=retries.policy.local_retries,
                        deadline_s=budget_s,
                    )
                    return await response  # type: ignore[no-any-return]
        except TimeoutError:
            if response is not None:
                response.cancel()  # the replica stops it: no execution left running
            if replica is None:
                raise retries.deadline_exceeded() from None
            err = ReplicaFailure(
                f"attempt on replica {replica} timed out after "
                f"{(time.perf_counter() - started):.3f} s",
                replica_id=replica,
            )
            raise FailedAttempt(err, replica, timed_out=True) from None
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()  # the caller is gone: so is the work done for it
            raise
        except BackPressureError:
            raise
        except Exception as exc:  # Ray's errors and the replica's, in the taxonomy
            raise failed_attempt(exc, replica) from None
