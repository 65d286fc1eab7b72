"""Ray's view of a failed attempt, in the taxonomy.

Ray raises an error that is both a ``RayTaskError`` and the replica's own class; it is
unwrapped here, so names in the trail and in metrics are the taxonomy's
(``ContextFailure``, never ``RayTaskError(ContextFailure)``), and an error raised without a
replica id gets the one the Router chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from engines.errors import DeadlineExceeded, ReplicaFailure, TrtServeError


@dataclass
class FailedAttempt(Exception):
    """One attempt's failure as the retry policy needs it (``RequestRetries.after_failure``)."""

    error: TrtServeError
    replica: str | None
    timed_out: bool = False
    died: bool = False


def unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def failed_attempt(exc: BaseException, replica: str | None) -> FailedAttempt:
    cause = unwrap(exc)
    if isinstance(cause, DeadlineExceeded):
        # The replica stopped at the attempt's time limit (it is told it); the request itself
        # may have time left for another replica.
        error: TrtServeError = ReplicaFailure(
            f"attempt on replica {replica} ran out of its time there: {cause.message}",
            trail=cause.trail,
            replica_id=cause.replica_id or replica,
        )
        return FailedAttempt(error, replica, timed_out=True)
    if isinstance(cause, TrtServeError):
        if cause.replica_id is None:
            cause.replica_id = replica
        return FailedAttempt(cause, replica)
    if isinstance(exc, ActorDiedError):
        what = f"replica {replica} died with this request in flight"
        return FailedAttempt(ReplicaFailure(what, replica_id=replica), replica, died=True)
    if isinstance(exc, RayActorError | ReplicaUnavailableError):
        what = f"replica {replica} became unavailable: {type(exc).__name__}"
    else:
        what = f"replica {replica} failed: {type(exc).__name__}: {exc}"
    return FailedAttempt(ReplicaFailure(what, replica_id=replica), replica)


def outcome(exc: BaseException) -> str:
    """A metric label for how a request ended."""
    cause = unwrap(exc)
    return type(cause).__name__
