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
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from engines.backend import LoadOptions, load_engine
from engines.cuda import device_info
from engines.errors import DeviceFailure, UnknownModel
from engines.faults import Fault, FaultInjector, FaultyEngine
from engines.models import resolve
from engines.runner import ModelRunner
from engines.spec import example_inputs

from .config import cache_path
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


class ReplicaCore:
    """Every model of one replica, and what the replica knows about itself."""

    def __init__(self, config: dict[str, Any], replica_id: str) -> None:
        self.replica_id = replica_id
        self.injector = FaultInjector()
        self.local_retries = 2
        self.requests_seen = 0
        self._lock = threading.Lock()
        self.runners: dict[str, ModelRunner] = {}
        self.versions: dict[str, str] = {}
        self._canaries: dict[str, Any] = {}
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
                options = LoadOptions(max_batch=entry.get("max_batch"), cache_dir=cache_dir)
                engine = load_engine(source, config["backend"], options)
                self.runners[source.name] = ModelRunner(
                    FaultyEngine(engine, self.injector),
                    pool_size=config["pool_size"],
                    spares=config["spares"],
                    replica=replica_id,
                )
                self.versions[source.name] = str(entry.get("version", "1"))
                # The canary runs on the real engine, beside the pool: armed request faults
                # stay for requests, while a broken device still shows.
                self._canaries[source.name] = engine.create_context(0)
        except BaseException:
            self.close()
            raise

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.local_retries = int(user_config.get("local_retries", self.local_retries))
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

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], local_retries: int | None = None
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        with self._lock:
            self.requests_seen += 1
        runner = self.runner(model)
        retries = self.local_retries if local_retries is None else local_retries
        outputs, trail = runner.infer(inputs, local_retries=retries)
        return outputs, [a.to_dict() for a in trail]

    @property
    def broken(self) -> DeviceFailure | None:
        for runner in self.runners.values():
            if runner.poisoned is not None:
                return runner.poisoned
        return None

    def check_health(self) -> None:
        """Raise DeviceFailure if this process's device is gone (poisoned, or canary fails)."""
        broken = self.broken
        if broken is not None:
            raise DeviceFailure(f"replica {self.replica_id}: {broken.message}",
                                replica_id=self.replica_id)
        for name, runner in self.runners.items():
            try:
                self.injector.check_device(name)
                self._canaries[name].execute(example_inputs(runner.spec))
            except Exception as exc:
                failure = DeviceFailure(
                    f"replica {self.replica_id}: canary inference of {name} failed: {exc}",
                    replica_id=self.replica_id,
                )
                runner.pool.poison(failure)
                raise failure from exc

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
                    "pool": {"live": r.pool.live, "spares": r.pool.spares,
                             **r.pool.stats.__dict__},
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
    """The Serve face of ReplicaCore. ``exclude``/``target`` are routing arguments (see
    routing.py); Serve passes them to the method too, so every method accepts them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.exit_after_s = float(config["exit_after_device_failure_s"])
        self.core = ReplicaCore(config, self.replica_id)
        # One thread per context: more would only wait in the pool.
        self.executor = ThreadPoolExecutor(
            config["pool_size"] * len(self.core.runners), thread_name_prefix="infer"
        )
        self._canary_thread = ThreadPoolExecutor(1, thread_name_prefix="canary")
        self._exiting = False
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

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        local_retries: int | None = None,
        exclude: list[str] | None = None,
        target: str | None = None,
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.executor, self.core.infer, model, inputs, local_retries
            )
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
        return self.core.describe()

    async def check_health(self) -> None:
        # Its own thread: a canary must not queue behind requests and miss Serve's timeout.
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._canary_thread, self.core.check_health)
        except DeviceFailure:
            self._exit_soon()
            raise

    def record_replica_metadata(self) -> dict[str, Any]:
        return {"device": device_report()}

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
