"""EngineReplica: one Serve replica, pinned to its GPU (or a share), holding every model.

The logic is ``ReplicaCore``, plain Python that tests call without Ray: it loads each model
once, owns their context pools and the process's fault injector, runs the local retries,
and answers health checks with a canary inference. ``EngineReplica`` is the thin Serve
deployment around it. On DeviceFailure the replica answers it (naming itself), fails its
health check, refuses new work (the runners are poisoned) and ends its process shortly
after, so Serve replaces it at once instead of after several failed health checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from engines.backend import Context, Engine, LoadOptions, load_engine
from engines.cuda import device_info, visible_device_count
from engines.errors import DeadlineExceeded, DeviceFailure, ReplicaFailure, UnknownModel
from engines.faults import Fault, FaultInjector, FaultyEngine
from engines.models import resolve
from engines.runner import Call, ModelRunner
from engines.spec import example_inputs

from .config import cache_path
from .handoff import Inbox, SharedInputs
from .lane import Full, LaneServer
from .lane import available as lane_available
from .lifeline import Lifeline
from .metrics import ReplicaMetrics
from .policy import RetryPolicy
from .routing import AvoidFailedReplicasRouter

log = logging.getLogger("ray.serve")


def device_report() -> dict[str, Any]:
    """This process's GPU as Ray assigned it and as CUDA sees it (None: no visible GPU)."""
    info = device_info(0)
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return {
        "ray_gpu_ids": [str(g) for g in gpu_ids],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda": None
        if info is None
        else {
            "index": info.ordinal,
            "name": info.name,
            "uuid": info.uuid,
            "compute_capability": info.compute_capability,
        },
    }


def batch_buckets(batch_size: int) -> tuple[int, ...]:
    """The batch sizes that get a session each: powers of two up to ``batch_size``, and it."""
    sizes = {1 << k for k in range(batch_size.bit_length()) if 1 << k <= batch_size}
    return tuple(sorted(sizes | {batch_size}))


GPU_POOL_SIZE = 4


def execution_layout(pool_size: str | int, ort_threads: int | None, replicas: int,
                     gpu_visible: bool, cores: int) -> tuple[int, int | None]:
    """Contexts per model, and ONNX Runtime intra-op threads per session, where the app
    left them to trtserve (``pool_size`` "auto", ``ort_threads`` None).

    With a GPU, several contexts overlap one execution's host work with another's device
    work; the threads stay the backend's (one on the CUDA provider). On the CPU an
    execution already spreads over its intra-op threads and concurrent ones only share
    the same cores, so a replica runs one execution at a time and the machine's cores are
    split among the executions the app's replicas run at once (on the 2-core machine this
    served resnet50 over HTTP binary at 0.83-0.86x of the engine's ceiling, against
    0.72-0.75x with four contexts of ONNX Runtime's default threads: docs/benchmarks.md)."""
    if gpu_visible:
        return (GPU_POOL_SIZE if pool_size == "auto" else int(pool_size)), ort_threads
    pool = 1 if pool_size == "auto" else int(pool_size)
    threads = ort_threads if ort_threads is not None else max(1, cores // (replicas * pool))
    return pool, threads


def warm_up(engine: Engine, context: Context, buckets: tuple[int, ...]) -> None:
    """Run each bucket's session once before any request: a session's first run of a shape
    pays cuDNN's algorithm search (hundreds of ms on the CUDA provider)."""
    started = time.perf_counter()
    one = example_inputs(engine.spec)
    for rows in buckets:
        context.execute({name: np.repeat(value, rows, axis=0) for name, value in one.items()})
    log.info("%s: warmed batch buckets %s on %s in %.1f s", engine.name, buckets, engine.device,
             time.perf_counter() - started)


class ReplicaCore:
    """Every model of one replica, and what the replica knows about itself."""

    def __init__(self, config: dict[str, Any], replica_id: str) -> None:
        self.replica_id = replica_id
        self.injector = FaultInjector()
        self.requests_seen = 0
        self.health_period_s = float(config["health_check_period_s"])
        self._lock = threading.Lock()
        self.runners: dict[str, ModelRunner] = {}
        self.versions: dict[str, str] = {}
        self.batching: dict[str, dict[str, Any]] = {}
        gpu_visible = visible_device_count() > 0
        self.concurrency, threads = execution_layout(
            config["pool_size"], config["ort_threads"], int(config["replicas"]), gpu_visible,
            len(os.sched_getaffinity(0)))
        self._canaries: dict[str, Context] = {}
        self._short_since: dict[str, float] = {}
        origins: dict[str, str] = {}
        cache_dir = cache_path(config["cache_dir"])
        try:
            for entry in config["models"]:
                source = resolve(entry["model"], cache_dir)
                if source.name in origins:
                    raise ValueError(
                        f"two models are named '{source.name}' ({origins[source.name]} and "
                        f"{entry['model']}); rename one file"
                    )
                origins[source.name] = entry["model"]
                # ONNX Runtime's CUDA provider is slow whenever a session's input shape
                # changes: each batch bucket gets a session of its own (LoadOptions).
                buckets = (batch_buckets(int(entry.get("batch_size", 1)))
                           if config["cuda_batch_buckets"] and gpu_visible
                           else ())
                options = LoadOptions(
                    max_batch=entry.get("max_batch"), cache_dir=cache_dir,
                    threads=threads,
                    allow_spinning=config["ort_allow_spinning"],
                    batch_buckets=buckets,
                )
                engine = load_engine(source, config["backend"], options)
                self.runners[source.name] = ModelRunner(
                    FaultyEngine(engine, self.injector),
                    pool_size=self.concurrency,
                    spares=config["spares"],
                    replica=replica_id,
                )
                self.versions[source.name] = str(entry.get("version", "1"))
                # The Router batches; the replica only tells it the model's knobs.
                self.batching[source.name] = {
                    k: entry[k] for k in ("batch_size", "max_queue_delay_us",
                                          "preferred_batch_sizes") if k in entry
                }
                # The canary runs on the real engine, beside the pool: armed request faults
                # stay for requests, while a broken device still shows.
                self._canaries[source.name] = engine.create_context(0)
                if buckets and engine.device.startswith("cuda"):
                    warm_up(engine, self._canaries[source.name], buckets)
        except BaseException:
            self.close()
            raise

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.injector.clear()
        for raw in user_config.get("faults") or []:
            self.injector.inject(Fault.from_dict(raw))

    def runner(self, model: str) -> ModelRunner:
        try:
            return self.runners[model]
        except KeyError:
            raise UnknownModel(
                f"no model '{model}' on this server; serving: {', '.join(self.runners)}",
                replica_id=self.replica_id,
            ) from None

    def refuse_if_broken(self) -> None:
        """A poisoned replica runs nothing more, for any model: its device is gone."""
        broken = self.broken
        if broken is not None:
            raise DeviceFailure(f"replica {self.replica_id}: {broken.message}",
                                replica_id=self.replica_id)

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        local_retries: int,
        deadline: float | None = None,
        call: Call | None = None,
        since: float | None = None,
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        with self._lock:
            self.requests_seen += 1
        runner = self.runner(model)
        self.refuse_if_broken()
        try:
            outputs, trail = runner.infer(
                inputs, local_retries=local_retries, deadline=deadline, call=call, since=since
            )
        except DeviceFailure as failure:
            self.poison(failure)
            raise
        return outputs, [a.to_dict() for a in trail]

    def poison(self, failure: DeviceFailure) -> None:
        for runner in self.runners.values():
            runner.pool.poison(failure)

    @property
    def broken(self) -> DeviceFailure | None:
        for runner in self.runners.values():
            if runner.poisoned is not None:
                return runner.poisoned
        return None

    def check_health(self, now: float | None = None) -> None:
        """Raise DeviceFailure if this process's device is gone (poisoned, or a canary meets
        a DeviceFailure); raise ReplicaFailure, poisoning nothing, if a canary fails twice in
        a row on fresh contexts or a model has had fewer than half its contexts usable for
        longer than one health period. Either way Serve replaces the replica. A model's
        canary runs only when none of its requests' executions succeeded within the last
        health period."""
        self.refuse_if_broken()
        now = time.monotonic() if now is None else now
        for name, runner in self.runners.items():
            # A canary competes with the requests for the device, and on the CPU provider
            # for the cores (beside a loaded resnet50 session it took 0.17 s); requests that
            # succeeded within the period are the same proof that the device works.
            if runner.last_ok is None or now - runner.last_ok > self.health_period_s:
                self._canary(name, runner)
            pool = runner.pool
            pool.refill_soon()  # a refill that failed earlier may succeed now
            if pool.usable * 2 >= pool.size:
                self._short_since.pop(name, None)
                continue
            since = self._short_since.setdefault(name, now)
            if now - since > self.health_period_s:
                raise ReplicaFailure(
                    f"replica {self.replica_id}: only {pool.usable} of {pool.size} contexts "
                    f"of {name} usable for {now - since:.1f} s",
                    replica_id=self.replica_id,
                )

    def _canary(self, name: str, runner: ModelRunner) -> None:
        for attempt in range(2):
            try:
                self.injector.check_device(name)
                self._canaries[name].execute(example_inputs(runner.spec))
                return
            except DeviceFailure as exc:
                failure = DeviceFailure(
                    f"replica {self.replica_id}: canary inference of {name} failed: "
                    f"{exc.message}",
                    replica_id=self.replica_id,
                )
                self.poison(failure)
                raise failure from exc
            except Exception as exc:
                log.warning("replica %s: canary of %s failed (%s); %s", self.replica_id, name,
                            exc, "retrying on a fresh context" if attempt == 0 else "unhealthy")
                self._canaries[name].close()
                self._canaries[name] = runner.engine.create_context(0)
                if attempt == 1:
                    raise ReplicaFailure(
                        f"replica {self.replica_id}: canary inference of {name} failed twice: "
                        f"{type(exc).__name__}: {exc}",
                        replica_id=self.replica_id,
                    ) from exc

    def describe(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "device": device_report(),
            "requests_seen": self.requests_seen,
            "healthy": self.broken is None,
            "faults_pending": self.injector.pending(),
            "models": {
                name: {
                    "backend": r.engine.backend,
                    "device": r.engine.device,
                    "version": self.versions[name],
                    "spec": r.spec,
                    "batching": self.batching[name],
                    "concurrency": self.concurrency,
                    "pool": {"live": r.pool.live, "spares": r.pool.spares,
                             "usable": r.pool.usable, **r.pool.stats.__dict__},
                }
                for name, r in self.runners.items()
            },
        }

    def close(self) -> None:
        for canary in self._canaries.values():
            canary.close()
        for runner in self.runners.values():
            runner.close()


@serve.deployment(
    name="EngineReplica",
    request_router_config=RequestRouterConfig(request_router_class=AvoidFailedReplicasRouter),
)
class EngineReplica:
    """The Serve face of ReplicaCore. ``exclude``, ``target``, ``ejected`` and
    ``attempt_id`` are routing arguments (see routing.py); Serve passes them to the method
    too, so the methods accept them.

    Each model has its own concurrency limit (its ``pool_size``), taken before a worker
    thread, so a slow model's queue never holds the threads of a fast one. A request waits
    for it, and runs, only until the deadline it came with; past it, or when the Router
    cancels the attempt, its run is abandoned (``Call.cancel``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.exit_after_s = float(config["exit_after_device_failure_s"])
        self.core = ReplicaCore(config, self.replica_id)
        pool = self.core.concurrency
        self.limits = {name: asyncio.Semaphore(pool) for name in self.core.runners}
        self.executor = ThreadPoolExecutor(pool * len(self.core.runners),
                                           thread_name_prefix="infer")
        self._canary_thread = ThreadPoolExecutor(1, thread_name_prefix="canary")
        self._exiting = False
        self.metrics = ReplicaMetrics(self.core.runners, device_report())
        self.inbox = Inbox()
        # Routers on this node call _infer through it, past Serve and Ray (lane.py), within
        # the same limit on calls in flight as Serve's, shared with Serve's calls.
        self.serve_calls = 0  # infer calls from Serve in flight
        self.lane = LaneServer(
            self.replica_id, self._infer, self._limit, others=lambda: self.serve_calls,
        ) if lane_available() else None
        # Last: a replica that fails to start leaves no lifeline file behind.
        self.lifeline = Lifeline(self.replica_id)
        log.info("EngineReplica %s ready: %s", self.replica_id, device_report())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config)

    def _exit_soon(self) -> None:
        """Leave so Serve replaces this replica now, after the failing answer has gone out."""
        if self._exiting:
            return
        self._exiting = True
        log.error("replica %s: device failure, exiting in %.1f s", self.replica_id,
                  self.exit_after_s)
        asyncio.get_running_loop().call_later(self.exit_after_s, os._exit, 1)

    @staticmethod
    def _limit() -> int:
        """Serve's max_ongoing_requests as it is now: a change to it reaches this replica in
        place (Serve sets a new replica context)."""
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray] | SharedInputs, *,
        local_retries: int = RetryPolicy.local_retries,
        deadline_s: float = RetryPolicy.attempt_timeout_s, **routing: object,
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Serve's calls: ``routing`` (exclude, target, ejected, attempt_id) is for its
        request router (routing.py), not for the run. Serve admits up to its limit of its
        own calls; where lane calls hold part of it, the rest is refused here, as the lane
        refuses past it."""
        if self.lane is not None and self.serve_calls + self.lane.ongoing >= self._limit():
            raise Full(f"{self.lane.ongoing} lane calls and {self.serve_calls} of Serve's "
                       f"in flight")
        self.serve_calls += 1
        try:
            return await self._infer(model, inputs, local_retries, deadline_s)
        finally:
            self.serve_calls -= 1

    async def _infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray] | SharedInputs,
        local_retries: int = RetryPolicy.local_retries,
        deadline_s: float = RetryPolicy.attempt_timeout_s,
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + deadline_s
        call = Call()
        if isinstance(inputs, SharedInputs):
            inputs = self.inbox.arrays(inputs)
        run = functools.partial(
            self.core.infer, model, inputs, local_retries=local_retries, deadline=deadline,
            call=call, since=time.perf_counter(),
        )
        try:
            self.core.refuse_if_broken()
            self.core.runner(model)  # UnknownModel before anything waits
            limit = self.limits[model]
            async with asyncio.timeout(deadline_s):
                async with limit:
                    return await loop.run_in_executor(self.executor, run)
        except TimeoutError:
            call.cancel()
            raise DeadlineExceeded(
                f"{model}: the attempt's {deadline_s:.3f} s passed on replica "
                f"{self.replica_id}",
                replica_id=self.replica_id,
            ) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        except DeviceFailure:
            self._exit_soon()
            raise

    async def inject_fault(
        self, fault: dict[str, Any], exclude: list[str] | None = None, target: str | None = None
    ) -> dict[str, Any]:
        self.core.injector.inject(Fault.from_dict(fault))
        return {"replica_id": self.replica_id, "faults_pending": self.core.injector.pending()}

    async def describe(
        self, exclude: list[str] | None = None, target: str | None = None
    ) -> dict[str, Any]:
        if self.lane is None:
            return {**self.core.describe(), "lane_calls": None, "lane_limit": None}
        return {**self.core.describe(), "lane_calls": self.lane.calls,
                "lane_limit": self.lane.limit()}

    async def check_health(self) -> None:
        # Its own thread: a canary must not queue behind requests and miss Serve's timeout.
        loop = asyncio.get_running_loop()
        self.metrics.export({name: r.pool for name, r in self.core.runners.items()})
        try:
            await loop.run_in_executor(self._canary_thread, self.core.check_health)
        except DeviceFailure:
            self._exit_soon()
            raise

    def record_replica_metadata(self) -> dict[str, Any]:
        return {"device": device_report()}

    def __del__(self) -> None:
        lane = getattr(self, "lane", None)
        if lane is not None:
            lane.close()
        lifeline = getattr(self, "lifeline", None)
        if lifeline is not None:
            lifeline.close()
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
