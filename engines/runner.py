"""The local half of the retry policy: run a request on a fresh context when one fails.

``ModelRunner`` is one loaded model in one process: its engine (loaded once), its context
pool, and ``infer``, which lends a context, executes, and on ContextFailure replaces the
context with a warm spare and tries again, at most ``local_retries`` times (OutOfMemory:
at most ``OutOfMemory.local_retries``, then it goes back to the router). A DeviceFailure
poisons the runner: the process's GPU state is gone, so every later request fails fast
instead of being tried on a device that cannot answer.

Every attempt is recorded as an Attempt; the router appends its own, and the whole trail
goes back to the caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .backend import Engine
from .errors import ContextFailure, DeviceFailure, InvalidInput, OutOfMemory, TrtServeError
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

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


class ModelRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        pool_size: int = 4,
        spares: int = 1,
        local_retries: int = 2,
        replica: str | None = None,
        acquire_timeout_s: float = 30.0,
    ) -> None:
        if local_retries < 0:
            raise ValueError(f"local_retries must be >= 0, got {local_retries}")
        self.engine = engine
        self.pool = ContextPool(engine, size=pool_size, spares=spares)
        self.local_retries = local_retries
        self.replica = replica
        self.acquire_timeout_s = acquire_timeout_s

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
        self, inputs: Mapping[str, Any], local_retries: int | None = None
    ) -> tuple[dict[str, np.ndarray], list[Attempt]]:
        """Outputs and the attempt trail. Raises a taxonomy error carrying the trail."""
        retries = self.local_retries if local_retries is None else local_retries
        trail: list[Attempt] = []
        try:
            checked = self.spec.validate(inputs)
        except InvalidInput as exc:
            exc.replica_id = self.replica
            raise
        for _ in range(retries + 1):
            started = time.perf_counter()
            try:
                context = self.pool.acquire(self.acquire_timeout_s)
            except TrtServeError as exc:
                trail.append(self._attempt(exc, started, None))
                raise self._with_trail(exc, trail) from None
            try:
                outputs = context.execute(checked)
            except ContextFailure as exc:
                trail.append(self._attempt(exc, started, context.generation))
                self.pool.replace(context)
                # Out of memory gets fewer local tries: past those, another replica's memory.
                if isinstance(exc, OutOfMemory) and sum(
                    a.outcome == "OutOfMemory" for a in trail
                ) > exc.local_retries:
                    raise self._with_trail(exc, trail) from None
                continue
            except DeviceFailure as exc:
                trail.append(self._attempt(exc, started, context.generation))
                failure = self._with_trail(exc, trail)
                self.pool.poison(failure)
                self.pool.replace(context)
                raise failure from None
            except InvalidInput as exc:
                # The input passed validation but the model rejected it: the context is fine.
                self.pool.release(context)
                trail.append(self._attempt(exc, started, context.generation))
                raise self._with_trail(exc, trail) from None
            except TrtServeError as exc:
                self.pool.replace(context)
                trail.append(self._attempt(exc, started, context.generation))
                raise self._with_trail(exc, trail) from None
            self.pool.release(context)
            trail.append(
                Attempt(self.name, "ok", _ms(started), self.replica, context.generation)
            )
            return outputs, trail
        raise ContextFailure(
            f"{self.name}: {retries + 1} contexts failed in a row on this replica",
            trail=[a.to_dict() for a in trail],
            replica_id=self.replica,
        )

    def _attempt(self, exc: TrtServeError, started: float, generation: int | None) -> Attempt:
        return Attempt(
            self.name, type(exc).__name__, _ms(started), self.replica, generation, exc.message
        )

    def _with_trail(self, exc: TrtServeError, trail: list[Attempt]) -> TrtServeError:
        exc.trail = [a.to_dict() for a in trail]
        exc.replica_id = exc.replica_id or self.replica
        return exc

    def close(self) -> None:
        self.pool.close()
        self.engine.close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
