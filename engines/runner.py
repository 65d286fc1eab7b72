"""The local half of the retry policy: run a request on a fresh context when one fails.

``ModelRunner`` is one loaded model in one process: its engine (loaded once), its context
pool, and ``infer``, which lends a context, executes, and on ContextFailure replaces the
context with a warm spare and tries again, at most ``local_retries`` times (OutOfMemory:
at most ``OutOfMemory.local_retries``, then it goes back to the router). A DeviceFailure
poisons the runner: the process's GPU state is gone, so every later request fails fast
instead of being tried on a device that cannot answer.

Inputs arrive validated (the Router validates each request once, against the same IOSpec);
the backend's own checks still turn anything it rejects into InvalidInput.

Every context lent out goes back in a ``finally``: released when it is good, replaced when it
failed in any way (a foreign exception included), and replaced, never released, when the
request was abandoned meanwhile (``Call.cancel``: cancelled by its caller or out of time).

Every attempt is recorded as an Attempt; the router appends its own, and the whole trail
goes back to the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .backend import Context, Engine
from .errors import (
    ContextFailure,
    DeadlineExceeded,
    DeviceFailure,
    InvalidInput,
    OutOfMemory,
    TrtServeError,
)
from .pool import ContextPool
from .spec import IOSpec


@dataclass(frozen=True)
class Attempt:
    """One try of one request. ``outcome`` is "ok" or the taxonomy error's class name."""

    model: str
    outcome: str
    ms: float
    replica: str | None = None
    generation: int | None = None
    message: str = ""
    batch: int | None = None  # rows executed together (a dynamic batch, or the request's own)
    queue_ms: float | None = None  # of ``ms``, waiting (for the replica's limit, a context)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


class Call:
    """One request's run, as seen from another thread: ``cancel()`` stops it where it is
    (waiting for a context, or executing: the context's own ``cancel``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: Context | None = None
        self._pool: ContextPool | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            context = self._context
            if context is not None and self._pool is not None:
                # Under this lock: the run cannot hand the context back meanwhile, so it is
                # never abandoned after another request got it.
                self._pool.abandon(context)
        if context is not None:
            context.cancel()

    def _lend(self, context: Context, pool: ContextPool) -> bool:
        with self._lock:
            if self.cancelled:
                return False
            self._context, self._pool = context, pool
            return True

    def _return(self) -> bool:
        """Unregister the lent context; True when it was abandoned while lent."""
        with self._lock:
            abandoned = self.cancelled and self._context is not None
            self._context = self._pool = None
            return abandoned


class ModelRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        pool_size: int = 4,
        spares: int = 1,
        replica: str | None = None,
    ) -> None:
        self.engine = engine
        self.pool = ContextPool(engine, size=pool_size, spares=spares)
        self.replica = replica
        # time.monotonic() of the last execution that returned outputs: the health check
        # needs no canary while requests prove the device works.
        self.last_ok: float | None = None

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def spec(self) -> IOSpec:
        return self.engine.spec

    @property
    def poisoned(self) -> DeviceFailure | None:
        return self.pool.poisoned

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        local_retries: int,
        deadline: float | None = None,
        call: Call | None = None,
        since: float | None = None,
    ) -> tuple[dict[str, np.ndarray], list[Attempt]]:
        """Outputs and the attempt trail. Raises a taxonomy error carrying the trail.

        ``deadline`` is a time.monotonic() value bounding the wait for a context; ``call``
        lets another thread abandon the request; ``since`` (time.perf_counter()) is when the
        request reached the replica, so the first try's time includes its wait there."""
        if local_retries < 0:
            raise ValueError(f"local_retries must be >= 0, got {local_retries}")
        call = call or Call()
        rows = _rows(inputs)
        trail: list[Attempt] = []
        for _ in range(local_retries + 1):
            started, since = since or time.perf_counter(), None
            try:
                context = self._acquire(deadline, call)
            except TrtServeError as exc:
                trail.append(self._attempt(exc, started, None, None))
                raise self._with_trail(exc, trail) from None
            queued = _ms(started)
            try:
                outputs = self._execute(context, inputs, call)
            except ContextFailure as exc:
                trail.append(self._attempt(exc, started, context.generation, rows, queued))
                if call.cancelled:
                    raise self._with_trail(_abandoned(self.name), trail) from None
                # Out of memory gets fewer local tries: past those, another replica's memory.
                if isinstance(exc, OutOfMemory) and sum(
                    a.outcome == "OutOfMemory" for a in trail
                ) > exc.local_retries:
                    raise self._with_trail(exc, trail) from None
                continue
            except TrtServeError as exc:
                trail.append(self._attempt(exc, started, context.generation, rows, queued))
                raise self._with_trail(exc, trail) from None
            trail.append(
                Attempt(self.name, "ok", _ms(started), self.replica, context.generation,
                        batch=rows, queue_ms=queued)
            )
            return outputs, trail
        raise ContextFailure(
            f"{self.name}: {local_retries + 1} contexts failed in a row on this replica",
            trail=[a.to_dict() for a in trail],
            replica_id=self.replica,
        )

    def _acquire(self, deadline: float | None, call: Call) -> Context:
        timeout = None if deadline is None else deadline - time.monotonic()
        if call.cancelled or (timeout is not None and timeout <= 0):
            raise _abandoned(self.name)
        context = self.pool.acquire(timeout)
        if context is None:
            raise DeadlineExceeded(
                f"{self.name}: the deadline passed while every context was busy"
            )
        if not call._lend(context, self.pool):
            self.pool.release(context)
            raise _abandoned(self.name)
        return context

    def _execute(
        self, context: Context, inputs: Mapping[str, np.ndarray], call: Call
    ) -> dict[str, np.ndarray]:
        """One execution; the context goes back (or is replaced) whatever happens."""
        keep = False
        try:
            outputs = context.execute(inputs)
            keep = True
            self.last_ok = time.monotonic()
            return outputs
        except InvalidInput:
            keep = True  # the model rejected the input; the context is fine
            raise
        except DeviceFailure as exc:
            # Poisoned before the context goes back: nothing is created on a broken device.
            exc.replica_id = exc.replica_id or self.replica
            self.pool.poison(exc)
            raise
        except TrtServeError:
            raise
        except Exception as exc:  # a backend bug must not leak the context or the slot
            raise ContextFailure(
                f"{self.name} (context {context.generation}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if call._return():
                self.pool.discard(context)
            elif keep:
                self.pool.release(context)
            else:
                self.pool.replace(context)

    def _attempt(
        self, exc: TrtServeError, started: float, generation: int | None, rows: int | None,
        queued: float | None = None,
    ) -> Attempt:
        return Attempt(
            self.name, type(exc).__name__, _ms(started), self.replica, generation, exc.message,
            rows, queued,
        )

    def _with_trail(self, exc: TrtServeError, trail: list[Attempt]) -> TrtServeError:
        exc.trail = [a.to_dict() for a in trail]
        exc.replica_id = exc.replica_id or self.replica
        return exc

    def close(self) -> None:
        self.pool.close()
        self.engine.close()


def _abandoned(model: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"{model}: the request was abandoned (cancelled or out of time)")


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
