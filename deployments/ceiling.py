"""The ceiling: the engine in one process, no Serve, no Ray, driven as hard as it goes.

One context per thread, each thread executing back to back on its own inputs, for every
batch size, thread count and engine variant; the best rows per second is what a served path
is measured against. Run ``measure_ceiling`` in a spawned process of its own (before Ray
starts), so no engine or thread state leaks into the served measurements.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backend import LoadOptions, load_engine
from engines.models import resolve
from engines.spec import IOSpec, example_inputs

# Engine variants the ceiling is the best of: (label, LoadOptions fields): what trtserve
# ships (no spinning; one intra-op thread on the CUDA provider) and ONNX Runtime's own
# defaults (a thread per core, spinning), so a shipped default can never throttle the ceiling.
ENGINE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("shipped", {}),
    ("onnxruntime defaults", {"threads": 0, "allow_spinning": True}),
]
# Distinct inputs per thread are capped by bytes: ResNet-50 at batch 32 is 19 MB a request.
MAX_INPUT_BYTES_PER_THREAD = 64 * 1024 * 1024
MAX_DISTINCT = 64


@dataclass(frozen=True)
class EngineRun:
    """One configuration: ``threads`` contexts executing batches of ``batch`` rows."""

    variant: str
    batch: int
    threads: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float

    def describe(self) -> str:
        return (f"batch {self.batch}, {self.threads} thread(s), engine variant "
                f"'{self.variant}': {self.rows_per_s:.0f} rows/s, p50 {self.p50_ms:.2f} ms")


@dataclass(frozen=True)
class Ceiling:
    model: str  # the name the app serves it under (a path's stem)
    where: str  # model, backend and device
    spec: IOSpec
    runs: tuple[EngineRun, ...]
    # Batch 1 with one thread per caller, at the per-hop breakdown's concurrency.
    at_breakdown: EngineRun

    @property
    def best(self) -> EngineRun:
        return max(self.runs, key=lambda r: r.rows_per_s)

    def table(self) -> str:
        lines = ["| engine variant | batch | threads | rows/s | p50 ms | p99 ms |",
                 "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r.variant} | {r.batch} | {r.threads} | {r.rows_per_s:.0f} | "
                  f"{r.p50_ms:.2f} | {r.p99_ms:.2f} |" for r in self.runs]
        return "\n".join(lines)


def _batches(spec: IOSpec, batch: int, count: int, rng: np.random.Generator
             ) -> list[dict[str, np.ndarray]]:
    shapes = {name: (batch, *a.shape[1:]) for name, a in example_inputs(spec).items()}
    return [{t.name: rng.standard_normal(shapes[t.name]).astype(t.dtype) for t in spec.inputs}
            for _ in range(count)]


def _drive(engine: Any, variant: str, batch: int, threads: int, seconds: float, seed: int
           ) -> EngineRun:
    spec: IOSpec = engine.spec
    row_bytes = sum(a.nbytes for a in example_inputs(spec).values())
    distinct = max(1, min(MAX_DISTINCT, MAX_INPUT_BYTES_PER_THREAD // (row_bytes * batch)))
    contexts = [engine.create_context(i) for i in range(threads)]
    inputs = [_batches(spec, batch, distinct, np.random.default_rng(seed + i))
              for i in range(threads)]
    for context, own in zip(contexts, inputs, strict=True):
        context.execute(own[0])  # first run of a shape: allocations, algorithm searches
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        start.wait()
        n = 0
        while not stop.is_set():
            began = time.perf_counter()
            contexts[i].execute(inputs[i][n % distinct])
            latencies[i].append((time.perf_counter() - began) * 1000.0)
            n += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    for context in contexts:
        context.close()
    flat = np.concatenate([np.asarray(x) for x in latencies])
    return EngineRun(variant, batch, threads, len(flat) * batch / elapsed,
                     float(np.percentile(flat, 50)), float(np.percentile(flat, 99)))


def measure_ceiling(model: str, backend: str, cache_dir: str, batch_sizes: tuple[int, ...],
                    threads: tuple[int, ...], seconds: float, breakdown_concurrency: int,
                    seed: int = 0) -> Ceiling:
    cache = Path(cache_dir).expanduser()
    source = resolve(model, cache)
    runs: list[EngineRun] = []
    at_breakdown: EngineRun | None = None
    where = ""
    for label, fields in ENGINE_VARIANTS:
        engine = load_engine(source, backend, LoadOptions(cache_dir=cache, **fields))
        try:
            where = f"{source.name} on {engine.backend} ({engine.device})"
            runs += [_drive(engine, label, b, t, seconds, seed)
                     for b in batch_sizes for t in threads]
            if at_breakdown is None:  # the served paths run on the default variant
                at_breakdown = _drive(engine, label, 1, breakdown_concurrency, seconds, seed)
            spec = engine.spec
        finally:
            engine.close()
    assert at_breakdown is not None  # ENGINE_VARIANTS is never empty
    return Ceiling(source.name, where, spec, tuple(runs), at_breakdown)
