"""Every metric trtserve exports, in one place: names, descriptions, labels, histogram
boundaries, and the Triton metric each one stands for (docs/metrics.md is the operator's
view of this table).

Metrics go through ``ray.serve.metrics``, so Ray's per-node exporter serves them to
Prometheus, named ``ray_<name>`` (counters ``ray_<name>_total``); ``RELABEL_REGEX`` turns
them back into the names below. Serve adds ``application``, ``deployment`` and ``replica``
labels itself.

Two owners record them. ``RouterMetrics`` (the Router process) counts requests, attempts,
retries, failovers, ejections and poisoned replicas from the attempt trails: a replica that
breaks exits within a second, and whatever it had not exported yet would be lost.
``ReplicaMetrics`` (each engine replica) exports what only the replica knows: its contexts
and its GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ray.serve import context as serve_context
from ray.serve.metrics import Counter, Gauge, Histogram

from engines.errors import (
    DeadlineExceeded,
    DeviceFailure,
    ExecutionError,
    InvalidInput,
    Overloaded,
    PoisonInput,
    RetriesExhausted,
    UnknownModel,
)

from .ray_errors import FailedAttempt, unwrap

log = logging.getLogger("ray.serve")

# Prometheus metric_relabel_configs regex (RE2; Python's re reads it the same way): the name
# Ray exports -> the name in this module (Triton's for nv_*), "_total" dropped.
RELABEL_REGEX = r"ray_((?:nv_inference|trtserve)_.+?)(?:_total)?"

MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# Triton's failure reasons, then ours where they say more.
REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER", "DEADLINE", "POISON", "EXHAUSTED",
           "INVALID")

MODEL = ("model", "version")


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    triton: str = ""  # the Triton metric with the same meaning, where there is one
    boundaries: tuple[float, ...] = ()


SPECS = (
    Spec("nv_inference_request_success", "counter", "Requests answered successfully.",
         MODEL, "nv_inference_request_success"),
    Spec("nv_inference_request_failure", "counter",
         "Requests answered with an error, by reason (REJECTED: load shed; CANCELED: the "
         "caller went away; BACKEND: the model failed deterministically; DEADLINE; POISON: a "
         "query of death; EXHAUSTED: attempts, retry budget or healthy replicas ran out; "
         "INVALID: the backend rejected the input; OTHER).",
         (*MODEL, "reason"), "nv_inference_request_failure"),
    Spec("nv_inference_count", "counter", "Inferences (batch rows) of successful requests.",
         MODEL, "nv_inference_count"),
    Spec("nv_inference_exec_count", "counter",
         "Successful executions (a dynamic batch is one).", MODEL, "nv_inference_exec_count"),
    Spec("nv_inference_pending_request_count", "gauge",
         "Requests in the Router not answered yet (queued for a batch, or in flight).",
         MODEL, "nv_inference_pending_request_count"),
    Spec("nv_inference_request_duration_us", "counter",
         "Cumulative end-to-end time of successful requests in the Router.",
         MODEL, "nv_inference_request_duration_us"),
    Spec("nv_inference_queue_duration_us", "counter",
         "Cumulative queue time of successful requests: the Router's batch queue plus the "
         "replica's wait for the model's limit and a context.",
         MODEL, "nv_inference_queue_duration_us"),
    Spec("nv_inference_compute_input_duration_us", "counter",
         "Cumulative time decoding HTTP request bodies into tensors (the backends copy inputs "
         "inside one execution, which cannot be split).",
         MODEL, "nv_inference_compute_input_duration_us"),
    Spec("nv_inference_compute_infer_duration_us", "counter",
         "Cumulative execution time in the replica of successful requests (copies included).",
         MODEL, "nv_inference_compute_infer_duration_us"),
    Spec("nv_inference_compute_output_duration_us", "counter",
         "Cumulative time encoding HTTP response bodies from tensors.",
         MODEL, "nv_inference_compute_output_duration_us"),
    Spec("trtserve_request_duration_ms", "histogram",
         "End-to-end time of successful requests in the Router.", MODEL,
         boundaries=tuple(MS_BOUNDARIES)),
    Spec("trtserve_queue_duration_ms", "histogram",
         "Queue time of successful requests (batch queue + replica wait).", MODEL,
         boundaries=tuple(MS_BOUNDARIES)),
    Spec("trtserve_compute_duration_ms", "histogram",
         "Execution time of successful requests in the replica.", MODEL,
         boundaries=tuple(MS_BOUNDARIES)),
    Spec("trtserve_requests", "counter",
         "Requests answered by the Router, by outcome ('ok', a taxonomy class, 'cancelled').",
         ("model", "outcome")),
    Spec("trtserve_attempts", "counter",
         "Attempts (trail entries) by outcome: every execution try, local retries included.",
         ("model", "outcome")),
    Spec("trtserve_local_retries", "counter",
         "Fresh-context retries inside a replica after a failed try.", ("model",)),
    Spec("trtserve_failovers", "counter",
         "Requests sent on to another replica after a failed attempt.", ("model",)),
    Spec("trtserve_retry_budget_refusals", "counter",
         "Failovers refused because the retry budget was spent.", ("model",)),
    Spec("trtserve_ejections", "counter",
         "Replicas ejected (skipped by every request for eject_s) after a failure.",
         ("model",)),
    Spec("trtserve_query_of_death_refusals", "counter",
         "Requests refused unrun as identical to a query of death.", ("model",)),
    Spec("trtserve_load_shed", "counter",
         "Requests shed with 503 + Retry-After because every replica's queue stayed full.",
         ("model",)),
    Spec("trtserve_replicas_poisoned", "counter",
         "Engine replicas found broken by a DeviceFailure (each counted once).", ()),
    Spec("trtserve_batch_size", "histogram", "Rows per successful execution.", ("model",),
         boundaries=tuple(BATCH_BOUNDARIES)),
    Spec("trtserve_context_swaps", "counter",
         "Failed contexts replaced, by how: a warm spare promoted, or a cold create.",
         ("model", "kind")),
    Spec("trtserve_live_contexts", "gauge",
         "Execution contexts alive per model in the replica (active, lent and spare).",
         ("model",)),
    Spec("trtserve_replica_gpu", "gauge",
         "1 per engine replica, labelled with the GPU it holds ('none' without one).",
         ("gpu_uuid", "gpu_name")),
)

Metric = Counter | Gauge | Histogram


def create(names: Iterable[str]) -> dict[str, Metric]:
    """The named metrics for this process. Serve's metrics read the replica context when
    they are made, so each deployment makes its own in its constructor."""
    specs = {s.name: s for s in SPECS}
    made: dict[str, Metric] = {}
    for name in names:
        s = specs[name]
        if s.kind == "counter":
            made[name] = Counter(name, description=s.description, tag_keys=s.tags)
        elif s.kind == "gauge":
            made[name] = Gauge(name, description=s.description, tag_keys=s.tags)
        else:
            made[name] = Histogram(name, description=s.description,
                                   boundaries=list(s.boundaries), tag_keys=s.tags)
    return made


def zero(counter: Metric, tags: dict[str, str]) -> None:
    """Make a counter's series exist at 0, so ``rate()`` and alerts see 0, not nothing.
    Ray's public ``inc`` refuses 0; the recording call underneath it takes it."""
    counter._record(0, tags=tags)


def reason(exc: BaseException) -> str:
    """The failure reason label of a request that ended with ``exc``."""
    cause = unwrap(exc)
    for kind, label in ((Overloaded, "REJECTED"), (DeadlineExceeded, "DEADLINE"),
                        (PoisonInput, "POISON"), (RetriesExhausted, "EXHAUSTED"),
                        (ExecutionError, "BACKEND"), ((InvalidInput, UnknownModel), "INVALID")):
        if isinstance(cause, kind):
            return label
    return "CANCELED" if isinstance(cause, asyncio.CancelledError) else "OTHER"


def rows(inputs: dict[str, Any]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def request_id(sent: str | None) -> str:
    """The protocol's ``id`` when the client sent one, else Serve's request id (from the
    ``x-request-id`` header over HTTP; Serve echoes it back)."""
    # Ray 2.60 has no public accessor for the request context.
    return sent or serve_context._get_serve_request_context().request_id


@dataclass
class Request:
    """One request through the Router, as its metrics and its log line need it."""

    model: str
    version: str
    rows: int
    id: str
    started: float = field(default_factory=time.perf_counter)
    batch_wait_s: float = 0.0  # in the Router's batch queue

    @property
    def tags(self) -> dict[str, str]:
        return {"model": self.model, "version": self.version}


FLUSH_S = 1.0


class Tally:
    """Counter increments and gauge values kept in the process and recorded every
    ``FLUSH_S``. A Ray metric call takes about 5 us alone and more under a loaded Router's
    GIL, and each request made a dozen of them (docs/benchmarks.md, "Where a loaded Router's
    time goes"); a counter's sum and a gauge's last value lose nothing by waiting a second.
    It is used on an event loop (the Router's), where its flusher runs. What a Router had not
    recorded when it stops is lost, as is what Ray had not exported yet."""

    def __init__(self, metrics: dict[str, Metric]) -> None:
        self.metrics = metrics
        self._sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._flusher: asyncio.Task[None] | None = None

    def inc(self, name: str, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        key = (name, tuple(tags.items()) if tags else ())
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._soon()

    def set(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._gauges[(name, tuple(tags.items()))] = value
        self._soon()

    def flush(self) -> None:
        sums, gauges, self._sums, self._gauges = self._sums, self._gauges, {}, {}
        for (name, tags), value in sums.items():
            self.metrics[name].inc(value, tags=dict(tags))
        for (name, tags), value in gauges.items():
            self.metrics[name].set(value, tags=dict(tags))

    def _soon(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.flush()


ROUTER = tuple(s.name for s in SPECS if s.name not in
               ("trtserve_context_swaps", "trtserve_live_contexts", "trtserve_replica_gpu"))


class RouterMetrics:
    """Counted in the Router, from the trails replicas send back and the Router's own
    decisions."""

    def __init__(self) -> None:
        self.m = create(ROUTER)
        self.tally = Tally(self.m)
        self._pending: dict[tuple[str, str], int] = {}
        self._poisoned: set[str] = set()
        self._known: set[tuple[str, str]] = set()
        self._versions: dict[str, str] = {}  # one version per served model name
        zero(self.m["trtserve_replicas_poisoned"], {})

    def _known_model(self, req: Request) -> None:
        if (req.model, req.version) in self._known:
            return
        self._known.add((req.model, req.version))
        self._versions[req.model] = req.version
        for name in ("nv_inference_request_success", "nv_inference_count",
                     "nv_inference_exec_count", "nv_inference_request_duration_us",
                     "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
                     "nv_inference_compute_infer_duration_us",
                     "nv_inference_compute_output_duration_us"):
            zero(self.m[name], req.tags)
        for why in REASONS:
            zero(self.m["nv_inference_request_failure"], {**req.tags, "reason": why})
        for name in ("trtserve_local_retries", "trtserve_failovers",
                     "trtserve_retry_budget_refusals", "trtserve_ejections",
                     "trtserve_query_of_death_refusals", "trtserve_load_shed"):
            zero(self.m[name], {"model": req.model})

    def started(self, req: Request) -> None:
        self._known_model(req)
        self._add_pending(req, 1)

    def finished(self, req: Request, outcome: str, error: BaseException | None,
                 trail: list[dict[str, Any]]) -> None:
        """Once per request: success or failure, times, and the log line."""
        self._add_pending(req, -1)
        total_s = time.perf_counter() - req.started
        self.tally.inc("trtserve_requests", tags={"model": req.model, "outcome": outcome})
        if error is None:
            self._succeeded(req, total_s, trail)
        else:
            self.tally.inc("nv_inference_request_failure",
                           tags={**req.tags, "reason": reason(error)})
            if isinstance(unwrap(error), Overloaded):
                self.tally.inc("trtserve_load_shed", tags={"model": req.model})
        log_request(req, outcome, trail, total_s)

    def _succeeded(self, req: Request, total_s: float, trail: list[dict[str, Any]]) -> None:
        tags = req.tags
        ok = next((e for e in reversed(trail) if e.get("outcome") == "ok"), {})
        replica_queue_ms = sum(e.get("queue_ms", 0.0) for e in trail)
        queue_ms = req.batch_wait_s * 1000.0 + replica_queue_ms
        compute_ms = max(0.0, ok.get("ms", 0.0) - ok.get("queue_ms", 0.0))
        self.tally.inc("nv_inference_request_success", tags=tags)
        self.tally.inc("nv_inference_count", req.rows, tags=tags)
        for name, ms in (("request", total_s * 1000.0), ("queue", queue_ms),
                         ("compute_infer", compute_ms)):
            if ms > 0:
                self.tally.inc(f"nv_inference_{name}_duration_us", ms * 1000.0, tags=tags)
        self.m["trtserve_request_duration_ms"].observe(total_s * 1000.0, tags=tags)
        self.m["trtserve_queue_duration_ms"].observe(queue_ms, tags=tags)
        self.m["trtserve_compute_duration_ms"].observe(compute_ms, tags=tags)

    @contextlib.contextmanager
    def codec(self, model: str, version: str, which: str) -> Iterator[None]:
        """Times an HTTP decode (``which`` "input") or encode ("output") that succeeds."""
        started = time.perf_counter()
        yield
        us = (time.perf_counter() - started) * 1e6
        if us > 0:
            self.tally.inc(f"nv_inference_compute_{which}_duration_us", us,
                           tags={"model": model, "version": version})

    def attempt(self, model: str, trail: list[dict[str, Any]]) -> None:
        """One attempt's trail entries (one replica's tries of one execution), counted once
        however many requests share them: attempts by outcome, local retries, and each
        successful execution with its batch size."""
        for entry in trail:
            self.tally.inc("trtserve_attempts", tags={"model": model, "outcome": entry["outcome"]})
        if len(trail) > 1:
            self.tally.inc("trtserve_local_retries", len(trail) - 1, tags={"model": model})
        for entry in trail:
            if entry["outcome"] == "ok":
                rows = int(entry.get("batch") or 1)
                self.tally.inc("nv_inference_exec_count",
                               tags={"model": model, "version": self._versions.get(model, "")})
                self.m["trtserve_batch_size"].observe(rows, tags={"model": model})

    def after_failure(self, model: str, failed: FailedAttempt, *, went_on: bool,
                      newly_ejected: int, budget_refused: bool) -> None:
        tags = {"model": model}
        if went_on:
            self.tally.inc("trtserve_failovers", tags=tags)
        if newly_ejected:
            self.tally.inc("trtserve_ejections", newly_ejected, tags=tags)
        if budget_refused:
            self.tally.inc("trtserve_retry_budget_refusals", tags=tags)
        replica = failed.replica
        if isinstance(failed.error, DeviceFailure) and replica and replica not in self._poisoned:
            self._poisoned.add(replica)
            self.tally.inc("trtserve_replicas_poisoned")

    def refused_query_of_death(self, model: str) -> None:
        self.tally.inc("trtserve_query_of_death_refusals", tags={"model": model})

    def _add_pending(self, req: Request, delta: int) -> None:
        key = (req.model, req.version)
        self._pending[key] = self._pending.get(key, 0) + delta
        self.tally.set("nv_inference_pending_request_count", self._pending[key], req.tags)


def log_request(req: Request, outcome: str, trail: list[dict[str, Any]], total_s: float) -> None:
    """One JSON line for a request that retried or failed; nothing for a first-try success
    (the metrics count those)."""
    if outcome == "ok" and len(trail) <= 1:
        return
    line = json.dumps({
        "event": "trtserve_request", "request_id": req.id, "model": req.model,
        "version": req.version, "outcome": outcome, "total_ms": round(total_s * 1000.0, 3),
        "attempts": trail,
    }, default=str)
    log.log(logging.INFO if outcome == "ok" else logging.WARNING, line)


class ReplicaMetrics:
    """What only an engine replica knows: its GPU, its live contexts, and how its failed
    contexts were replaced. ``export`` runs with every health check."""

    def __init__(self, models: Iterable[str], device: dict[str, Any]) -> None:
        self.m = create(("trtserve_context_swaps", "trtserve_live_contexts",
                         "trtserve_replica_gpu"))
        cuda = device.get("cuda") or {}
        self.m["trtserve_replica_gpu"].set(1, tags={"gpu_uuid": str(cuda.get("uuid", "none")),
                                                    "gpu_name": str(cuda.get("name", "none"))})
        self._exported: dict[tuple[str, str], int] = {}
        for model in models:
            for kind in ("promoted", "cold"):
                zero(self.m["trtserve_context_swaps"], {"model": model, "kind": kind})
                self._exported[(model, kind)] = 0

    def export(self, pools: dict[str, Any]) -> None:
        """``pools``: model -> its ContextPool."""
        for model, pool in pools.items():
            self.m["trtserve_live_contexts"].set(pool.live, tags={"model": model})
            for kind, now in (("promoted", pool.stats.promoted),
                              ("cold", pool.stats.cold_creates)):
                new = now - self._exported[(model, kind)]
                if new > 0:
                    self.m["trtserve_context_swaps"].inc(new, tags={"model": model,
                                                                    "kind": kind})
                    self._exported[(model, kind)] = now
