"""The saturation benchmark (issue 9): trtserve's paths against the engine's ceiling and
plain Ray Serve with ``@serve.batch``, side by side in one run.

Order of a run (``run_fastpath``):

1. the ceiling (ceiling.py), in a spawned process before Ray starts;
2. a private local Ray cluster with Serve's HTTP ingress (HAProxy by default) on a free
   port, and the spawned load generator processes (loadgen.py);
3. per batching setting (off, on): trtserve deployed,
   then every (concurrency, mode) load point; with batching off also a direct handle to
   EngineReplica for the per-hop breakdown; with the last setting the recovery runs
   (context faults, then replica kills);
4. the peer: a plain Serve app batching with ``@serve.batch`` on the same engine;
5. with ``replica_sweep``: trtserve deployed again with each engine replica count (batching
   as the last setting), every (concurrency, mode) load point again, and the scaling ratio
   served(N) / (N / n x served(n)) against the smallest count n.

Every served request is one row, so req/s compares with the ceiling's rows/s.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from engines.backend import load_engine
from engines.models import DEFAULT_CACHE_DIR, resolve

from .app import APP_NAME, build_app
from .ceiling import Ceiling, measure_ceiling
from .ingress import DEFAULT_INGRESS, Ingress
from .loadgen import Kind, LoadGenerator, Measurement, Target
from .local_cluster import private_serve

MODES: dict[str, Kind] = {"handle": "handle", "handle by value": "handle_by_value",
                         "http binary": "http_binary", "http json": "http_json"}
PEER_MODE = "plain Serve, @serve.batch"
PEER_APP = "fastpath-peer"
Progress = Callable[[str], None]
# Both apps alike: no access log line per request (it costs every replica CPU at saturation,
# and Triton does not log requests by default either); warnings still go to the logs.
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


@dataclass(frozen=True)
class FastpathSetup:
    """Every knob of a run; the defaults are the reduced sweep (``FULL`` the whole one)."""

    model: str = "tiny"
    backend: str = "auto"
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    concurrency: tuple[int, ...] = (1, 16)
    seconds: float = 3.0  # measured per load point
    warmup_s: float = 1.0  # driven and discarded before each load point
    ceiling_batch_sizes: tuple[int, ...] = (1, 8, 32)
    ceiling_threads: tuple[int, ...] = (1, 4)
    ceiling_seconds: float = 1.0
    batch_size: int = 32  # batching on: trtserve's batch_size, the peer's max_batch_size
    max_queue_delay_us: int = 0  # both batchers' wait for a fuller batch (Triton's default)
    preferred_batch_sizes: tuple[int, ...] = ()
    replicas: int = 2
    gpus_per_replica: float | None = None  # None: the cluster's GPUs shared evenly
    router_replicas: str | int = "auto"  # the app's own default
    cuda_batch_buckets: bool = True  # the app's own default
    replica_huge_pages: bool = False  # the app's own default
    ort_threads: int | None = None  # the app's own default
    pool_size: int | None = None  # the app's own default
    router_batches_in_flight: str | int = "auto"  # the app's own default
    replica_sweep: tuple[int, ...] = ()  # engine replica counts to compare; () for none
    ingress: Ingress = DEFAULT_INGRESS  # the one trtserve serve starts (ingress.py)
    batching: tuple[str, ...] = ("off", "on")
    modes: tuple[str, ...] = ("handle", "http binary", "http json")
    peer: bool = True
    generators: int = 2
    breakdown_concurrency: int = 16
    recovery_concurrency: int = 16
    recovery_faults: tuple[str, ...] = ("context", "crash")
    context_requests: int = 20  # affected requests to collect
    crash_requests: int = 1
    crash_kills: int = 1  # at least this many kills
    recovery_limit_s: float = 60.0  # per fault kind, whatever was collected by then
    seed: int = 0


# 8 s per point keeps the whole sweep (28 points, 5+ kills) under 10 minutes.
FULL = FastpathSetup(concurrency=(1, 16, 64, 256), seconds=8.0, warmup_s=2.0,
                     ceiling_seconds=3.0, generators=4, breakdown_concurrency=64,
                     recovery_concurrency=64, context_requests=200, crash_requests=200,
                     crash_kills=5, recovery_limit_s=300.0)


@dataclass(frozen=True)
class Recovery:
    """Requests of one run that met a fault (trail of more than one attempt) and the rest.
    ``faulted_attempt_ms``: the first entry of each affected request's trail, the attempt that
    met the fault: for a context fault the failed execution in the replica; for a kill, the
    Router's entry, from the attempt's start until it learnt of the death."""

    fault: str
    injected: int
    affected_ms: np.ndarray
    unaffected_ms: np.ndarray
    faulted_attempt_ms: np.ndarray
    failed: int


@dataclass
class FastpathResult:
    setup: FastpathSetup
    ceiling: Ceiling
    batching: list[str]
    points: dict[tuple[str, str, int], Measurement] = field(default_factory=dict)
    direct: Measurement | None = None
    recovery_batching: str = "off"
    recovery: list[Recovery] = field(default_factory=list)
    scaling: dict[tuple[str, int, int], Measurement] = field(default_factory=dict)
    # per swept count, each live replica's device as it reported it: "Ray GPU ids / UUID"
    placements: dict[int, list[str]] = field(default_factory=dict)

    def ratio(self, m: Measurement) -> float:
        return m.throughput / self.ceiling.best.rows_per_s

    def table(self) -> str:
        lines = ["| mode | batching | concurrency | req/s | p50 ms | p99 ms | vs ceiling "
                 "| mean batch | failed | generator CPU |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        best = self.ceiling.best
        lines.append(f"| ceiling (engine, no Serve) | batch {best.batch} | {best.threads} "
                     f"thread(s) | {best.rows_per_s:.0f} | {best.p50_ms:.2f} | "
                     f"{best.p99_ms:.2f} | 1.00x | {best.batch} | - | - |")
        for (mode, batching, c), m in self.points.items():
            lines.append(f"| {mode} | {batching} | {c} | {m.throughput:.0f} | {m.pct(50):.2f} "
                         f"| {m.pct(99):.2f} | {self.ratio(m):.3g}x | {_batch(m)} "
                         f"| {m.failed} | {m.generator_cpu:.0%} |")
        return "\n".join(lines)

    def breakdown(self) -> str:
        """Where one request's time goes at one concurrency, batching off: p50 of each path,
        and the difference from the path one hop shorter, named as that hop's cost."""
        c = self.setup.breakdown_concurrency
        needed = [(mode, "off", c) for mode in ("handle", "http binary", "http json")]
        if self.direct is None or any(key not in self.points for key in needed):
            return "not measured (it needs batching off and all three paths)"
        engine = self.ceiling.at_breakdown
        rows = [
            ("engine in process (one thread and context per caller)", engine.p50_ms,
             engine.rows_per_s, "-"),
            ("replica's own execution (trail ms, direct calls)",
             self.direct.replica_p50_ms, None,
             "running inside a served replica instead of alone"),
            ("direct handle to EngineReplica", self.direct.pct(50), self.direct.throughput,
             "one Serve hop: handle routing, serialization, replica queue and thread"),
        ]
        hops = (("handle", "the Router: validation, attempt loop, a second Serve hop"),
                ("http binary", "HTTP: Serve's ingress and the binary codec instead of a handle"),
                ("http json", "JSON instead of binary tensor data"))
        for mode, cost in hops:
            m = self.points[(mode, "off", c)]
            rows.append((f"Router {mode}" if mode == "handle" else mode, m.pct(50),
                         m.throughput, cost))
        lines = [f"at concurrency {c}, batching off",
                 "",
                 "| path | p50 ms | req/s | added p50 ms | cost of |",
                 "| --- | --- | --- | --- | --- |"]
        previous = None
        for name, p50, rate, cost in rows:
            added = "-" if previous is None else f"{p50 - previous:+.2f}"
            rate_text = "-" if rate is None else f"{rate:.0f}"
            lines.append(f"| {name} | {p50:.2f} | {rate_text} | {added} | {cost} |")
            previous = p50
        return "\n".join(lines)

    def scaling_table(self) -> str:
        """Each sweep point, and its throughput against perfect scaling from the smallest
        replica count at the same mode and concurrency."""
        if not self.scaling:
            return "not measured"
        smallest = min(n for _, _, n in self.scaling)
        lines = [f"batching {self.batching[-1]}; scaling = served(N) / (N / {smallest} x "
                 f"served({smallest}))",
                 "",
                 "| mode | concurrency | engine replicas | req/s | p50 ms | p99 ms | vs ceiling "
                 "| scaling | failed |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (mode, c, n), m in sorted(self.scaling.items()):
            base = self.scaling.get((mode, c, smallest))
            scaling = (m.throughput / (n / smallest * base.throughput)
                       if base is not None and base.throughput > 0 else float("nan"))
            lines.append(f"| {mode} | {c} | {n} | {m.throughput:.0f} | {m.pct(50):.2f} | "
                         f"{m.pct(99):.2f} | {self.ratio(m):.3g}x | {scaling:.2f} | "
                         f"{m.failed} |")
        lines += ["", "| engine replicas | each replica's device (Ray GPU ids / CUDA UUID) |",
                  "| --- | --- |"]
        lines += [f"| {n} | {'; '.join(devices)} |"
                  for n, devices in sorted(self.placements.items())]
        return "\n".join(lines)

    def recovery_table(self) -> str:
        if not self.recovery:
            return "not measured"
        lines = [f"handle calls with their trail at concurrency "
                 f"{self.setup.recovery_concurrency}, batching {self.recovery_batching}",
                 "",
                 "| fault | injected | affected | unaffected | affected p50 / p99 ms "
                 "| unaffected p50 / p99 ms | added p50 / p99 ms "
                 "| faulted attempt p50 / p99 ms | failed |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.recovery:
            a50, a99 = _pcts(r.affected_ms)
            u50, u99 = _pcts(r.unaffected_ms)
            f50, f99 = _pcts(r.faulted_attempt_ms)
            lines.append(f"| {r.fault} | {r.injected} | {len(r.affected_ms)} | "
                         f"{len(r.unaffected_ms)} | {a50:.2f} / {a99:.2f} | {u50:.2f} / "
                         f"{u99:.2f} | {a50 - u50:+.2f} / {a99 - u99:+.2f} | "
                         f"{f50:.2f} / {f99:.2f} | {r.failed} |")
        lines += ["", "faulted attempt: the first entry of an affected request's trail. For a "
                  "context fault, the failed execution in the replica; for a crash, from the "
                  "attempt's start until the Router learnt of the death."]
        return "\n".join(lines)

    def report(self) -> str:
        s = self.setup
        return "\n".join([
            f"{self.ceiling.where}; each request one row; {s.replicas} engine replicas, "
            f"router_replicas {s.router_replicas}, cuda_batch_buckets {s.cuda_batch_buckets}, "
            f"replica_huge_pages {s.replica_huge_pages}, "
            f"ort_threads {s.ort_threads if s.ort_threads is not None else 'default'}, "
            f"pool_size {s.pool_size if s.pool_size is not None else 'default'}, "
            f"router_batches_in_flight {s.router_batches_in_flight}, ingress {s.ingress}",
            f"ceiling: {self.ceiling.best.describe()}",
            "",
            self.ceiling.table(),
            "",
            self.table(),
            "",
            "per-hop breakdown " + self.breakdown(),
            "",
            "recovery: " + self.recovery_table(),
            "",
            "replica scaling: " + self.scaling_table(),
        ])


def _batch(m: Measurement) -> str:
    """The mean rows per execution, or "-" for a path whose answers carry no trail."""
    return "-" if np.isnan(m.mean_batch) else f"{m.mean_batch:.1f}"


def _ms(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f} ms"


def _pcts(values: np.ndarray) -> tuple[float, float]:
    if not len(values):
        return np.nan, np.nan
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


@serve.deployment(name="BatchedPeer", max_ongoing_requests=256)
class BatchedPeer:
    """Plain Serve as its docs advise: an async method under ``@serve.batch`` concatenates
    the batch and runs it on one context of the same engine; the batch knobs come through
    ``reconfigure`` (``set_max_batch_size``). No validation, no retries."""

    def __init__(self, model: str, backend: str, cache_dir: str) -> None:
        engine = load_engine(resolve(model, Path(cache_dir).expanduser()), backend)
        self.engine = engine
        self.context = engine.create_context(0)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.infer.set_max_batch_size(config["max_batch_size"])
        self.infer.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])

    @serve.batch
    async def infer(self, requests: list[dict[str, np.ndarray]]
                    ) -> list[dict[str, np.ndarray]]:
        names = list(requests[0])
        outputs = self.context.execute({n: np.concatenate([r[n] for r in requests])
                                        for n in names})
        bounds = np.cumsum([0] + [len(r[names[0]]) for r in requests])
        return [{k: v[a:b] for k, v in outputs.items()}
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _app_args(setup: FastpathSetup, gpus: float, batching: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "models": [setup.model], "backend": setup.backend, "replicas": setup.replicas,
        "gpus_per_replica": gpus, "cpus_per_replica": 0, "router_cpus": 0,
        "health_check_period_s": 1, "cache_dir": setup.cache_dir,
        "router_replicas": setup.router_replicas, "cuda_batch_buckets": setup.cuda_batch_buckets,
        "replica_huge_pages": setup.replica_huge_pages,
        "ort_threads": setup.ort_threads,
        "router_batches_in_flight": setup.router_batches_in_flight,
        **({} if setup.pool_size is None else {"pool_size": setup.pool_size}),
        "batch_size": setup.batch_size if batching == "on" else 1,
        "max_queue_delay_us": setup.max_queue_delay_us,
        "preferred_batch_sizes": list(setup.preferred_batch_sizes),
    }
    return args


def _gpus_per_replica(setup: FastpathSetup, replicas: int | None = None) -> float:
    if setup.gpus_per_replica is not None:
        return setup.gpus_per_replica
    gpus = ray.cluster_resources().get("GPU", 0.0)
    return min(1.0, gpus / (replicas or setup.replicas))


def _describe_replicas() -> list[dict[str, Any]]:
    """Every replica's own report, in replica id order (one that died meanwhile left out)."""
    engine = serve.get_deployment_handle("EngineReplica", APP_NAME)
    replies = engine.broadcast("describe").results(timeout_s=30, return_exceptions=True)
    return sorted((r for r in replies if isinstance(r, dict)), key=lambda r: r["replica_id"])


def _live_replicas() -> list[str]:
    return [r["replica_id"] for r in _describe_replicas() if r["healthy"]]


def _replica_devices() -> list[str]:
    """Each live replica's GPU, as Ray assigned it and CUDA names it."""
    devices = []
    for r in _describe_replicas():
        cuda = r["device"]["cuda"]
        gpu = ",".join(r["device"]["ray_gpu_ids"]) or "no GPU"
        devices.append(f"{r['replica_id']}: {gpu} / {cuda['uuid'] if cuda else '-'}")
    return devices


def _inject(fault: dict[str, Any], replica: str) -> bool:
    engine = serve.get_deployment_handle("EngineReplica", APP_NAME)
    try:
        engine.inject_fault.remote(fault, target=replica).result(timeout_s=30)
        return True
    except Exception:  # the replica may have died between describe and inject
        return False


def kill_replica(replica: str, limit_s: float) -> bool:
    """Arms a crash in ``replica`` (its next execution ends the process) and tells whether the
    replica died within ``limit_s``. The death, not the arming call's answer, is what counts:
    under load the crash often ends the process before that answer goes out."""
    _inject({"kind": "crash"}, replica)
    deadline = time.monotonic() + limit_s
    while replica in {r["replica_id"] for r in _describe_replicas()}:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for_replicas(count: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while len(_live_replicas()) < count and time.monotonic() < deadline:
        time.sleep(0.5)


class _Injections:
    """Fault injection while the load runs: ``until`` stops once enough affected requests
    were seen (and, for kills, enough kills), or at the time limit."""

    def __init__(self, setup: FastpathSetup, fault: str) -> None:
        self.setup, self.fault, self.count = setup, fault, 0

    def until(self, affected: Callable[[], int]) -> None:
        s = self.setup
        deadline = time.monotonic() + s.recovery_limit_s
        want, kills = ((s.context_requests, 0) if self.fault == "context"
                       else (s.crash_requests, s.crash_kills))
        while time.monotonic() < deadline and (affected() < want or self.count < kills):
            replicas = _live_replicas()
            if self.fault == "crash" and len(replicas) < s.replicas:
                time.sleep(0.2)  # one kill at a time: the last one is replaced first
                continue
            target = replicas[self.count % len(replicas)] if replicas else None
            # One failing execution per injection: each affected request meets one fault.
            if target and (_inject({"kind": "context", "count": 1}, target)
                           if self.fault == "context" else kill_replica(target, limit_s=5.0)):
                self.count += 1
            time.sleep(0.05 if self.fault == "context" else 1.0)
        if self.fault == "crash":  # what follows must find every replica back
            _wait_for_replicas(s.replicas, s.recovery_limit_s)


class _Run:
    """A run's cluster-side state: the generator, the ceiling's spec, progress."""

    def __init__(self, setup: FastpathSetup, gen: LoadGenerator, url: str,
                 result: FastpathResult, progress: Progress) -> None:
        self.setup, self.gen, self.url, self.result = setup, gen, url, result
        self.progress = progress
        self.model = result.ceiling.model

    def drive(self, target: Target, concurrency: int, label: str) -> Measurement:
        m = self.gen.run(target, self.result.ceiling.spec, concurrency,
                         warmup_s=self.setup.warmup_s, seconds=self.setup.seconds,
                         seed=self.setup.seed)
        self.progress(f"  {label:<40} c={concurrency:<4} {m.throughput:8.0f} req/s  "
                      f"p50 {m.pct(50):7.2f} ms  p99 {m.pct(99):7.2f} ms  "
                      f"{self.result.ratio(m):.3g}x ceiling  batch {_batch(m)}  "
                      f"attempt p50 {_ms(m.router_p50_ms)} (in replica "
                      f"{_ms(m.replica_p50_ms)})  "
                      f"failed {m.failed}  "
                      f"generator CPU {m.generator_cpu:.0%}")
        return m

    def sweep(self, replicas: int) -> None:
        s = self.setup
        devices = _replica_devices()
        self.result.placements[replicas] = devices
        self.progress(f"  {replicas} engine replica(s) on: {'; '.join(devices)}")
        for c in s.concurrency:
            for mode in s.modes:
                target = Target(MODES[mode], self.model, APP_NAME, self.url)
                self.result.scaling[(mode, c, replicas)] = self.drive(
                    target, c, f"trtserve {mode}, {replicas} engine replica(s)")

    def trtserve(self, batching: str) -> None:
        s = self.setup
        for c in sorted({*s.concurrency, *([s.breakdown_concurrency] if batching == "off"
                                           else [])}):
            for mode in s.modes:
                kind = MODES[mode]
                target = Target(kind, self.model, APP_NAME, self.url)
                self.result.points[(mode, batching, c)] = self.drive(
                    target, c, f"trtserve {mode}, batching {batching}")
        if batching == "off" and "handle" in s.modes:
            self.result.direct = self.drive(Target("direct", self.model, APP_NAME),
                                            s.breakdown_concurrency, "direct to EngineReplica")

    def recover(self, fault: str) -> Recovery:
        injections = _Injections(self.setup, fault)
        m = self.gen.run(Target("trail", self.model, APP_NAME), self.result.ceiling.spec,
                         self.setup.recovery_concurrency, warmup_s=self.setup.warmup_s,
                         during=injections.until, seed=self.setup.seed + 1)
        hit = m.attempts > 1
        r = Recovery(fault, injections.count, m.latency_ms[hit], m.latency_ms[~hit],
                     m.first_ms[hit], m.failed)
        a50, a99 = _pcts(r.affected_ms)
        self.progress(f"  recovery, {fault}: {injections.count} injected, "
                      f"{len(r.affected_ms)} affected (p50 {a50:.2f} ms, p99 {a99:.2f} ms), "
                      f"{len(r.unaffected_ms)} unaffected, {r.failed} failed")
        return r

    def peer(self, gpus: float) -> None:
        s = self.setup
        app = BatchedPeer.options(
            num_replicas=s.replicas,
            ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
            user_config={"max_batch_size": s.batch_size,
                         "batch_wait_timeout_s": s.max_queue_delay_us / 1e6},
        ).bind(s.model, s.backend, s.cache_dir)
        serve.run(app, name=PEER_APP, route_prefix=None, logging_config=QUIET)
        try:
            for c in s.concurrency:
                self.result.points[(PEER_MODE, "on", c)] = self.drive(
                    Target("peer", self.model, PEER_APP), c, PEER_MODE)
        finally:
            serve.delete(PEER_APP)


def _ceiling(setup: FastpathSetup) -> Ceiling:
    """In a spawned process: nothing of the engine (threads, sessions) stays behind."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(measure_ceiling, setup.model, setup.backend, setup.cache_dir,
                         setup.ceiling_batch_sizes, setup.ceiling_threads,
                         setup.ceiling_seconds, setup.breakdown_concurrency,
                         setup.seed).result()


@contextmanager
def _local_serve(ingress: Ingress) -> Iterator[str]:
    """A private Ray cluster (never one already running here) with Serve's HTTP ingress on a
    free port; yields its URL."""
    # The replicas' logs stay in the session's log files: the terminal shows progress only.
    with private_serve(ingress, include_dashboard=False, logging_level=logging.WARNING,
                       log_to_driver=False) as port:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per deployment
        yield f"http://127.0.0.1:{port}"


def run_fastpath(setup: FastpathSetup, progress: Progress = print) -> FastpathResult:
    """The whole measurement. Starts (and ends) its own Ray cluster: call it where none is
    initialized in this process."""
    progress(f"ceiling: {setup.model} in process, batch sizes {setup.ceiling_batch_sizes}, "
             f"threads {setup.ceiling_threads}")
    ceiling = _ceiling(setup)
    progress(f"  {ceiling.where}: best {ceiling.best.describe()}")
    batching = list(setup.batching)
    result = FastpathResult(setup, ceiling, batching, recovery_batching=batching[-1])
    with _local_serve(setup.ingress) as url:
        gpus = _gpus_per_replica(setup)
        address = ray.get_runtime_context().gcs_address
        with LoadGenerator(setup.generators, address) as gen:
            run = _Run(setup, gen, url, result, progress)
            for setting in batching:
                progress(f"trtserve, batching {setting}: deploying")
                serve.run(build_app(_app_args(setup, gpus, setting)), name=APP_NAME,
                          route_prefix="/", logging_config=QUIET)
                run.trtserve(setting)
                if setting == batching[-1]:
                    result.recovery = [run.recover(f) for f in setup.recovery_faults]
                serve.delete(APP_NAME)
            if setup.peer:
                progress(f"{PEER_MODE}: deploying")
                run.peer(gpus)
            for replicas in sorted(set(setup.replica_sweep)):
                progress(f"trtserve, {replicas} engine replica(s): deploying")
                args = _app_args(replace(setup, replicas=replicas),
                                 _gpus_per_replica(setup, replicas), batching[-1])
                serve.run(build_app(args), name=APP_NAME, route_prefix="/",
                          logging_config=QUIET)
                run.sweep(replicas)
                serve.delete(APP_NAME)
    return result


def docs_section(result: FastpathResult, machine: str, command: str, plots: list[str]
                 ) -> str:
    """A section for docs/benchmarks.md; ``plots`` are paths relative to that file."""
    return "\n".join([
        f"## Saturation: trtserve, the engine and plain Serve ({date.today().isoformat()})",
        "",
        f"Machine: {machine}. Command:",
        "",
        f"    {command}",
        "",
        "```",
        result.report(),
        "```",
        "",
        *(f"![{Path(p).stem}]({p})" for p in plots),
        "",
    ])


def plot(result: FastpathResult, directory: Path) -> list[Path]:
    """Throughput against concurrency (the ceiling as a line), and p50/p99 latency; none
    where matplotlib is not installed (the GPU machine's image may lack it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []

    directory.mkdir(parents=True, exist_ok=True)
    series: dict[tuple[str, str], list[tuple[int, Measurement]]] = {}
    for (mode, batching, c), m in result.points.items():
        series.setdefault((mode, batching), []).append((c, m))
    title = f"{result.ceiling.where}, each request one row"
    fig, ax = plt.subplots(figsize=(8, 5))
    for (mode, batching), points in series.items():
        ax.plot([c for c, _ in points], [m.throughput for _, m in points], marker="o",
                label=f"{mode}, batching {batching}")
    best = result.ceiling.best
    ax.axhline(best.rows_per_s, color="black", linestyle="--",
               label=f"ceiling: engine alone, batch {best.batch}, {best.threads} thread(s)")
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="req/s", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    throughput = directory / "fastpath-throughput.png"
    fig.savefig(throughput, dpi=100)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, q in zip(axes, (50, 99), strict=True):
        for (mode, batching), points in series.items():
            ax.plot([c for c, _ in points], [m.pct(q) for _, m in points], marker="o",
                    label=f"{mode}, batching {batching}")
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms",
               title=f"p{q} latency")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    latency = directory / "fastpath-latency.png"
    fig.savefig(latency, dpi=100)
    plt.close("all")
    return [throughput, latency]
