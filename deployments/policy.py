"""The retry policy, in plain Python: what to do after each attempt of a request.

Like urllib3's ``Retry``: ``RetryPolicy`` is an immutable value (defaults per app, per
model, per request); ``RequestRetries`` is one request's history of attempts and the one
place that decides, after each failure, whether and where to try again. ``RetryBudget``
caps cross-replica retries over all requests (Finagle/Envoy style), and ``Ejections``
remembers replicas that failed badly enough to be skipped by everyone for a while.

Nothing here imports Ray: the router feeds outcomes in as taxonomy errors.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from engines.errors import (
    DeadlineExceeded,
    DeviceFailure,
    ReplicaFailure,
    RetriesExhausted,
    TrtServeError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Every knob of the retry layer. Times in seconds.

    - ``local_retries``: fresh contexts a replica tries per request after a ContextFailure.
    - ``max_attempts``: distinct replicas tried per request, the first included.
    - ``deadline_s``: the whole request, every attempt and backoff included.
    - ``attempt_timeout_s``: one attempt on one replica, never past the deadline.
    - ``eject_s``: how long a replica that failed with DeviceFailure or ReplicaFailure is
      skipped by every request.
    - ``budget_ratio`` / ``budget_window_s`` / ``budget_min_per_s``: cross-replica retries
      allowed over the last window: ratio x requests + min_per_s x window.
    - ``backoff_base_s`` / ``backoff_max_s``: full-jitter exponential backoff when no replica
      can take the request (all excluded, ejected or full, or backpressure).
    """

    local_retries: int = 2
    max_attempts: int = 3
    deadline_s: float = 30.0
    attempt_timeout_s: float = 5.0
    eject_s: float = 10.0
    budget_ratio: float = 0.2
    budget_window_s: float = 10.0
    budget_min_per_s: float = 10.0
    backoff_base_s: float = 0.005
    backoff_max_s: float = 0.25

    def __post_init__(self) -> None:
        if self.local_retries < 0 or self.max_attempts < 1:
            raise ValueError("local_retries must be >= 0 and max_attempts >= 1")
        positive = ("deadline_s", "attempt_timeout_s", "budget_window_s", "backoff_max_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eject_s", "budget_ratio", "budget_min_per_s", "backoff_base_s"):
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


@dataclass
class RequestRetries:
    """One request's attempts, and the decisions on them.

    ``after_failure(error, replica)`` records a failed attempt and either returns (try
    another replica, not one in ``exclude_now()``, preferably not one in ``ejected_now()``)
    or raises the error the request ends with,
    carrying the whole trail.
    """

    policy: RetryPolicy
    budget: RetryBudget
    ejections: Ejections
    deadline: float  # a time.monotonic() value
    model: str = ""
    trail: list[dict[str, Any]] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    replicas_tried: int = 0
    waits: int = 0

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
        """The error for a request that found no replica to try before its deadline."""
        return RetriesExhausted(
            f"{self.model}: no healthy replica left to try before the deadline (failed this "
            f"request: {', '.join(self.exclude_now()) or 'none'})",
            trail=self.trail,
        )

    def backpressure_wait_s(self) -> float:
        """Every queue is full and nobody is to blame: how long to wait before trying again."""
        self.check_deadline()
        self.waits += 1
        return min(self.policy.backoff_s(self.waits), max(0.0, self.remaining_s()))

    def after_failure(self, error: TrtServeError, replica: str | None) -> None:
        """Record a failed attempt; return to try another replica, or raise the final error."""
        if error.retry == "final":  # made by this request's own bookkeeping: trail is ours
            raise error
        self.trail.extend(error.trail)
        if error.retry == "never":
            error.trail = self.trail
            raise error
        self.replicas_tried += 1
        if replica is not None:
            self.excluded.add(replica)
            # A replica that answered ContextFailure is healthy; its contexts were unlucky.
            if isinstance(error, DeviceFailure | ReplicaFailure):
                self.ejections.eject(replica, self.policy.eject_s)
        self.check_deadline()
        last = f"last: {type(error).__name__}: {error.message}"
        if self.replicas_tried >= self.policy.max_attempts:
            raise RetriesExhausted(
                f"{self.model}: {self.replicas_tried} replica(s) failed this request; {last}",
                trail=self.trail,
            )
        if not self.budget.try_spend():
            raise RetriesExhausted(
                f"{self.model}: retry budget spent (at most {self.policy.budget_ratio:.0%} "
                f"of requests + {self.policy.budget_min_per_s:g}/s over "
                f"{self.policy.budget_window_s:g} s); {last}",
                trail=self.trail,
            )
