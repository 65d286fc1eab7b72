"""Which engine replica accepted each attempt the Router sent.

The Router sends an attempt with ``handle.remote()``: one message, which the replica accepts
or refuses. Ray Serve's ``choose_replica`` would name the replica before sending, but only
by reserving a slot on it with a round trip of its own first (5.4 of a 12.4 ms unloaded
attempt on 2 cores: docs/benchmarks.md). The Router still has to know the replica before
the answer, so that an attempt that times out or dies is blamed on it: the request router
(routing.py) reports the replica that accepted an attempt here, under the ``attempt_id``
the Router sent it with. Like replica_set.py, this lives apart from routing.py, which Serve
pickles by value: state kept there would be a copy, not the process's own.

It also counts each replica's attempts in flight from this process, from the moment the
request router chooses the replica to the end of the attempt. Serve's own queue-length cache
learns of an answered request only after the Router has it (when the replica's task
completes), so a batch sent at once after another's answer saw the replica that just
answered as still busy: on the 2-core machine 15-19% of requests then waited for a context
behind another batch while the other replica idled. The request router ranks replicas by
this count first (routing.py). Counting from the acceptance instead left a window of one
round trip (5-30 ms on 2 cores) in which a second batch, routed while the first was not yet
accepted, saw neither and could follow it to the same replica.

And it ends the attempts a replica accepted as soon as that replica's lifeline says it died
(``lifeline.py``), instead of when Ray reports the death: on the 2-core machine Ray's report
of a replica holding ``resnet50``'s engine came 226 ms after its exit, the lifeline's 1 ms.
The request router leaves such a replica out from then on (``dead``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import Callable
from types import TracebackType

from .lifeline import Watcher

_lock = threading.Lock()
_waiting: dict[str, Routed] = {}
_running: dict[str, set[Routed]] = {}
_dead: set[str] = set()
_in_flight: collections.Counter[str] = collections.Counter()
_ids = itertools.count()


class Routed:
    """The time one attempt may take, and the replica that accepted it (None until then).

    Until a replica accepts the attempt it may wait ``waiting_s`` (what is left of the
    request's deadline); from then on it runs within ``running_s()`` counted from the
    acceptance. Past either, the block raises TimeoutError, as ``asyncio.timeout`` does; so
    it does at once when the replica that accepted it dies (``died`` is then True)."""

    def __init__(self, waiting_s: float, running_s: Callable[[], float]) -> None:
        self.attempt_id = f"attempt-{next(_ids)}"
        self.replica_id: str | None = None
        self.died = False
        self._counted: str | None = None  # where in_flight() counts it
        self._running_s = running_s
        self._timeout = asyncio.timeout(waiting_s)
        self._loop = asyncio.get_running_loop()
        self._open = False

    async def __aenter__(self) -> Routed:
        await self._timeout.__aenter__()
        self._open = True
        with _lock:
            _waiting[self.attempt_id] = self
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._open = False
        with _lock:
            _waiting.pop(self.attempt_id, None)
            self._count_on(None)
            if self.replica_id is not None:
                _running.get(self.replica_id, set()).discard(self)
        return await self._timeout.__aexit__(exc_type, exc, tb)

    def _count_on(self, replica_id: str | None) -> None:
        """Under ``_lock``: count this attempt on ``replica_id`` (None: nowhere) instead."""
        if self._counted is not None:
            _in_flight[self._counted] -= 1
            if _in_flight[self._counted] <= 0:
                del _in_flight[self._counted]
        self._counted = replica_id
        if replica_id is not None:
            _in_flight[replica_id] += 1

    def _run_from_now(self) -> None:
        if self._open and not self._timeout.expired():
            self._timeout.reschedule(self._loop.time() + self._running_s())

    def sent_to(self, replica_id: str) -> None:
        """The Router chose ``replica_id`` itself and sends the attempt straight there
        (lane.py): counted there, and accepted, at once."""
        first_choice(self.attempt_id, replica_id)
        accepted(self.attempt_id, replica_id)

    def _end_for_death(self) -> None:
        if self._open and not self._timeout.expired():
            self.died = True
            self._timeout.reschedule(self._loop.time())


def first_choice(attempt_id: str, replica_id: str) -> None:
    """The request router's first choice for an attempt, before any replica accepts it:
    counted there at once, so that an attempt routed meanwhile sees it. If another replica
    accepts it after all (the first was full), ``accepted`` moves the count."""
    with _lock:
        routed = _waiting.get(attempt_id)
        if routed is not None:
            routed._count_on(replica_id)


def accepted(attempt_id: str, replica_id: str) -> None:
    """The request router's report: ``replica_id`` accepted the attempt. An attempt that
    already ended is not waited for any more: the report is dropped."""
    with _lock:
        routed = _waiting.pop(attempt_id, None)
        if routed is None:
            return
        routed.replica_id = replica_id
        routed._count_on(replica_id)
        died_already = replica_id in _dead
        if not died_already:
            _running.setdefault(replica_id, set()).add(routed)
    # Serve's request router may call this from a loop of its own thread.
    routed._loop.call_soon_threadsafe(
        routed._end_for_death if died_already else routed._run_from_now)


def replica_died(replica_id: str) -> None:
    """The replica's lifeline says it died: the attempts it accepted end now, as dead."""
    with _lock:
        _dead.add(replica_id)
        ended = _running.pop(replica_id, set())
    for routed in ended:
        routed._loop.call_soon_threadsafe(routed._end_for_death)


_watcher = Watcher(replica_died)


def watch(replica_ids: frozenset[str]) -> None:
    """The request router's list of live replicas, at each update: those on this node are
    watched through their lifelines."""
    _watcher.watch(replica_ids)


def on_this_node(replica_ids: frozenset[str]) -> bool:
    """Whether every one of ``replica_ids`` is on this process's node (its lifeline is
    watched here)."""
    return _watcher.covers(replica_ids)


def dead() -> frozenset[str]:
    """Replicas whose lifelines said they died (Serve never reuses a replica id)."""
    with _lock:
        return frozenset(_dead)


def in_flight() -> dict[str, int]:
    """Per replica id, the attempts this process has in flight there (chosen or accepted,
    not ended)."""
    with _lock:
        return dict(_in_flight)
