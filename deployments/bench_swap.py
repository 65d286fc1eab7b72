"""What a failed context costs: promoting a warm spare against creating a context cold.

Measured side by side in one run on the same engine: each trial fails a context on purpose
(``ContextPool.replace``) and times until the replacement has answered one request. With a
warm spare the replacement already exists; cold, it is created on the request's path. A
fresh engine (the alternative without the Engine/Context split) is timed too, for scale.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.backend import LoadOptions, load_engine
from engines.models import ModelSource
from engines.pool import ContextPool
from engines.spec import example_inputs


@dataclass(frozen=True)
class SwapResult:
    model: str
    backend: str
    device: str
    trials: int
    warm_ms: list[float]
    cold_ms: list[float]
    engine_ms: list[float]

    def table(self) -> str:
        def row(label: str, values: list[float]) -> str:
            p50 = statistics.median(values)
            ratio = p50 / statistics.median(self.warm_ms)
            return f"| {label} | {p50:.3f} | {max(values):.3f} | {ratio:.1f}x |"

        return "\n".join(
            [
                f"{self.model} on {self.backend} ({self.device}), {self.trials} trials; "
                "time from a failed context to the replacement's first answer",
                "",
                "| replacement | p50 ms | max ms | vs warm spare |",
                "| --- | --- | --- | --- |",
                row("warm spare promoted", self.warm_ms),
                row("context created cold", self.cold_ms),
                row("engine reloaded", self.engine_ms),
            ]
        )


def measure_swap(
    source: ModelSource,
    backend: str = "auto",
    trials: int = 50,
    engine_trials: int = 3,
    progress: Callable[[str], None] = print,
) -> SwapResult:
    engine = load_engine(source, backend, LoadOptions())
    inputs = example_inputs(engine.spec, seed=0)
    warm_pool = ContextPool(engine, size=1, spares=1)
    cold_pool = ContextPool(engine, size=1, spares=0)
    warm: list[float] = []
    cold: list[float] = []
    for i in range(trials):
        for pool, sink in ((warm_pool, warm), (cold_pool, cold)):
            deadline = time.monotonic() + 10
            while pool.spares < pool.spares_wanted and time.monotonic() < deadline:
                time.sleep(0.001)  # let the background refill finish: not part of the swap
            failed = pool.acquire()
            started = time.perf_counter()
            pool.replace(failed)
            context = pool.acquire()
            context.execute(inputs)
            sink.append((time.perf_counter() - started) * 1000)
            pool.release(context)
        if (i + 1) % 10 == 0:
            progress(f"  swap trials {i + 1}/{trials}")
    assert warm_pool.stats.cold_creates == 0, "a warm trial fell back to a cold create"
    warm_pool.close()
    cold_pool.close()
    reload_ms: list[float] = []
    for _ in range(engine_trials):
        started = time.perf_counter()
        fresh = load_engine(source, engine.backend, LoadOptions())
        fresh.create_context(1).execute(inputs)
        reload_ms.append((time.perf_counter() - started) * 1000)
        fresh.close()
    engine.close()
    return SwapResult(source.name, engine.backend, engine.device, trials, warm, cold, reload_ms)
