"""Router overhead, measured side by side in one run on one set of engine replicas.

Ways to reach the same model, interleaved round by round so that drift on a shared machine
hits them alike:

- ``raw engine``: the engine in this process (a ModelRunner, one thread per caller), no
  Serve at all: the ceiling;
- ``direct``: handle calls to EngineReplica.infer (no router at all);
- ``pass-through``: a router deployment that forwards each call and does nothing else,
  with the same max_ongoing_requests as ours;
- ``pass-through, choose+dispatch``: the same, but picking the replica with
  ``choose_replica`` and sending with ``dispatch``, as our Router did until it learned the
  accepting replica from the request router instead (routed.py): the reservation that makes
  the pick binding costs one more call to the replica;
- ``trtserve``: our Router (validation, batching, retry bookkeeping);
- ``pass-through, Serve default``: the pass-through router left at Serve's default
  max_ongoing_requests (5), the collapse under concurrent callers that DESIGN.md records.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from engines.backend import LoadOptions, load_engine
from engines.models import resolve
from engines.runner import ModelRunner
from engines.spec import example_inputs

from .app import bind_engine, bind_router, parse_args
from .policy import RetryPolicy

MODES = (
    "raw engine",
    "direct",
    "pass-through",
    "pass-through, choose+dispatch",
    "trtserve",
    "pass-through, Serve default",
)
BENCH_APP = "trtserve-bench"


@serve.deployment(name="PassThrough", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class PassThrough:
    """Forwards to the engine: the least any router deployment can cost.

    The other routers are passed in only so that they belong to the same app, in front of
    the same engine replicas."""

    def __init__(self, engine: DeploymentHandle, *_same_app: DeploymentHandle) -> None:
        self.engine = engine

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> Any:
        return await self.engine.infer.remote(model, inputs)


@serve.deployment(
    name="ChooseDispatch", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}
)
class ChooseDispatch:
    """Forwards through choose_replica/dispatch: a reservation before each call."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> Any:
        method = self.engine.infer
        async with method.choose_replica(model) as chosen:
            return await method.dispatch(chosen, model, inputs)


@dataclass
class Series:
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


@dataclass(frozen=True)
class BenchSetup:
    model: str
    backend: str
    replicas: int
    gpus_per_replica: float
    cache_dir: str


def deploy_bench(setup: BenchSetup) -> dict[str, Any]:
    """One app: our Router and three pass-through routers in front of the same replicas."""
    args = parse_args(
        {
            "models": [setup.model],
            "backend": setup.backend,
            "replicas": setup.replicas,
            "cpus_per_replica": 0,
            "router_cpus": 0,
            "gpus_per_replica": setup.gpus_per_replica,
            "cache_dir": setup.cache_dir,
        }
    )
    engine = bind_engine(args)
    ours = bind_router(args, engine)
    default5 = PassThrough.options(name="PassThroughDefault", max_ongoing_requests=5)
    serve.run(
        PassThrough.bind(engine, ours, default5.bind(engine), ChooseDispatch.bind(engine)),
        name=BENCH_APP,
        route_prefix=None,
    )
    return {
        "direct": serve.get_deployment_handle("EngineReplica", BENCH_APP).infer,
        "pass-through": serve.get_deployment_handle("PassThrough", BENCH_APP).infer,
        "pass-through, choose+dispatch": serve.get_deployment_handle(
            "ChooseDispatch", BENCH_APP
        ).infer,
        "trtserve": serve.get_deployment_handle("Router", BENCH_APP).infer,
        "pass-through, Serve default": serve.get_deployment_handle(
            "PassThroughDefault", BENCH_APP
        ).infer,
    }


Call = Callable[[dict[str, np.ndarray]], Any]


async def _drive(call: Call, inputs: dict[str, np.ndarray], total: int, callers: int) -> Series:
    series = Series()
    remaining = total

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call(inputs)
            series.latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    series.seconds = time.perf_counter() - started
    return series


def _calls(setup: BenchSetup, handles: dict[str, Any], raw: ModelRunner,
           pool: ThreadPoolExecutor) -> dict[str, Call]:
    def via_handle(handle: Any) -> Call:
        return lambda inputs: handle.remote(setup.model, inputs)

    calls: dict[str, Call] = {mode: via_handle(h) for mode, h in handles.items()}

    async def in_process(inputs: dict[str, np.ndarray]) -> Any:
        run = functools.partial(raw.infer, inputs, local_retries=RetryPolicy.local_retries)
        return await asyncio.get_running_loop().run_in_executor(pool, run)

    calls["raw engine"] = in_process
    return calls


async def measure(calls: dict[str, Call], inputs: dict[str, np.ndarray], callers: list[int],
                  requests: int, rounds: int, progress: Callable[[str], None]
                  ) -> dict[tuple[str, int], Series]:
    for mode in MODES:  # warm every path: connections, replicas' first requests
        await _drive(calls[mode], inputs, 20, 4)
    results: dict[tuple[str, int], Series] = {}
    for n in callers:
        for r in range(rounds):
            for mode in MODES:
                s = await _drive(calls[mode], inputs, requests // rounds, n)
                total = results.setdefault((mode, n), Series())
                total.latencies_ms += s.latencies_ms
                total.seconds += s.seconds
            progress(f"  {n} caller(s): round {r + 1}/{rounds}")
    return results


def table(results: dict[tuple[str, int], Series], callers: list[int]) -> str:
    lines = [
        "| callers | path | req/s | p50 ms | p99 ms | req/s vs raw engine "
        "| req/s vs pass-through | p50 vs pass-through |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in callers:
        raw = results[("raw engine", n)]
        base = results[("pass-through", n)]
        for mode in MODES:
            s = results[(mode, n)]
            lines.append(
                f"| {n} | {mode} | {s.throughput:.0f} | {s.pct(50):.2f} | {s.pct(99):.2f} | "
                f"{s.throughput / raw.throughput:.2f}x | {s.throughput / base.throughput:.2f}x "
                f"| {s.pct(50) / base.pct(50):.2f}x |"
            )
    return "\n".join(lines)


def plot(results: dict[tuple[str, int], Series], callers: list[int], path: Path,
         title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(callers))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        left.bar(x + i * width, [results[(mode, n)].throughput for n in callers], width,
                 label=mode)
        right.bar(x + i * width, [results[(mode, n)].pct(50) for n in callers], width,
                  label=mode)
    for ax, label in ((left, "throughput (req/s)"), (right, "p50 latency (ms)")):
        ax.set_xticks(x + 0.4 - width / 2, [f"{n} caller(s)" for n in callers])
        ax.set_title(label)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def run(setup: BenchSetup, callers: list[int], requests: int, rounds: int, out: Path | None,
        progress: Callable[[str], None] = print) -> str:
    source = resolve(setup.model, Path(setup.cache_dir).expanduser())
    raw = ModelRunner(load_engine(source, setup.backend, LoadOptions()), pool_size=max(callers))
    inputs = example_inputs(raw.spec, seed=0)
    handles = deploy_bench(setup)
    try:
        with ThreadPoolExecutor(max(callers)) as pool:
            calls = _calls(setup, handles, raw, pool)
            results = asyncio.run(measure(calls, inputs, callers, requests, rounds, progress))
    finally:
        serve.delete(BENCH_APP)
        raw.close()
    where = f"{source.name} batch 1 on {raw.engine.backend} ({raw.engine.device})"
    text = f"{where}, {setup.replicas} replicas\n\n" + table(results, callers)
    if out is not None and plot(results, callers, out, f"{where}: router overhead"):
        text += f"\n\nplot: {out}"
    return text
