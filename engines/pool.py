"""ContextPool: execution contexts ready to lend, plus warm spares to replace failed ones.

Contexts are created up front (``size`` active and ``spares`` warm), so a request never
waits for an allocation: when one fails, it is closed and a spare is promoted in its place,
and a background thread builds the next spare. Only when the spares run out (faster failures
than refills) is a context created on the request's path, and that is counted.

The pool keeps its capacity: a slot whose replacement could not be created is remembered as
missing and refilled in the background before any spare, and a context abandoned while it
runs (``abandon``, for a request that was cancelled or ran past its deadline) gets a
replacement at once; it is closed, never lent again, when its execution finally returns.
``usable`` says how many of the ``size`` slots can run a request now, which the replica's
health check watches.

Every context gets a generation number, increasing over the pool's life, so an attempt
trail shows when a request moved to a fresh context.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .backend import Context, Engine
from .errors import ContextFailure, DeviceFailure, TrtServeError

log = logging.getLogger(__name__)


@dataclass
class PoolStats:
    created: int = 0
    closed: int = 0
    promoted: int = 0
    cold_creates: int = 0
    refill_failures: int = 0
    abandoned: int = 0


class ContextPool:
    def __init__(self, engine: Engine, size: int = 4, spares: int = 1) -> None:
        if size < 1 or spares < 0:
            raise ValueError(f"pool needs size >= 1 and spares >= 0, got {size}, {spares}")
        self.engine = engine
        self.size = size
        self.spares_wanted = spares
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._idle: deque[Context] = deque()
        self._spares: deque[Context] = deque()
        self._busy: set[int] = set()
        self._abandoned: set[int] = set()
        self._missing = 0
        self._generation = 0
        self._poison: DeviceFailure | None = None
        self._closed = False
        self._refiller = ThreadPoolExecutor(1, thread_name_prefix=f"refill-{engine.name}")
        try:
            for _ in range(size):
                self._idle.append(self._create())
            for _ in range(spares):
                self._spares.append(self._create())
        except BaseException:
            self.close()
            raise

    def _create(self) -> Context:
        with self._lock:
            self._generation += 1
            generation = self._generation
        context = self.engine.create_context(generation)
        with self._lock:
            self.stats.created += 1
        return context

    def _close_one(self, context: Context) -> None:
        try:
            context.close()
        except Exception:  # a broken context may fail to close; it is gone either way
            log.exception("closing context %d of %s failed", context.generation, self.engine.name)
        with self._lock:
            self.stats.closed += 1

    @property
    def live(self) -> int:
        """Contexts created and not yet closed: idle, lent out, abandoned and spare."""
        with self._lock:
            return self.stats.created - self.stats.closed

    @property
    def spares(self) -> int:
        with self._lock:
            return len(self._spares)

    @property
    def usable(self) -> int:
        """Slots that can run a request now: not missing, not held by an abandoned run."""
        with self._lock:
            if self._poison is not None or self._closed:
                return 0
            return max(0, self.size - self._missing - len(self._abandoned))

    @property
    def poisoned(self) -> DeviceFailure | None:
        return self._poison

    def poison(self, failure: DeviceFailure) -> None:
        """The device is broken: every later acquire fails fast with this failure, and no
        context is created on it any more."""
        with self._lock:
            if self._poison is None:
                self._poison = failure
            self._available.notify_all()

    def acquire(self, timeout: float | None = None) -> Context | None:
        """An idle context, or None when none came free within ``timeout`` seconds."""
        with self._lock:
            while True:
                if self._poison is not None:
                    raise DeviceFailure(self._poison.message, replica_id=self._poison.replica_id)
                if self._closed:
                    raise ContextFailure(f"{self.engine.name}: the context pool is closed")
                if self._idle:
                    context = self._idle.popleft()
                    self._busy.add(id(context))
                    return context
                if not self._available.wait(timeout):
                    return None

    def release(self, context: Context) -> None:
        """Give back a context that is still good."""
        with self._lock:
            self._busy.discard(id(context))
            if not self._closed:
                self._idle.append(context)
                self._available.notify()
                return
        self._close_one(context)

    def replace(self, context: Context) -> None:
        """Close a failed context and put a fresh one in its place. A warm spare is promoted
        when there is one (no allocation here); else one is created now, and if that fails
        too, the slot is left to the background refill rather than lost."""
        with self._lock:
            self._busy.discard(id(context))
            spare = self._spares.popleft() if self._spares and self._poison is None else None
        self._close_one(context)
        if spare is not None:
            with self._lock:
                self.stats.promoted += 1
            self._put_idle(spare)
        elif self._poison is None:
            try:
                fresh = self._create()
            except TrtServeError:
                with self._lock:
                    self._missing += 1
                log.exception("a cold create for %s failed; refilling later", self.engine.name)
            else:
                with self._lock:
                    self.stats.cold_creates += 1
                self._put_idle(fresh)
        self.refill_soon()

    def abandon(self, context: Context) -> None:
        """A lent context's run was given up on (its request cancelled or out of time): its
        slot gets a replacement now, and the context waits for ``discard``."""
        with self._lock:
            if id(context) not in self._busy:
                return
            self._busy.discard(id(context))
            self._abandoned.add(id(context))
            self._missing += 1
            self.stats.abandoned += 1
        self.refill_soon()

    def discard(self, context: Context) -> None:
        """An abandoned context's run returned: close it; its slot was refilled already."""
        with self._lock:
            self._abandoned.discard(id(context))
        self._close_one(context)

    def _put_idle(self, context: Context) -> None:
        with self._lock:
            if not self._closed and self._poison is None:
                self._idle.append(context)
                self._available.notify()
                return
        self._close_one(context)

    def refill_soon(self) -> None:
        """Restore missing slots, then spares, on the background thread."""
        # RuntimeError: the pool closed meanwhile, and nothing is wanted any more.
        with contextlib.suppress(RuntimeError):
            self._refiller.submit(self._refill)

    def _refill(self) -> None:
        while True:
            with self._lock:
                if self._closed or self._poison is not None:
                    return
                slot = self._missing > 0
                if not slot and len(self._spares) >= self.spares_wanted:
                    return
            try:
                context = self._create()
            except TrtServeError:
                with self._lock:
                    self.stats.refill_failures += 1
                log.exception("refilling a context of %s failed", self.engine.name)
                return
            with self._lock:
                if self._closed or self._poison is not None:
                    pass
                elif slot:
                    self._missing -= 1
                    self._idle.append(context)
                    self._available.notify()
                    continue
                else:
                    self._spares.append(context)
                    continue
            self._close_one(context)
            return

    def close(self) -> None:
        """Close every context not lent out; lent ones are closed when they come back."""
        with self._lock:
            self._closed = True
            idle = list(self._idle) + list(self._spares)
            self._idle.clear()
            self._spares.clear()
            self._available.notify_all()
        self._refiller.shutdown(wait=True)
        for context in idle:
            self._close_one(context)
