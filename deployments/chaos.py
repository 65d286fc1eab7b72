"""A chaos run: the same random faults hit the replicas behind trtserve's Router and behind a
pass-through router (Serve's own routing, no retries), under one steady load.

Both routers sit in one app in front of the same EngineReplica replicas and run at once, so
every fault lands on both paths alike. What each path's callers saw (answered, failed, and
how; how long the slowest answer took) is counted per second, and each fault is logged with
the time it was injected. The difference between the two paths is what the router's retries
save. The baseline is not plain Serve: its replicas are trtserve's, which already leave the
cluster on a device failure and fail their health check by canary.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from engines.spec import IOSpec, example_inputs

from .app import bind_engine, bind_router, parse_args
from .bench_serve import PassThrough
from .ray_errors import outcome as ray_outcome

CHAOS_APP = "trtserve-chaos"
PATHS = ("trtserve", "pass-through, no retries")
FAULTS: dict[str, dict[str, Any]] = {
    "context": {"kind": "context", "count": 3},
    "device": {"kind": "device"},
    "crash": {"kind": "crash"},
    "hang": {"kind": "hang", "seconds": 8.0},
}


@dataclass
class Outcomes:
    by_second: dict[int, Counter[str]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, second: int, outcome: str, ms: float) -> None:
        self.by_second.setdefault(second, Counter())[outcome] += 1
        if outcome == "ok":
            self.latencies_ms.append(ms)

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.by_second.values():
            total.update(counts)
        return total


@dataclass
class ChaosResult:
    seconds: float
    callers: int
    faults: list[tuple[float, str, str]]
    outcomes: dict[str, Outcomes]

    def table(self) -> str:
        lines = [
            f"{self.seconds:g} s, {self.callers} callers per path, {len(self.faults)} faults",
            "",
            "| path | requests | answered | failed | failures by kind | p50 ms | p99 ms "
            "| max ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for path in PATHS:
            totals = self.outcomes[path].totals()
            answered = totals.pop("ok", 0)
            failed = sum(totals.values())
            kinds = ", ".join(f"{k} {n}" for k, n in totals.most_common()) or "-"
            lat = self.outcomes[path].latencies_ms or [float("nan")]
            lines.append(
                f"| {path} | {answered + failed} | {answered} | {failed} | {kinds} | "
                f"{np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | "
                f"{max(lat):.0f} |"
            )
        lines += ["", "faults (seconds into the run):"]
        lines += [f"- {t:5.1f} s: {kind} into replica {r}" for t, kind, r in self.faults]
        return "\n".join(lines)


async def _caller(call: Any, model: str, spec: IOSpec, rng: np.random.Generator,
                  sink: Outcomes, start: float, until: float, timeout_s: float) -> None:
    while time.monotonic() < until:
        # Every request its own input: a request that meets two faults by coincidence is then
        # a query of death alone, never every request of the run.
        inputs = example_inputs(spec, seed=int(rng.integers(2**32)))
        began = time.monotonic()
        try:
            await asyncio.wait_for(call.remote(model, inputs), timeout_s)
            outcome = "ok"
        except TimeoutError:
            outcome = "no answer in time"
        except Exception as exc:  # every failure is counted by kind, none is fatal here
            outcome = ray_outcome(exc)
        sink.add(int(began - start), outcome, (time.monotonic() - began) * 1000)


async def _faults(engine: Any, every_s: float, start: float, until: float, rng: random.Random,
                  kinds: list[str], log: list[tuple[float, str, str]],
                  progress: Callable[[str], None]) -> None:
    await asyncio.sleep(every_s)
    while time.monotonic() < until - every_s / 2:
        replies = await engine.broadcast("describe").results_async(return_exceptions=True)
        alive = sorted(r["replica_id"] for r in replies if isinstance(r, dict) and r["healthy"])
        if alive:
            kind, replica = rng.choice(kinds), rng.choice(alive)
            try:
                await engine.inject_fault.remote(FAULTS[kind], target=replica)
                log.append((time.monotonic() - start, kind, replica))
                progress(f"  {time.monotonic() - start:5.1f} s: {kind} into {replica}")
            except Exception as exc:  # the target may die between describe and inject
                progress(f"  could not inject {kind} into {replica}: {type(exc).__name__}")
        await asyncio.sleep(every_s)


def run(cache_dir: str, replicas: int, seconds: float, callers: int, every_s: float,
        kinds: list[str], seed: int, progress: Callable[[str], None] = print,
        model: str = "tiny") -> ChaosResult:
    args = parse_args({"models": [model], "replicas": replicas, "cpus_per_replica": 0,
                       "router_cpus": 0, "gpus_per_replica": 0, "cache_dir": cache_dir})
    engine = bind_engine(args)
    serve.run(PassThrough.bind(engine, bind_router(args, engine)), name=CHAOS_APP,
              route_prefix=None)
    calls = {
        "trtserve": serve.get_deployment_handle("Router", CHAOS_APP).infer,
        "pass-through, no retries": serve.get_deployment_handle("PassThrough", CHAOS_APP).infer,
    }
    engine_handle = serve.get_deployment_handle("EngineReplica", CHAOS_APP)
    spec = engine_handle.describe.remote().result()["models"][model]["spec"]
    rng = np.random.default_rng(seed)
    outcomes = {path: Outcomes() for path in PATHS}
    faults: list[tuple[float, str, str]] = []

    async def main() -> None:
        start = time.monotonic()
        until = start + seconds
        tasks = [
            _caller(calls[path], model, spec, rng, outcomes[path], start, until, 30.0)
            for path in PATHS
            for _ in range(callers)
        ]
        tasks.append(_faults(engine_handle, every_s, start, until, random.Random(seed), kinds,
                             faults, progress))
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        serve.delete(CHAOS_APP)
    return ChaosResult(seconds, callers, faults, outcomes)


def plot(result: ChaosResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(PATHS), 1, figsize=(10, 5), sharex=True)
    for ax, name in zip(axes, PATHS, strict=True):
        seconds = sorted(result.outcomes[name].by_second)
        ok = [result.outcomes[name].by_second[s]["ok"] for s in seconds]
        bad = [sum(result.outcomes[name].by_second[s].values()) - o
               for s, o in zip(seconds, ok, strict=True)]
        ax.bar(seconds, ok, color="tab:green", label="answered")
        ax.bar(seconds, bad, bottom=ok, color="tab:red", label="failed")
        for t, kind, _ in result.faults:
            ax.axvline(t, color="black", linestyle=":", linewidth=1)
            ax.text(t, ax.get_ylim()[1] * 0.9, kind, fontsize=7, rotation=90, va="top")
        ax.set_ylabel("requests / s")
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("seconds into the run (dotted: a fault injected)")
    fig.suptitle("chaos run: the same faults, with and without the router's retries")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
