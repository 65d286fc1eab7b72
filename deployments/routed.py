"""Which engine replica accepted each attempt the Router sent.

The Router sends an attempt with ``handle.remote()``: one message, which the replica accepts
or refuses. Ray Serve's ``choose_replica`` would name the replica before sending, but only
by reserving a slot on it with a round trip of its own first (5.4 of a 12.4 ms unloaded
attempt on 2 cores: docs/benchmarks.md). The Router still has to know the replica before
the answer, so that an attempt that times out or dies is blamed on it: the request router
(routing.py) reports the replica that accepted an attempt here, under the ``attempt_id``
the Router sent it with. Like replica_set.py, this lives apart from routing.py, which Serve
pickles by value: state kept there would be a copy, not the process's own.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from types import TracebackType

_lock = threading.Lock()
_waiting: dict[str, Routed] = {}
_ids = itertools.count()


class Routed:
    """The time one attempt may take, and the replica that accepted it (None until then).

    Until a replica accepts the attempt it may wait ``waiting_s`` (what is left of the
    request's deadline); from then on it runs within ``running_s()`` counted from the
    acceptance. Past either, the block raises TimeoutError, as ``asyncio.timeout`` does."""

    def __init__(self, waiting_s: float, running_s: Callable[[], float]) -> None:
        self.attempt_id = f"attempt-{next(_ids)}"
        self.replica_id: str | None = None
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
        return await self._timeout.__aexit__(exc_type, exc, tb)

    def _accepted(self, replica_id: str) -> None:
        # Serve's request router may call this from a loop of its own thread.
        self.replica_id = replica_id
        self._loop.call_soon_threadsafe(self._run_from_now)

    def _run_from_now(self) -> None:
        if self._open and not self._timeout.expired():
            self._timeout.reschedule(self._loop.time() + self._running_s())


def accepted(attempt_id: str, replica_id: str) -> None:
    """The request router's report: ``replica_id`` accepted the attempt. An attempt that
    already ended is not waited for any more: the report is dropped."""
    with _lock:
        routed = _waiting.pop(attempt_id, None)
    if routed is not None:
        routed._accepted(replica_id)
