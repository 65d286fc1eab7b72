"""The error taxonomy: every failure anywhere in trtserve maps to one of these classes.

Each class says whether a retry can help and where (``retry``), and which HTTP status the
ingress answers with when the request finally fails with it. The router decides from the
class alone, so a backend must never let a foreign exception escape: it wraps it in one of
these, keeping the original message.
"""

from __future__ import annotations

from typing import Any, Literal

RetryScope = Literal["never", "same-replica", "other-replica", "final"]


class TrtServeError(Exception):
    """Base of the taxonomy. ``trail`` is the attempt history (a list of plain dicts)."""

    retry: RetryScope = "never"
    http_status: int = 500

    def __init__(
        self,
        message: str,
        *,
        trail: list[dict[str, Any]] | None = None,
        replica_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.trail: list[dict[str, Any]] = list(trail or [])
        self.replica_id = replica_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions between processes; keyword-only fields must survive that.
        return (_rebuild, (type(self), self.message, self.trail, self.replica_id))

    def __str__(self) -> str:
        return self.message


def _rebuild(
    cls: type[TrtServeError], message: str, trail: list[dict[str, Any]], replica_id: str | None
) -> TrtServeError:
    return cls(message, trail=trail, replica_id=replica_id)


class InvalidInput(TrtServeError):
    """Unknown tensor, wrong dtype or shape, outside the profile, malformed body."""

    http_status = 400


class UnknownModel(TrtServeError):
    """No such model or version."""

    http_status = 404


class PayloadTooLarge(TrtServeError):
    """A request body over the configured size limit."""

    http_status = 413


class ContextFailure(TrtServeError):
    """This execution context failed (rejected enqueue, non-sticky CUDA error, allocation).

    A fresh context in the same process can succeed.
    """

    retry = "same-replica"
    http_status = 503


class OutOfMemory(ContextFailure):
    """The device ran out of memory for this execution (cudaErrorMemoryAllocation, TensorRT's
    FAILED_ALLOCATION).

    Memory may come back once other work finishes, so one fresh context in the same replica
    is worth a try; a second failure sends the request to another replica.
    """

    local_retries = 1


class ExecutionError(TrtServeError):
    """A deterministic execution failure (invalid value, no kernel image for this device):
    the same work fails the same way on any context, so it is never retried."""

    retry = "never"
    http_status = 500


class DeviceFailure(TrtServeError):
    """The process's CUDA state is broken (sticky error, failed canary): it must restart."""

    retry = "other-replica"
    http_status = 503


class ReplicaFailure(TrtServeError):
    """Router side only: a replica died, was unavailable, or an attempt timed out."""

    retry = "other-replica"
    http_status = 503


class EngineLoadFailure(TrtServeError):
    """A model cannot be loaded here: no GPU or driver, a GPU the runtime refuses, a plan
    built by another TensorRT version or for another GPU, a file ONNX Runtime rejects.

    Raised at load time, never for a request; ``backend="auto"`` falls back on it.
    """

    http_status = 503


class PoisonInput(TrtServeError):
    """A query of death: the request was in flight on two replicas that each broke on it
    (DeviceFailure or death). Identical requests are refused for ``poison_window_s``."""

    retry = "final"
    http_status = 422


class RetriesExhausted(TrtServeError):
    """Attempts or retry budget spent, or no healthy replica left."""

    retry = "final"
    http_status = 503


class Overloaded(RetriesExhausted):
    """Every replica's queue stayed full for ``backpressure_wait_s``: load was shed before
    any replica saw the request. HTTP adds Retry-After."""


class DeadlineExceeded(TrtServeError):
    """The request's deadline passed."""

    retry = "final"
    http_status = 504
