"""ContextPool: execution contexts ready to lend, plus warm spares to replace failed ones.

Contexts are created up front (``size`` active and ``spares`` warm), so a request never
waits for an allocation: when one fails, it is closed and a spare is promoted in its place,
and a background thread builds the next spare. Only when the spares run out (faster failures
than refills) is a context created on the request's path, and that is counted.

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
        """Contexts created and not yet closed: idle, lent out and spare."""
        with self._lock:
            return self.stats.created - self.stats.closed

    @property
    def spares(self) -> int:
        with self._lock:
            return len(self._spares)

    @property
    def poisoned(self) -> DeviceFailure | None:
        return self._poison

    def poison(self, failure: DeviceFailure) -> None:
        """The device is broken: every later acquire fails fast with this failure."""
        with self._lock:
            if self._poison is None:
                self._poison = failure
            self._available.notify_all()

    def acquire(self, timeout: float | None = None) -> Context:
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
                    raise ContextFailure(
                        f"{self.engine.name}: all {self.size} contexts busy for {timeout} s"
                    )

    def release(self, context: Context) -> None:
        """Give back a context that is still good."""
        with self._lock:
            self._busy.discard(id(context))
            if not self._closed:
                self._idle.append(context)
                self._available.notify()
                return
        self._close_one(context)

    def replace(self, context: Context) -> int:
        """Close a failed context and put a fresh one in its place; return the new one's
        generation. A warm spare is promoted when there is one (no allocation here)."""
        with self._lock:
            self._busy.discard(id(context))
            spare = self._spares.popleft() if self._spares else None
        self._close_one(context)
        if spare is None:
            spare = self._create()
            with self._lock:
                self.stats.cold_creates += 1
        else:
            with self._lock:
                self.stats.promoted += 1
        with self._lock:
            closed = self._closed
            if not closed:
                self._idle.append(spare)
                self._available.notify()
        if closed:
            self._close_one(spare)
            return spare.generation
        # RuntimeError: the pool closed meanwhile, and no spare is wanted any more.
        with contextlib.suppress(RuntimeError):
            self._refiller.submit(self._refill)
        return spare.generation

    def _refill(self) -> None:
        with self._lock:
            short = self.spares_wanted - len(self._spares)
            if self._closed or self._poison is not None or short <= 0:
                return
        try:
            spare = self._create()
        except TrtServeError:
            with self._lock:
                self.stats.refill_failures += 1
            log.exception("refilling a spare context of %s failed", self.engine.name)
            return
        with self._lock:
            if not self._closed:
                self._spares.append(spare)
                return
        self._close_one(spare)

    def close(self) -> None:
        """Close every context not lent out; lent ones are closed when released."""
        with self._lock:
            self._closed = True
            idle = list(self._idle) + list(self._spares)
            self._idle.clear()
            self._spares.clear()
            self._available.notify_all()
        self._refiller.shutdown(wait=True)
        for context in idle:
            self._close_one(context)
