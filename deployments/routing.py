"""A RequestRouter that keeps a request away from replicas that already failed it.

Ray Serve's default router (power of two choices) knows nothing of our failures: plain
Serve kept sending requests to a replica with a sticky CUDA error for 8 s. This router reads
keyword arguments that the Router sends each attempt with:

- ``exclude``: replica ids (``ReplicaID.unique_id``) this request must not go to: those
  that failed it;
- ``ejected``: replica ids every request should avoid for a while (``policy.Ejections``),
  unless nothing else with room is left;
- ``target``: a single replica id the request must go to (fault injection, diagnostics).
  A target that this process's routers once listed and no longer do is gone for good
  (Serve never reuses a replica id): the request fails at once with ReplicaFailure instead
  of backing off until its caller's timeout.

Among what is left, the replicas with the fewest of this process's attempts in flight come
first (``routed.in_flight``: exact the moment an attempt ends, where Serve's queue-length
cache learns of it only later); among those it keeps the default's power of two choices, but
makes the choice itself (the shorter of the two cached queue lengths) and offers the winner
alone first, so that the attempt counts there at once (``routed.first_choice``), before the
replica accepts it. The base class probes a replica whose length it has not cached, and goes
on to the next rank when the first is full.

When a replica accepts an attempt, it reports which one under the attempt's ``attempt_id``
(``routed.py``): the Router blames a timeout or a death on that replica. A replica whose
lifeline said it died (``lifeline.py``) is never chosen again, although Serve lists it until
Ray reports the death.

It never waits itself: Ray 2.60 binds a routing task to one pending request until that
request is fulfilled, and runs at most ``min(50, 2 x replicas)`` of them, so a request that
waits inside ``choose_replicas`` holds routing for everyone. When nothing is eligible it
sets ``should_backoff`` and returns; Serve backs off with the deploy-time
``RequestRouterConfig`` parameters. The Router sees to it that a request whose exclusions
cover every live replica never gets here (``replica_set``, which this router feeds).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from engines.errors import ReplicaFailure

from .replica_set import gone, publish
from .routed import accepted, dead, first_choice, in_flight, watch


def eligible(
    candidates: Sequence[str],
    available: Iterable[str],
    exclude: Iterable[str],
    ejected: Iterable[str],
    target: str | None,
) -> list[str]:
    """The replica ids a request may go to now.

    ``exclude`` is hard (these failed this request). Capacity comes before the ejection
    preference: among the allowed replicas with room (``available``, from the queue-length
    cache), those not ejected; else ejected ones with room, rather than waiting for a full
    replica that is not (so a burst of failures across the fleet can never stall all
    traffic); else, when the cache says every allowed one is full, all of them, for Serve to
    probe their queues afresh. Empty only when nothing is allowed at all.
    """
    if target is not None:
        allowed = [r for r in candidates if r == target]
    else:
        hard = set(exclude)
        allowed = [r for r in candidates if r not in hard]
    room = set(available)
    with_room = [r for r in allowed if r in room]
    soft = set(ejected)
    return [r for r in with_room if r not in soft] or with_room or allowed


def by_own_load(
    replicas: Sequence[str], attempts: dict[str, int], queue_lens: dict[str, int | None]
) -> list[list[str]]:
    """Ranks for Serve to try in turn. Of the replicas with the fewest of this process's
    attempts in flight, two at random (power of two choices): the one with the shorter cached
    queue (``queue_lens``; unknown counts as empty, so that Serve probes it) alone in the
    first rank, the other in the second. Then the rest, fewest attempts first, at most two at
    random per rank, for Serve to compare."""
    groups: dict[int, list[str]] = {}
    for replica in replicas:
        groups.setdefault(attempts.get(replica, 0), []).append(replica)
    ranks = [random.sample(group, min(2, len(group))) for _, group in sorted(groups.items())]
    pair = sorted(ranks.pop(0), key=lambda r: queue_lens.get(r) or 0)
    return [[r] for r in pair] + ranks


def _routing_kwargs(pending_request: PendingRequest | None) -> dict[str, Any]:
    return pending_request.kwargs if pending_request is not None else {}


class AvoidFailedReplicasRouter(RequestRouter):
    """Among the replicas a request has not been told to avoid: the least loaded by this
    process's own attempts, then power of two choices."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._publish()

    def _publish(self) -> None:
        replica_ids = frozenset(r.replica_id.unique_id for r in self._replicas_list)
        publish(self._deployment_id.app_name, self._deployment_id.name, replica_ids)
        watch(replica_ids)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        attempt_id = _routing_kwargs(pending_request).get("attempt_id")
        if attempt_id is not None:
            accepted(attempt_id, replica_id.unique_id)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = _routing_kwargs(pending_request)
        target = kwargs.get("target")
        if pending_request is not None and target is not None and gone(
            self._deployment_id.app_name, self._deployment_id.name, target
        ):
            if not pending_request.future.done():
                pending_request.future.set_exception(ReplicaFailure(
                    f"replica {target} is gone (it died or was replaced)", replica_id=target))
            # Returning nothing would keep Serve's routing task on this request (it chooses
            # again, with or without backoff, until something comes back). Given candidates,
            # it sees the request's future done and moves on before it picks any of them.
            return [candidate_replicas[:1]]
        died = dead()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas
                 if r.replica_id.unique_id not in died}
        available = self.select_available_replicas(candidate_replicas)
        chosen = eligible(
            list(by_id),
            [r.replica_id.unique_id for r in available],
            kwargs.get("exclude") or (),
            kwargs.get("ejected") or (),
            target,
        )
        if not chosen:
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = False
        cached = self.replica_queue_len_cache
        ranks = by_own_load(chosen, in_flight(),
                            {r: cached.get(by_id[r].replica_id) for r in chosen})
        attempt_id = kwargs.get("attempt_id")
        if attempt_id is not None:
            first_choice(attempt_id, ranks[0][0])
        return [[by_id[r] for r in rank] for rank in ranks]
