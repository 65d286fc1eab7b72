"""A model's concurrency limit in an engine replica, with a lane for failovers.

An attempt that comes to this replica because another one failed it (a dead replica, a
device failure, a timeout) has already spent one trip through a loaded path; behind the
fresh requests queued here it would spend a second one, and a killed replica would add a
whole request's latency to every request it held. So a failover takes the next free slot
before any fresh attempt, first come first served within each lane, as Triton's dynamic
batcher serves a higher priority level first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Admission:
    """``size`` slots; ``async with admission.slot(failover=...)`` holds one."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an admission limit needs at least one slot, got {size}")
        self._free = size
        self._failovers: deque[asyncio.Future[None]] = deque()
        self._fresh: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in (*self._failovers, *self._fresh))

    @contextlib.asynccontextmanager
    async def slot(self, *, failover: bool) -> AsyncIterator[None]:
        await self._acquire(failover)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, failover: bool) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane = self._failovers if failover else self._fresh
        lane.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as the waiter was cancelled: the slot goes on
            else:
                with contextlib.suppress(ValueError):  # a release may have dropped it
                    lane.remove(granted)
            raise

    def _release(self) -> None:
        for lane in (self._failovers, self._fresh):
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1
