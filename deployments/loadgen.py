"""A closed-loop load generator that is not the bottleneck: several processes, each with its
own asyncio loop, driving handle calls or HTTP requests.

Why processes: one Python process sending Serve handle calls or HTTP requests saturates its
own core long before a served model does, and the GIL stops threads from helping. Why
``spawn``: a process forked after ``ray.init()`` hangs in its own ``ray.init()``
(docs/gpu.md); a spawned one starts clean and joins the cluster by address.

Each process measures its own CPU time over a run, so every load point says how busy the
busiest generator was: a generator near 100% of a core would cap the throughput it reports.

Inputs are seeded random, one row each, built before timing: every request has its own input
up to a memory cap (``MAX_INPUT_BYTES`` per process), beyond which the distinct inputs are
reused in turn (a large model: ResNet-50's 600 KB rows).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engines.spec import IOSpec, example_inputs

from .protocol import TRAIL_HEADER, encode_infer_request

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

# What a request is sent through:
# - handle: serve.get_app_handle(app).infer.remote(model, inputs), the Router's handle method;
# - handle_by_value: the same through .options(_by_reference=False), Serve's gRPC transport;
# - trail: the same through infer_with_trail, which also returns the attempt trail;
# - direct: serve.get_deployment_handle("EngineReplica", app).infer.remote(model, inputs);
# - peer: serve.get_app_handle(app).infer.remote(inputs), a plain Serve app;
# - http_json, http_binary: POST {url}/v2/models/{model}/infer.
Kind = Literal["handle", "handle_by_value", "trail", "direct", "peer", "http_json", "http_binary"]
HTTP_KINDS: tuple[str, ...] = ("http_json", "http_binary")
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_DISTINCT = 20_000
# Time for every process to receive its start time before it comes.
START_MARGIN_S = 0.2


@dataclass(frozen=True)
class Target:
    kind: Kind
    model: str
    app: str
    url: str = ""


@dataclass(frozen=True)
class Job:
    target: Target
    spec: IOSpec
    callers: int
    seed: int
    timeout_s: float


@dataclass
class Records:
    """One process's requests, one entry each; times are time.monotonic() (one clock for
    every process of the machine)."""

    started: np.ndarray
    ended: np.ndarray
    ok: np.ndarray
    attempts: np.ndarray  # entries of the attempt trail; 0 where the path returns none
    replica_ms: np.ndarray  # the last attempt's time in the replica; NaN where unknown
    # The first attempt's time as its trail gives it; for one that failed over, the time until
    # the Router learnt of the failure. NaN where unknown.
    first_ms: np.ndarray
    batch: np.ndarray  # rows in the last attempt's execution; NaN where unknown
    router_ms: np.ndarray  # the last attempt as the Router timed it; NaN where unknown
    cpu_s: float
    wall_s: float

    @property
    def cpu_use(self) -> float:
        """Cores this process kept busy while it ran."""
        return self.cpu_s / self.wall_s


@dataclass
class Measurement:
    """A load point's window: every request that ended inside it."""

    latency_ms: np.ndarray
    attempts: np.ndarray
    replica_ms: np.ndarray
    first_ms: np.ndarray
    batch: np.ndarray
    router_ms: np.ndarray
    failed: int
    seconds: float
    generator_cpu: float  # the busiest generator process's CPU use, in cores

    @property
    def throughput(self) -> float:
        return len(self.latency_ms) / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q)) if len(self.latency_ms) else np.nan

    @property
    def replica_p50_ms(self) -> float:
        """The last attempt's time in the replica, from the trails (p50); NaN for a path
        whose answers carry no trail. The rest of a request's time is the client's, the
        ingress's and the Router's."""
        return _p50(self.replica_ms)

    @property
    def router_p50_ms(self) -> float:
        """The last attempt from the Router's side (p50): the replica's time and the hop
        there and back. The rest of a request's time is the client's, the ingress's, the
        codec's and the wait in the Router's batch queue."""
        return _p50(self.router_ms)

    @property
    def mean_batch(self) -> float:
        """Rows per execution, averaged over requests (so as each request saw it); NaN for a
        path whose answers carry no trail."""
        known = self.batch[~np.isnan(self.batch)]
        return float(known.mean()) if len(known) else np.nan


def _p50(values: np.ndarray) -> float:
    known = values[~np.isnan(values)]
    return float(np.percentile(known, 50)) if len(known) else np.nan


def _random_inputs(spec: IOSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {name: a.shape for name, a in example_inputs(spec).items()}
    return {t.name: rng.standard_normal(shapes[t.name]).astype(t.dtype) for t in spec.inputs}


def build_requests(job: Job) -> list[Any]:
    """Distinct requests, built before timing: input dicts, or encoded HTTP bodies."""
    rng = np.random.default_rng(job.seed)
    first = _random_inputs(job.spec, rng)
    binary = job.target.kind == "http_binary"
    encode = ((lambda x: encode_infer_request(x, binary))
              if job.target.kind in HTTP_KINDS else (lambda x: x))
    sample = encode(first)
    size = len(sample[0]) if job.target.kind in HTTP_KINDS else sum(
        a.nbytes for a in first.values())
    count = max(1, min(MAX_DISTINCT, MAX_INPUT_BYTES // max(size, 1)))
    return [sample] + [encode(_random_inputs(job.spec, rng)) for _ in range(count - 1)]


Send = Callable[[Any], Any]


# attempts, the last one's ms, the first one's ms, the rows of the last one's execution, the
# last one's router_ms
TrailInfo = tuple[int, float, float, float, float]
NO_TRAIL: TrailInfo = (0, np.nan, np.nan, np.nan, np.nan)


def _trail_info(trail: list[dict[str, Any]]) -> TrailInfo:
    if not trail:
        return NO_TRAIL
    last = trail[-1]
    return (len(trail), float(last["ms"]), float(trail[0]["ms"]), float(last.get("batch") or 1),
            float(last.get("router_ms", np.nan)))


def app_handle(target: Target) -> DeploymentHandle:
    """The handle a caller of ``target`` holds to its app's ingress."""
    from ray import serve

    app = serve.get_app_handle(target.app)
    return app.options(_by_reference=False) if target.kind == "handle_by_value" else app


def _sender(target: Target, session: Any) -> Send:
    """A coroutine function: one request -> its TrailInfo."""
    if target.kind in HTTP_KINDS:
        url = f"{target.url}/v2/models/{target.model}/infer"

        async def post(request: tuple[bytes, dict[str, str]]) -> TrailInfo:
            body, headers = request
            async with session.post(url, data=body, headers=headers) as reply:
                await reply.read()  # a client reads the answer; decoding it is left out
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}")
                return _trail_info(json.loads(reply.headers.get(TRAIL_HEADER, "[]")))

        return post
    from ray import serve

    if target.kind == "direct":
        engine = serve.get_deployment_handle("EngineReplica", target.app)

        async def direct(inputs: dict[str, np.ndarray]) -> TrailInfo:
            _, trail = await engine.infer.remote(target.model, inputs)
            return _trail_info(trail)

        return direct
    app = app_handle(target)
    if target.kind == "peer":

        async def peer(inputs: dict[str, np.ndarray]) -> TrailInfo:
            await app.infer.remote(inputs)
            return NO_TRAIL

        return peer
    if target.kind == "trail":

        async def with_trail(inputs: dict[str, np.ndarray]) -> TrailInfo:
            _, trail = await app.infer_with_trail.remote(target.model, inputs)
            return _trail_info(trail)

        return with_trail

    async def handle(inputs: dict[str, np.ndarray]) -> TrailInfo:
        await app.infer.remote(target.model, inputs)
        return NO_TRAIL

    return handle


async def _drive(job: Job, requests: list[Any], conn: Connection, stop: Any,
                 affected: Synchronized) -> Records:
    rows: list[tuple[float, float, bool, int, float, float, float, float]] = []
    session = None
    if job.target.kind in HTTP_KINDS:
        import aiohttp  # a dependency of ray[serve]; far less CPU per request than httpx

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=job.callers),
            timeout=aiohttp.ClientTimeout(total=job.timeout_s),
        )
    send = _sender(job.target, session)
    # One request before the clock starts: a new handle learns its replicas (and an HTTP
    # session opens its connection) on its first call, which can take longer than a short
    # warm-up and is no part of the steady state being measured.
    try:
        async with asyncio.timeout(job.timeout_s):
            await send(requests[0])
    except Exception:  # the run itself counts failures
        pass
    conn.send("ready")
    start_at = conn.recv()  # the parent has cleared ``stop`` by now
    # A thread turns the cross-process event into a local one: callers check it per request.
    local_stop = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), local_stop.set()), daemon=True).start()

    async def caller(first: int) -> None:
        i = first
        while not local_stop.is_set():
            request = requests[i % len(requests)]
            i += job.callers
            began = time.monotonic()
            try:
                async with asyncio.timeout(job.timeout_s):  # no task per request, unlike wait_for
                    attempts, replica_ms, first_ms, batch, router_ms = await send(request)
                ok = True
            except Exception:  # counted as failed; the run goes on
                (attempts, replica_ms, first_ms, batch, router_ms), ok = NO_TRAIL, False
            rows.append((began, time.monotonic(), ok, attempts, replica_ms, first_ms, batch,
                         router_ms))
            if attempts > 1:  # the parent stops a recovery run on this count
                with affected.get_lock():
                    affected.value += 1

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0, wall0 = time.process_time(), time.monotonic()
    try:
        await asyncio.gather(*(caller(i) for i in range(job.callers)))
    finally:
        if session is not None:
            await session.close()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    cols = list(zip(*rows, strict=True)) if rows else [()] * 8
    return Records(np.array(cols[0], float), np.array(cols[1], float), np.array(cols[2], bool),
                   np.array(cols[3], int), np.array(cols[4], float), np.array(cols[5], float),
                   np.array(cols[6], float), np.array(cols[7], float), cpu, max(wall, 1e-9))


def _worker(conn: Connection, stop: Any, affected: Synchronized, ray_address: str) -> None:
    """One generator process: joins the cluster once, then runs jobs until told to end."""
    import ray

    ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
    cache: dict[tuple[str, int], list[Any]] = {}
    # One event loop for every job: a handle whose router runs on its caller's loop (Serve's
    # RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, part of RAY_SERVE_THROUGHPUT_OPTIMIZED) is
    # bound to the loop of its first call, and fails every call from a later one.
    loop = asyncio.new_event_loop()
    while (job := conn.recv()) is not None:
        try:
            # Handle calls of every kind send the same arrays; each HTTP kind its own bodies.
            form = job.target.kind if job.target.kind in HTTP_KINDS else "arrays"
            key = (form, job.seed)
            requests = cache.get(key) or cache.setdefault(key, build_requests(job))
            conn.send(loop.run_until_complete(_drive(job, requests, conn, stop, affected)))
        except Exception as exc:  # the parent raises it
            conn.send(exc)
    loop.close()
    ray.shutdown()


class LoadGenerator:
    """``processes`` spawned generator processes, kept for every load point of a run."""

    def __init__(self, processes: int, ray_address: str) -> None:
        context = mp.get_context("spawn")
        self.stop = context.Event()
        self.affected: Synchronized = context.Value("i", 0)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, daemon=True,
                                   args=(child, self.stop, self.affected, ray_address))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def run(self, target: Target, spec: IOSpec, concurrency: int, *, warmup_s: float,
            seconds: float = 0.0, during: Callable[[Callable[[], int]], None] | None = None,
            seed: int = 0, timeout_s: float = 60.0) -> Measurement:
        """Drive ``target`` with ``concurrency`` callers; measure after ``warmup_s``, for
        ``seconds`` or, with ``during``, until ``during(affected)`` returns (it is given a
        function counting the requests whose trail has more than one attempt so far)."""
        shares = [concurrency // len(self.conns) + (i < concurrency % len(self.conns))
                  for i in range(len(self.conns))]
        busy = [(c, n) for c, n in zip(self.conns, shares, strict=True) if n > 0]
        for i, (conn, n) in enumerate(busy):
            # Each process its own seed: no two processes send the same inputs.
            conn.send(Job(target, spec, n, seed * 1000 + i, timeout_s))
        for conn, _ in busy:
            _check(conn.recv())
        self.stop.clear()
        with self.affected.get_lock():
            self.affected.value = 0
        start_at = time.monotonic() + START_MARGIN_S
        for conn, _ in busy:
            conn.send(start_at)
        begin = start_at + warmup_s
        time.sleep(max(0.0, begin - time.monotonic()))
        if during is not None:
            during(lambda: int(self.affected.value))
        else:
            time.sleep(seconds)
        end = time.monotonic()
        self.stop.set()
        return _window([_check(conn.recv()) for conn, _ in busy], begin, end)


def _check(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise RuntimeError(f"a load generator process failed: {reply!r}") from reply
    return reply


def _window(parts: list[Records], begin: float, end: float) -> Measurement:
    started, ended, ok, attempts, replica_ms, first_ms, batch, router_ms = (
        np.concatenate([getattr(p, f) for p in parts])
        for f in ("started", "ended", "ok", "attempts", "replica_ms", "first_ms", "batch",
                  "router_ms")
    )
    inside = (ended >= begin) & (ended <= end)
    good = inside & ok
    return Measurement(
        latency_ms=(ended[good] - started[good]) * 1000.0,
        attempts=attempts[good],
        replica_ms=replica_ms[good],
        first_ms=first_ms[good],
        batch=batch[good],
        router_ms=router_ms[good],
        failed=int((inside & ~ok).sum()),
        seconds=end - begin,
        generator_cpu=max(p.cpu_use for p in parts),
    )
