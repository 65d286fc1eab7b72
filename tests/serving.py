"""Helpers for tests that run the real app on a real local Ray cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve._private.constants import RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema

from deployments.app import APP_NAME, build_app
from deployments.ingress import DEFAULT_INGRESS
from deployments.local_cluster import private_serve

X = {"x": np.ones((2, 16), np.float32)}
T = TypeVar("T")

# Serve's power of two choices takes the shorter of the queue lengths a Router has cached,
# each kept up to RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S (10 s). Seen on CI and here in 4 runs
# of 77: an idle replica cached at one ongoing request lost every choice to the other, cached
# at zero, for 300 sequential calls in 3 s; in a run that went on, it got one 9.3 s later.
SPREAD_S = 3 * RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S


@contextmanager
def local_serve(num_gpus: int = 0, dashboard_port: int | None = None) -> Iterator[int]:
    """A Ray cluster of this process's own with Serve's HTTP ingress (the shipped default) on
    a free port; with a dashboard (which the ``serve`` CLI talks to) when given its port."""
    with private_serve(DEFAULT_INGRESS, num_cpus=4, num_gpus=num_gpus,
                       include_dashboard=dashboard_port is not None,
                       dashboard_host="127.0.0.1", dashboard_port=dashboard_port) as port:
        yield port


@contextmanager
def served(cache_dir: Path, **args: Any) -> Iterator[str]:
    """The app deployed with ``args`` on a cluster of its own; yields its base URL."""
    with local_serve() as port:
        deploy(cache_dir, **args)
        yield f"http://127.0.0.1:{port}"


def requests_seen() -> int:
    """Requests that reached any replica: a bad one refused at the router never counts."""
    return sum(r["requests_seen"] for r in describe_all())


def _test_args(cache_dir: Path, **args: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "models": ["tiny"],
        "replicas": 2,
        "cpus_per_replica": 0,
        "router_cpus": 0,
        "gpus_per_replica": 0,
        "health_check_period_s": 1,
        "cache_dir": str(cache_dir),
    }
    return {**base, **args}


def deploy(cache_dir: Path, **args: Any) -> DeploymentHandle:
    """Replace the trtserve app with a fresh one (new replicas) built from ``args``."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    return serve.run(build_app(_test_args(cache_dir, **args)), name=APP_NAME, route_prefix="/")


def deploy_config(cache_dir: Path, **application: Any) -> None:
    """Apply a serve.yaml application (``import_path`` and ``args`` filled in) the way
    ``serve deploy`` does, over whatever runs: Serve changes in place what it can."""
    config = {"name": APP_NAME, "route_prefix": "/", "import_path": "deployments.app:build_app",
              "args": _test_args(cache_dir), **application}
    serve_start().deploy_apps(ServeDeploySchema.model_validate({"applications": [config]}))
    assert wait_until(lambda: serve.status().applications[APP_NAME].status == "RUNNING", 120)


def engine() -> DeploymentHandle:
    return serve.get_deployment_handle("EngineReplica", APP_NAME)


def describe_all() -> list[dict[str, Any]]:
    """Every live replica's report (one that dies meanwhile is left out)."""
    replies = engine().broadcast("describe").results(timeout_s=30, return_exceptions=True)
    return [r for r in replies if isinstance(r, dict)]


def replica_ids() -> set[str]:
    return {r["replica_id"] for r in describe_all()}


def inject(fault: dict[str, Any], target: str) -> dict[str, Any]:
    return engine().inject_fault.remote(fault, target=target).result(timeout_s=30)


class FaultAt:
    """A ``load`` progress callback: injects ``fault`` into ``target`` once ``at`` requests
    are done, so the fault lands mid-load."""

    def __init__(self, at: int, fault: dict[str, Any], target: str) -> None:
        self.at, self.fault, self.target = at, fault, target
        self.injected = False

    def __call__(self, done: int) -> None:
        if done == self.at and not self.injected:
            try:
                inject(self.fault, self.target)
            except ray.exceptions.ActorDiedError:
                # Under load a crash can fire in a request running beside the injection,
                # ending the process before the injection's own reply goes out.
                if self.fault["kind"] != "crash":
                    raise
            self.injected = True


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


Outcome = tuple[dict[str, np.ndarray], list[dict[str, Any]]] | BaseException


def varied_inputs(i: int, rows: int = 2) -> dict[str, np.ndarray]:
    """Request ``i``'s own input for tiny: every request differs, so one that breaks two
    replicas by coincidence condemns only itself as a query of death, never its neighbours."""
    return {"x": np.random.default_rng(i).standard_normal((rows, 16)).astype(np.float32)}


def one_at_a_time(call: Callable[[int], T], met: Callable[[T], bool], least: int = 1
                  ) -> list[T]:
    """The results of ``call(0)``, ``call(1)``, ... made one after another, until one is
    ``met`` after at least ``least`` calls, or for at most SPREAD_S: sequential calls reach a
    given replica only by the Router's choice (see SPREAD_S)."""
    results: list[T] = []
    seen = False
    until = time.monotonic() + SPREAD_S
    while len(results) < least or not (seen or time.monotonic() > until):
        results.append(call(len(results)))
        seen = seen or met(results[-1])
    return results


def load(
    router: DeploymentHandle,
    total: int,
    in_flight: int,
    on_progress: Callable[[int], None] | None = None,
) -> list[tuple[dict[str, np.ndarray], Outcome]]:
    """``total`` requests through the router, ``in_flight`` at a time, each with its own
    input; every input kept with its outcome."""
    done = 0
    lock = threading.Lock()

    def one(i: int) -> tuple[dict[str, np.ndarray], Outcome]:
        nonlocal done
        inputs = varied_inputs(i)
        try:
            result: Outcome = router.infer_with_trail.remote("tiny", inputs, timeout=30).result()
        except BaseException as exc:  # kept, and asserted on by the caller
            result = exc
        with lock:
            done += 1
            count = done
        if on_progress is not None:
            on_progress(count)
        return inputs, result

    with ThreadPoolExecutor(in_flight) as pool:
        return list(pool.map(one, range(total)))


def load_until(
    router: DeploymentHandle,
    results: list[tuple[dict[str, np.ndarray], Outcome]],
    met: Callable[[list[tuple[dict[str, np.ndarray], Outcome]]], bool],
    in_flight: int,
    rounds: int = 5,
) -> list[tuple[dict[str, np.ndarray], Outcome]]:
    """``results`` with more load, 100 requests a round, until ``met`` says a request met
    the fault: a fault armed by a call mid-load can land after a fast load of tiny has ended
    on a busy machine."""
    for _ in range(rounds):
        if met(results):
            break
        results = results + load(router, 100, in_flight)
    return results


def replica_died_under(results: list[tuple[dict[str, np.ndarray], Outcome]]) -> bool:
    """Whether some answered request's trail shows its replica dying under it."""
    return any(not isinstance(r, BaseException) and
               any(a["outcome"] == "ReplicaFailure" for a in r[1]) for _, r in results)


@ray.remote(num_cpus=0)
def _references_held(argument: np.ndarray) -> int:
    # An argument sent through the object store is a reference the callee borrows while the
    # call runs; one sent inside the task's message is not.
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def sent_through_object_store(nbytes: int) -> bool:
    """Whether this process sends a task argument of ``nbytes`` through the object store (as
    the cluster's config decides), seen from a real task that receives one."""
    return ray.get(_references_held.remote(np.zeros(nbytes, np.uint8)), timeout=60) > 0
