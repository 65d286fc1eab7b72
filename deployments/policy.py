"""The retry policy, in plain Python: what to do after each attempt of a request.

Like urllib3's ``Retry``: ``RetryPolicy`` is an immutable value (defaults per app, per
model, per request); ``RequestRetries`` is one request's history of attempts and the one
place that decides, after each failure, whether and where to try again. ``RetryBudget``
caps cross-replica retries over all requests (Finagle/Envoy style), and ``Ejections``
remembers replicas that failed badly enough to be skipped by everyone for a while.

``PoisonedInputs`` remembers the fingerprints of queries of death.

Nothing here imports Ray: the router feeds outcomes in as taxonomy errors, and replica ids
as strings, so every decision is tested without a cluster.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from engines.errors import (
    DeadlineExceeded,
    DeviceFailure,
    Overloaded,
    PoisonInput,
    ReplicaFailure,
    RetriesExhausted,
    TrtServeError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Every knob of the retry layer. Times in seconds.

    - ``local_retries``: fresh contexts a replica tries per request after a ContextFailure
      (the Router sends it with every attempt: this is its one default).
    - ``max_attempts``: distinct replicas tried per request, the first included.
    - ``deadline_s``: the whole request, every attempt and backoff included, unless the
      request sets its own; ``max_deadline_s`` caps what a request may ask for.
    - ``attempt_timeout_s``: one attempt on one replica, never past the deadline. The
      replica is told it and stops waiting or running when it passes.
    - ``eject_s``: how long a replica that failed with DeviceFailure or died is skipped by
      every request (a preference; an attempt that only timed out ejects nothing).
    - ``backpressure_wait_s``: how long a request may wait for room in a replica's queue
      before it is shed (503 with Retry-After), never past its deadline.
    - ``poison_window_s``: how long requests identical to a query of death are refused.
    - ``budget_ratio`` / ``budget_window_s`` / ``budget_min_per_s``: cross-replica retries
      allowed over the last window: ratio x requests + min_per_s x window.
    - ``backoff_base_s`` / ``backoff_max_s``: full-jitter exponential backoff when no replica
      can take the request (all excluded, ejected or full, or backpressure).
    """

    local_retries: int = 2
    max_attempts: int = 3
    deadline_s: float = 30.0
    max_deadline_s: float = 300.0
    attempt_timeout_s: float = 5.0
    eject_s: float = 10.0
    backpressure_wait_s: float = 1.0
    poison_window_s: float = 300.0
    budget_ratio: float = 0.2
    budget_window_s: float = 10.0
    budget_min_per_s: float = 10.0
    backoff_base_s: float = 0.005
    backoff_max_s: float = 0.25

    def __post_init__(self) -> None:
        if self.local_retries < 0 or self.max_attempts < 1:
            raise ValueError("local_retries must be >= 0 and max_attempts >= 1")
        positive = ("deadline_s", "max_deadline_s", "attempt_timeout_s", "budget_window_s",
                    "backoff_max_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eject_s", "budget_ratio", "budget_min_per_s", "backoff_base_s",
                     "backpressure_wait_s", "poison_window_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> RetryPolicy:
        return cls().updated(raw or {})

    def updated(self, raw: Mapping[str, Any]) -> RetryPolicy:
        """A copy with some knobs changed; an unknown knob is an error, not ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown retry setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **dict(raw))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def deadline_for(self, requested_s: float | None) -> float:
        """The request's deadline in seconds: its own, capped, or the default."""
        if requested_s is None:
            return min(self.deadline_s, self.max_deadline_s)
        if not requested_s > 0:
            raise DeadlineExceeded(f"the request's timeout ({requested_s}) is not > 0")
        return min(float(requested_s), self.max_deadline_s)

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(attempt, 30)))
        return (rng or random).uniform(0.0, cap)


class RetryBudget:
    """Cross-replica retries allowed: ``ratio`` of the requests seen over the last window,
    plus ``min_per_s`` per second of window, so a trickle of traffic can still retry
    while a failing fleet cannot be flooded with retries (retry storms)."""

    def __init__(self, ratio: float, window_s: float, min_per_s: float) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_per_s = min_per_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._lock = threading.Lock()

    @classmethod
    def for_policy(cls, policy: RetryPolicy) -> RetryBudget:
        return cls(policy.budget_ratio, policy.budget_window_s, policy.budget_min_per_s)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] < horizon:
                q.popleft()

    def record_request(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            self._requests.append(now)

    def allowed(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return self.ratio * len(self._requests) + self.min_per_s * self.window_s

    def try_spend(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            cap = self.ratio * len(self._requests) + self.min_per_s * self.window_s
            if len(self._retries) + 1 > cap:
                return False
            self._retries.append(now)
            return True


class Ejections:
    """Replicas skipped by every request until a time. Thread-safe, process-wide."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def eject(self, replica: str, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._until[replica] = max(self._until.get(replica, 0.0), now + seconds)

    def current(self, now: float | None = None) -> frozenset[str]:
        now = time.monotonic() if now is None else now
        with self._lock:
            for replica in [r for r, t in self._until.items() if t <= now]:
                del self._until[replica]
            return frozenset(self._until)

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


class PoisonedInputs:
    """Fingerprints of queries of death (model + every input's name, dtype, shape and bytes),
    each refused until its window ends. While none is remembered, ``refused`` hashes
    nothing: the hot path pays for this only after a query of death was seen."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def fingerprint(model: str, inputs: Mapping[str, np.ndarray]) -> str:
        digest = hashlib.blake2b(model.encode(), digest_size=16)
        for name in sorted(inputs):
            value = np.ascontiguousarray(inputs[name])
            digest.update(f"|{name}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.data)
        return digest.hexdigest()

    def add(self, model: str, inputs: Mapping[str, np.ndarray], seconds: float,
            now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = self.fingerprint(model, inputs)
        with self._lock:
            self._until[key] = now + seconds

    def refused(self, model: str, inputs: Mapping[str, np.ndarray],
                now: float | None = None) -> bool:
        if not self._until:
            return False
        now = time.monotonic() if now is None else now
        key = self.fingerprint(model, inputs)
        with self._lock:
            for stale in [k for k, t in self._until.items() if t <= now]:
                del self._until[stale]
            return key in self._until


@dataclass
class RequestRetries:
    """One request's attempts, and the decisions on them.

    ``before_attempt(live)`` answers at once when the replicas that failed this request
    cover every live one (nothing is ever sent to Serve's routing with nothing eligible).
    ``after_failure(error, replica, timed_out=...)`` records a failed attempt and either
    returns (try another replica, not one in ``exclude_now()``, preferably not one in
    ``ejected_now()``) or raises the error the request ends with, carrying the whole trail.
    ``after_backpressure()`` says how long to wait for room in a queue, or sheds the request.
    """

    policy: RetryPolicy
    budget: RetryBudget
    ejections: Ejections
    deadline: float  # a time.monotonic() value
    model: str = ""
    trail: list[dict[str, Any]] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    replicas_tried: int = 0
    broke_on: int = 0  # replicas that died or failed with DeviceFailure under this request
    waits: int = 0
    backpressure_since: float | None = None
    budget_refused: bool = False  # the last failover was refused for want of retry budget

    def remaining_s(self, now: float | None = None) -> float:
        return self.deadline - (time.monotonic() if now is None else now)

    def attempt_timeout_s(self, now: float | None = None) -> float:
        return max(0.0, min(self.policy.attempt_timeout_s, self.remaining_s(now)))

    def exclude_now(self) -> list[str]:
        """Replicas this attempt must not go to: those that failed it."""
        return sorted(self.excluded)

    def ejected_now(self, now: float | None = None) -> list[str]:
        """Replicas every request avoids for now, unless nothing else is left."""
        return sorted(self.ejections.current(now) - self.excluded)

    def deadline_exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"{self.model}: the request's deadline passed after {self.replicas_tried} failed "
            f"attempt(s)",
            trail=self.trail,
        )

    def check_deadline(self, now: float | None = None) -> None:
        if self.remaining_s(now) <= 0:
            raise self.deadline_exceeded()

    def no_replica(self) -> RetriesExhausted:
        """The error for a request that has no replica left to try."""
        return RetriesExhausted(
            f"{self.model}: no healthy replica left to try (failed this request: "
            f"{', '.join(self.exclude_now()) or 'none'})",
            trail=self.trail,
        )

    def before_attempt(self, live: frozenset[str] | None, now: float | None = None) -> None:
        """Raise the final error when no attempt can start: out of time, or every live
        replica already failed this request. ``live`` None: not known yet (no check)."""
        self.check_deadline(now)
        if live is not None and live <= self.excluded:
            raise self.no_replica()

    def after_backpressure(self, now: float | None = None) -> float:
        """Every queue is full and nobody is to blame: seconds to wait before trying again,
        or Overloaded once the request has waited ``backpressure_wait_s``."""
        now = time.monotonic() if now is None else now
        self.check_deadline(now)
        if self.backpressure_since is None:
            self.backpressure_since = now
        waited = now - self.backpressure_since
        if waited >= self.policy.backpressure_wait_s:
            raise Overloaded(
                f"{self.model}: every replica's queue stayed full for {waited:.2f} s; "
                f"retry later",
                trail=self.trail,
            )
        self.waits += 1
        left = min(self.policy.backpressure_wait_s - waited, self.remaining_s(now))
        return min(self.policy.backoff_s(self.waits), max(0.0, left))

    def after_failure(
        self,
        error: TrtServeError,
        replica: str | None,
        *,
        timed_out: bool = False,
        died: bool = False,
        spend: bool = True,
    ) -> None:
        """Record a failed attempt; return to try another replica, or raise the final error.

        ``timed_out``: the attempt ran out of its time; the replica may only have been busy,
        so it is excluded for this request and ejected for nobody. ``died``: the replica's
        process ended while this request was in flight on it. A DeviceFailure, a death or an
        unavailable replica ejects it; a second replica broken under this request (by a
        DeviceFailure or its death) makes the request a query of death. ``spend`` False: the
        retry budget was already charged for this failover (a batch's other requests)."""
        if error.retry == "final":  # made by this request's own bookkeeping: trail is ours
            raise error
        self.trail.extend(error.trail)
        if error.retry == "never":
            error.trail = self.trail
            raise error
        self.replicas_tried += 1
        broke = died or isinstance(error, DeviceFailure)
        if replica is not None:
            self.excluded.add(replica)
            # A replica that answered ContextFailure is healthy; its contexts were unlucky.
            if broke or (isinstance(error, ReplicaFailure) and not timed_out):
                self.ejections.eject(replica, self.policy.eject_s)
        if broke:
            self.broke_on += 1
            if self.broke_on >= 2:
                raise PoisonInput(
                    f"{self.model}: two replicas broke while running this request (last: "
                    f"{type(error).__name__}: {error.message}); identical requests are "
                    f"refused for {self.policy.poison_window_s:g} s",
                    trail=self.trail,
                )
        self.check_deadline()
        last = f"last: {type(error).__name__}: {error.message}"
        if self.replicas_tried >= self.policy.max_attempts:
            raise RetriesExhausted(
                f"{self.model}: {self.replicas_tried} replica(s) failed this request; {last}",
                trail=self.trail,
            )
        if spend and not self.budget.try_spend():
            self.budget_refused = True
            raise RetriesExhausted(
                f"{self.model}: retry budget spent (at most {self.policy.budget_ratio:.0%} "
                f"of requests + {self.policy.budget_min_per_s:g}/s over "
                f"{self.policy.budget_window_s:g} s); {last}",
                trail=self.trail,
            )
