"""How long a caller waits to learn that an actor's process died, by what the process holds
(issue 9: the attempt a replica kill ends ran 50 ms longer than a whole request on an H100,
while Ray's notice took 15 ms on the idle 2-core machine).

Run on the GPU machine (docs/gpu.md), or anywhere, from the checkout:

    python3 -m tests.gpu_death_notice [--trials N] [--loads idle|"GPU and every core busy"]

Each trial starts an actor holding nothing, one ``resnet50`` session loaded as a replica
loads it (ONNX Runtime's CUDA provider, its CPU provider where there is no GPU; each row
names the device), or what an EngineReplica holds (a session per batch bucket, 4
contexts), the last also with its heap on huge pages as the app starts its replicas with
``replica_huge_pages``.
The actor stamps the time and ends its process with ``os._exit``, as the ``crash`` fault
does; the caller stamps the time when Ray's ActorDiedError reaches it, and, in a row of its
own, when the actor's lifeline (deployments/lifeline.py, which an EngineReplica holds)
wakes the caller's watcher: what the Routers on the actor's node see. Two rows more end a
plain child process holding the engine the same way, without Ray: the stamp to the parent's
``waitpid``, the kernel's share of the notice. The rows run with the machine idle, and while
another actor keeps the GPU busy (batch 32 on 4 contexts) and one spinning process per core
keeps the CPU busy, as a loaded bench does. One JSON line per row: p50 and max in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from deployments.app import HUGE_PAGES_ENV
from deployments.engine import GPU_POOL_SIZE, batch_buckets
from deployments.lifeline import Lifeline, Watcher
from engines.backend import Context, Engine, LoadOptions, load_engine
from engines.models import builtin_path, resolve
from engines.spec import example_inputs

HOLDS = {"nothing": "no model", "session": "one resnet50 session",
         "engine": "an EngineReplica's engine"}
LOADS = ("idle", "GPU and every core busy")
ROWS: list[tuple[str, dict[str, str]]] = [
    ("nothing", {}), ("session", {}), ("engine", {}), ("engine", HUGE_PAGES_ENV)]


def _engine(model: str, buckets: tuple[int, ...] = ()) -> Engine:
    """The model as a replica loads it: ONNX Runtime's CUDA provider where there is a GPU,
    else its CPU provider (each row names the device)."""
    return load_engine(resolve(model), "onnxruntime",
                       LoadOptions(threads=1, batch_buckets=buckets))


def _execute(engine: Engine, context: Context, rows: int) -> None:
    one = example_inputs(engine.spec, seed=0)
    context.execute({k: np.repeat(v, rows, axis=0) for k, v in one.items()})


def _hold(model: str, holds: str) -> list[Any]:
    """What the dying process holds: nothing, one session with one context, or what an
    EngineReplica holds for ``resnet50`` by default (a session per batch bucket up to 32,
    4 contexts, each bucket run on each)."""
    if holds == "nothing":
        return []
    engine = _engine(model, batch_buckets(32) if holds == "engine" else ())
    contexts = [engine.create_context(0)
                for _ in range(GPU_POOL_SIZE if holds == "engine" else 1)]
    for rows in batch_buckets(32) if holds == "engine" else (8,):
        for context in contexts:
            _execute(engine, context, rows)
    return [engine, contexts]


@ray.remote(num_cpus=0)
class Victim:
    def __init__(self, model: str, holds: str, line_id: str) -> None:
        self.lifeline = Lifeline(line_id)
        self.held = _hold(model, holds)

    def ready(self) -> bool:
        return True

    def die(self, stamp: str) -> None:
        Path(stamp).write_text(repr(time.time()))
        os._exit(1)


@ray.remote(num_cpus=0)
class Busy:
    """Keeps the GPU busy with batches of 32 on 4 contexts until ``stop``."""

    def __init__(self, model: str) -> None:
        self.engine = _engine(model)
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(4)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        context = self.engine.create_context(0)
        while not self.stopped.is_set():
            _execute(self.engine, context, 32)

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        self.stopped.set()


def _notice_ms(
    model: str, holds: str, env: dict[str, str], trials: int
) -> tuple[list[float], list[float]]:
    """Per trial, Ray's notice and the lifeline's."""
    ray_ms, lifeline_ms = [], []
    woke: dict[str, float] = {}
    watcher = Watcher(lambda line_id: woke.setdefault(line_id, time.time()))
    for trial in range(trials):
        line_id = f"notice-{os.getpid()}-{holds}-{len(env)}-{trial}-{time.time_ns()}"
        victim = Victim.options(  # type: ignore[attr-defined]
            runtime_env={"env_vars": env}).remote(model, holds, line_id)
        ray.get(victim.ready.remote())
        watcher.watch(frozenset([line_id]))
        stamp = tempfile.mktemp()
        try:
            ray.get(victim.die.remote(stamp))
        except ray.exceptions.RayActorError:
            noticed = time.time()
        died = float(Path(stamp).read_text())
        ray_ms.append((noticed - died) * 1000)
        deadline = time.monotonic() + 10
        while line_id not in woke and time.monotonic() < deadline:
            time.sleep(0.001)
        lifeline_ms.append((woke[line_id] - died) * 1000)
    return ray_ms, lifeline_ms


_CHILD = """
import os, sys, time
from tests.gpu_death_notice import _hold
held = _hold(sys.argv[1], sys.argv[2])
print(repr(time.time()), flush=True)
os._exit(1)
"""


def _kernel_exit_ms(model: str, holds: str, env: dict[str, str], trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, model, holds],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
        assert child.stdout is not None
        stamp = float(child.stdout.readline())
        child.wait()
        out.append((time.time() - stamp) * 1000)
    return out


def _row(name: str, device: str, ms: list[float]) -> None:
    print(json.dumps({"row": name, "device": device, "trials": len(ms),
                      "p50_ms": round(float(np.median(ms)), 1), "max_ms": round(max(ms), 1)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    args = parser.parse_args()
    model = str(builtin_path("resnet50", Path(tempfile.mkdtemp())))
    device = _engine(model).device
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    try:
        for load in args.loads:
            busy = Busy.remote(model) if load != "idle" else None  # type: ignore[attr-defined]
            if busy is not None:
                ray.get(busy.ready.remote())
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(os.cpu_count() or 1)] if "core" in load else []
            try:
                for holds, env in ROWS:
                    pages = ", heap on huge pages" if env else ""
                    ray_ms, lifeline_ms = _notice_ms(model, holds, env, args.trials)
                    _row(f"Ray, the actor holds {HOLDS[holds]}{pages}, {load}", device, ray_ms)
                    _row(f"lifeline, the actor holds {HOLDS[holds]}{pages}, {load}", device,
                         lifeline_ms)
                    if holds == "engine" and load == "idle":
                        _row(f"no Ray, a child process holds {HOLDS[holds]}{pages}, {load}",
                             device, _kernel_exit_ms(model, holds, env, args.trials))
            finally:
                for spinner in spinners:
                    spinner.kill()
                if busy is not None:
                    ray.get(busy.stop.remote())
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
