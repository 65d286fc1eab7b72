"""A RequestRouter that keeps a request away from replicas that already failed it.

Ray Serve's default router (power of two choices) knows nothing of our failures: plain
Serve kept sending requests to a replica with a sticky CUDA error for 8 s. This router reads
two keyword arguments that the Router passes to ``choose_replica``:

- ``exclude``: replica ids (``ReplicaID.unique_id``) this request must not go to: those
  that failed it;
- ``ejected``: replica ids every request should avoid for a while (``policy.Ejections``),
  unless nothing else is left;
- ``target``: a single replica id the request must go to (fault injection, diagnostics).

Among what is left it keeps the default's power of two choices (the base class then probes
the two queue lengths and takes the shorter). When nothing is left, or every candidate is
known to be full, it waits with full jitter before the base class asks again; the caller
bounds the whole wait with the request's deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .policy import RetryPolicy

_BACKOFF = RetryPolicy()


def eligible(
    candidates: Sequence[RunningReplica],
    exclude: Iterable[str],
    ejected: Iterable[str],
    target: str | None,
) -> list[RunningReplica]:
    """The candidates a request may go to.

    ``exclude`` is hard (these failed this request). ``ejected`` is a preference: when it
    would leave nothing, the ejected replicas are tried rather than none, so a burst of
    failures across the fleet cannot eject every replica and stall all traffic.
    """
    if target is not None:
        return [r for r in candidates if r.replica_id.unique_id == target]
    hard = set(exclude)
    allowed = [r for r in candidates if r.replica_id.unique_id not in hard]
    soft = set(ejected)
    preferred = [r for r in allowed if r.replica_id.unique_id not in soft]
    return preferred or allowed


def _routing_kwargs(pending_request: PendingRequest | None) -> dict[str, Any]:
    return pending_request.kwargs if pending_request is not None else {}


class AvoidFailedReplicasRouter(RequestRouter):
    """Power of two choices over the replicas a request has not been told to avoid."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._waits: dict[str, int] = {}

    async def _wait(self, pending_request: PendingRequest | None) -> None:
        key = pending_request.metadata.internal_request_id if pending_request else ""
        attempt = self._waits.get(key, 0)
        self._waits[key] = attempt + 1
        await asyncio.sleep(_BACKOFF.backoff_s(attempt))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = _routing_kwargs(pending_request)
        allowed = eligible(
            candidate_replicas,
            kwargs.get("exclude") or (),
            kwargs.get("ejected") or (),
            kwargs.get("target"),
        )
        available = self.select_available_replicas(allowed)
        if not available:
            await self._wait(pending_request)
            return []
        if pending_request is not None:
            self._waits.pop(pending_request.metadata.internal_request_id, None)
        if len(available) <= 2:
            return [random.sample(available, len(available))]
        return [random.sample(available, 2)]
