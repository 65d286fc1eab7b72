"""The trtserve application: ``build_app(args)`` -> Router in front of EngineReplica.

serve.yaml points Serve at ``deployments.app:build_app`` with ``args`` (see
config.AppArgs); ``trtserve serve`` calls it with its flags. The app is always named
``trtserve``; its ingress, the Router, serves ``/``.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from .config import AppArgs
from .engine import EngineReplica
from .router import Router

APP_NAME = "trtserve"


def _cluster(resource: str) -> float:
    if not ray.is_initialized():
        ray.init()
    return float(ray.cluster_resources().get(resource, 0))


def gpus_per_replica(setting: str | float) -> float:
    """``auto``: one GPU per replica where the cluster has GPUs, else none."""
    if setting != "auto":
        return float(setting)
    return 1.0 if _cluster("GPU") > 0 else 0.0


# Cores that ``router_replicas: auto`` leaves to the rest: the engine replicas' own threads,
# the HTTP ingress, Ray's raylet and agents.
CPUS_BESIDE_ROUTERS = 4
# Measured up to 16 Routers on 16 cores, which served no more than 12: past that the
# processes only cost memory (a Ray worker each), however many cores a cluster has.
MAX_AUTO_ROUTERS = 16


def router_replicas(setting: str | int) -> int:
    """``auto``: one Router per core of the cluster beyond CPUS_BESIDE_ROUTERS, at least one
    and at most MAX_AUTO_ROUTERS. A Router is one Python process, bound by its GIL at about
    a core and a third: it is the cost of every request (Serve's machinery around it,
    decoding, the batcher), where the engine replicas pay per batch. On an H100 with 16
    cores, 12 Routers served HTTP binary at 2,277 req/s against 1,987 with 8 and 1,452 with
    4 (docs/benchmarks.md)."""
    if setting != "auto":
        return int(setting)
    return auto_router_replicas(int(_cluster("CPU")))


def auto_router_replicas(cores: int) -> int:
    return min(MAX_AUTO_ROUTERS, max(1, cores - CPUS_BESIDE_ROUTERS))


# replica_huge_pages: glibc's malloc asks for transparent huge pages for its heaps (glibc
# >= 2.35; where the host's THP is "never", nothing changes). A process that dies frees its
# pages one by one before its sockets close and Ray reports the death: for a process
# holding an engine replica's 2 GB, Ray's notice came 188-242 ms after the exit on 4 KiB
# pages, 23-33 ms on huge pages (the 2-core machine, docs/benchmarks.md). Off by default:
# on the CPU provider it cost throughput (0.717x against 0.783x of the ceiling by handle,
# four runs each), and the lifeline tells a Router of a death before any of that freeing
# (0.5 ms on an H100, where a kill then added +63/+89 ms at p99). glibc reads the tunable
# when the process starts, hence the runtime_env.
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def engine_actor_options(args: AppArgs) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_cpus": args.cpus_per_replica,
        "num_gpus": gpus_per_replica(args.gpus_per_replica),
    }
    if args.replica_huge_pages:
        options["runtime_env"] = {"env_vars": HUGE_PAGES_ENV}
    return options


def bind_engine(args: AppArgs) -> Application:
    return EngineReplica.options(
        num_replicas=args.replicas,
        ray_actor_options=engine_actor_options(args),
        max_ongoing_requests=args.engine_max_ongoing_requests,
        # Serve sheds what is over this queue (BackPressureError in the Router, which then
        # waits up to backpressure_wait_s before answering 503).
        max_queued_requests=args.engine_max_queued_requests,
        health_check_period_s=args.health_check_period_s,
        user_config=args.engine_user_config(),
        logging_config={"enable_access_log": args.access_log},
    ).bind(args.engine_config())


# Serve runs a replica's user code, and the router of each handle it holds, on event loops
# of their own threads by default, so each request crosses threads several times. The
# Router only awaits (a long decode or encode goes to a worker), so it runs both on its
# replica's own loop: HTTP binary +21% on the 2-core machine (docs/benchmarks.md). These
# are two of the settings of Serve's throughput mode, without its gRPC, under which the
# bench stalled; Serve reads them when the process starts, hence the runtime_env.
#
# A handle call made with Serve's `.options(_by_reference=False)` reaches the Router over
# Serve's gRPC, whose server refuses a message over 4 MiB by default (seven `resnet50`
# images are over it). By reference a call has no such limit; by value its inputs get
# gRPC's own. The answer is received by the caller, within the caller's own setting of the
# same variable (README).
HANDLE_BY_VALUE_MAX_BYTES = 2**31 - 1
ROUTER_PROCESS_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(HANDLE_BY_VALUE_MAX_BYTES),
}


def bind_router(args: AppArgs, engine: Application) -> Application:
    routers = router_replicas(args.router_replicas)
    return Router.options(
        num_replicas=routers,
        ray_actor_options={"num_cpus": args.router_cpus,
                           "runtime_env": {"env_vars": ROUTER_PROCESS_ENV}},
        # Serve's default of 5 collapses throughput under concurrent callers; the router
        # only awaits replicas, so it can hold many requests at once.
        max_ongoing_requests=args.router_max_ongoing_requests,
        # Over this, Serve answers 503 itself (a plain-text body; docs/protocol.md).
        max_queued_requests=args.router_max_queued_requests,
        user_config=args.router_user_config(routers),
        logging_config={"enable_access_log": args.access_log},
    ).bind(engine)


def parse_args(args: AppArgs | dict[str, Any] | None) -> AppArgs:
    return args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    parsed = parse_args(args)
    return bind_router(parsed, bind_engine(parsed))
