"""Dynamic batching in the Router, with Triton's knobs: concurrent requests for one model
become one execution, so the Router->replica hop, its serialization and the GPU's launch
costs are paid per batch, not per request.

``Batcher`` is plain asyncio (no Ray): requests queue per shape (the non-batch dimensions and
dtypes of every input: requests that differ are never mixed) and leave in batches of at most
``batch_size`` rows whenever one of the model's ``slots`` is free (a slot is one batch in
flight from this Router; ``router_slots``). So a lone request leaves at once, and
under load requests gather while the slots are busy. ``max_queue_delay_us`` > 0 holds a
batch back, for at most that long, until it reaches the largest preferred size (or
``batch_size``). A request whose deadline passes in the queue is answered DeadlineExceeded
and never runs. What a batch does on the way (retries, splits) is ``attempts.py``'s.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.errors import DeadlineExceeded
from engines.spec import IOSpec

Key = tuple[tuple[str, str, tuple[int, ...]], ...]
# Batches each context has coming from all the Routers together under
# ``router_batches_in_flight: auto``. More only wait in the replica: HTTP binary at 256
# callers on an H100, one per context against two, served 1,452 against 982 req/s with 4
# Routers (four per context, the old rule: 1,138), 1,987 against 1,858 with 8, and 2,277
# against 1,877 with 12 (docs/benchmarks.md).
SLOTS_PER_CONTEXT = 1


def router_slots(contexts: int, routers: int, setting: str | int) -> int:
    """How many batches of a model one Router keeps in flight. ``contexts``: the live
    replicas' contexts for the model, which every Router shares. A Router counting them all
    as its own would send ``routers`` times more batches than can run, each that much
    smaller, and the hop to a replica and its execution are paid per batch. Rounded up: every
    Router can send at least one."""
    if setting != "auto":
        return int(setting)
    return max(1, math.ceil(contexts * SLOTS_PER_CONTEXT / max(1, routers)))


@dataclass(frozen=True)
class BatchPolicy:
    """Triton's dynamic batcher knobs for one model. ``batch_size`` 1 turns batching off."""

    batch_size: int = 32
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_queue_delay_us < 0:
            raise ValueError("batch_size must be >= 1 and max_queue_delay_us >= 0")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} are outside [1, {self.batch_size}]")

    @classmethod
    def for_model(cls, raw: dict[str, Any], spec: IOSpec) -> BatchPolicy:
        """The model's knobs, capped by its own batch limit; off for a model some tensor of
        which has no batch dimension (its outputs could not be split back)."""
        size = int(raw.get("batch_size", cls.batch_size))
        if spec.max_batch is not None:
            size = min(size, spec.max_batch)
        if not all(t.batched for t in (*spec.inputs, *spec.outputs)):
            size = 1
        preferred = tuple(sorted(p for p in raw.get("preferred_batch_sizes") or () if p <= size))
        return cls(size, int(raw.get("max_queue_delay_us", 0)), preferred)

    @property
    def enabled(self) -> bool:
        return self.batch_size > 1

    @property
    def target(self) -> int:
        """The size a delayed batch waits for."""
        return max(self.preferred_batch_sizes, default=self.batch_size)


@dataclass
class Pending:
    """One validated request waiting for its batch. ``payload`` is the caller's (the attempt
    loop keeps the request's retries there)."""

    inputs: dict[str, np.ndarray]
    deadline: float  # time.monotonic()
    payload: Any
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop()
                                        .create_future())
    queued_at: float = field(default_factory=time.monotonic)
    left_at: float | None = None  # when its batch left the queue

    @property
    def waited_s(self) -> float:
        """Time spent in the batch queue (0 when it never left it)."""
        return 0.0 if self.left_at is None else self.left_at - self.queued_at

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def own_request(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task outside the caller's request context. Serve gives every handle call made in one
    request context the same internal request id, and its router tracks pending requests by
    that id: two calls in flight at once from one context leave one of them never routed. A
    batch (or a part of one) sent on behalf of several requests is a request of its own."""
    return asyncio.get_running_loop().create_task(work, context=contextvars.Context())


def shape_key(inputs: dict[str, np.ndarray]) -> Key:
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items())


def concatenate(batch: list[Pending]) -> dict[str, np.ndarray]:
    """One contiguous array per input: one message to the replica, not a list of small ones."""
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch])
            for name in batch[0].inputs}


def split(outputs: dict[str, np.ndarray], batch: list[Pending]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of the batch's outputs, in order."""
    if len(batch) == 1:
        return [outputs]
    cuts = np.cumsum([p.rows for p in batch])[:-1]
    parts = {name: np.split(value, cuts) for name, value in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(batch))]


class Batcher:
    """``run(batch)`` executes a batch and settles every Pending's future; ``slots()`` says
    how many batches may be in flight at once."""

    def __init__(
        self,
        model: str,
        policy: BatchPolicy,
        slots: Callable[[], int],
        run: Callable[[list[Pending]], Awaitable[None]],
    ) -> None:
        self.model = model
        self.policy = policy
        self._slots = slots
        self._run = run
        self._queues: dict[Key, deque[Pending]] = {}
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, pending: Pending) -> Any:
        self._queues.setdefault(shape_key(pending.inputs), deque()).append(pending)
        self._pump()
        try:
            # Bounded here too: while every slot is busy, nothing pumps the queue.
            return await asyncio.wait_for(
                asyncio.shield(pending.future), pending.deadline - time.monotonic()
            )
        except TimeoutError:
            if not pending.future.cancel():  # it finished meanwhile after all
                return pending.future.result()
            raise DeadlineExceeded(
                f"{self.model}: the request's deadline passed before its batch answered"
            ) from None
        except asyncio.CancelledError:
            pending.future.cancel()  # the caller went away: never run it
            raise

    def _pump(self) -> None:
        while self._in_flight < max(1, self._slots()):
            batch = self._next_batch()
            if not batch:
                return
            self._in_flight += 1
            task = own_request(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_batch(self) -> list[Pending]:
        """The oldest queue's next batch, or [] when it should wait (or nothing is queued)."""
        now = time.monotonic()
        for key in list(self._queues):
            self._drop_expired(key, now)
        heads = [(q[0].queued_at, key) for key, q in self._queues.items() if q]
        if not heads:
            return []
        _, key = min(heads)
        queue = self._queues[key]
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= self.policy.batch_size:
            rows += queue[0].rows
            batch.append(queue.popleft())
        waited_us = (now - batch[0].queued_at) * 1e6
        if rows < self.policy.target and waited_us < self.policy.max_queue_delay_us:
            queue.extendleft(reversed(batch))
            self._wake_in((self.policy.max_queue_delay_us - waited_us) / 1e6)
            return []
        for pending in batch:
            pending.left_at = now
        return batch

    def _drop_expired(self, key: Key, now: float) -> None:
        queue = self._queues[key]
        kept: deque[Pending] = deque()
        for pending in queue:
            if pending.future.done():
                continue  # the caller went away
            if pending.deadline <= now:
                pending.future.set_exception(DeadlineExceeded(
                    f"{self.model}: the request's deadline passed while it waited for a batch; "
                    f"it never ran"
                ))
                continue
            kept.append(pending)
        self._queues[key] = kept

    def _wake_in(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._woken)

    def _woken(self) -> None:
        self._timer = None
        self._pump()

    async def _execute(self, batch: list[Pending]) -> None:
        try:
            await self._run(batch)
        except BaseException as exc:  # run settles its futures; this is the backstop
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._pump()
