"""A replica keeps its capacity and its verdicts: contexts come back whatever happens, an
abandoned run is cancelled and replaced, a broken device stays broken for every model, and
the health check tells a lost device from a lost capacity. Real ONNX Runtime contexts, with
faults injected at the backend boundary (``Breakable`` below) where the injector has none."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployments import engine as engine_module
from deployments.engine import ReplicaCore
from engines import models
from engines.backend import Context, Engine, load_engine
from engines.errors import (
    ContextFailure,
    DeadlineExceeded,
    DeviceFailure,
    ReplicaFailure,
)
from engines.faults import Fault, FaultInjector, FaultyEngine
from engines.runner import Call, ModelRunner

X = {"x": np.ones((2, 16), np.float32)}


class Breakable:
    """An engine at the backend boundary whose next creates or executions fail on demand."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name, self.backend, self.device, self.spec = (
            inner.name, inner.backend, inner.device, inner.spec)
        self.failing_creates = 0
        self.execute_error: Callable[[], BaseException] | None = None
        self.execute_errors_left = 0
        self.executed = 0

    def create_context(self, generation: int) -> Context:
        if self.failing_creates > 0:
            self.failing_creates -= 1
            raise ContextFailure(f"{self.name}: out of memory creating context {generation}")
        return BreakableContext(self.inner.create_context(generation), self)

    def close(self) -> None:
        self.inner.close()


class BreakableContext:
    def __init__(self, inner: Context, engine: Breakable) -> None:
        self.inner, self.engine, self.generation = inner, engine, inner.generation

    def execute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.engine.executed += 1
        if self.engine.execute_errors_left > 0 and self.engine.execute_error is not None:
            self.engine.execute_errors_left -= 1
            raise self.engine.execute_error()
        return self.inner.execute(inputs)

    def cancel(self) -> None:
        self.inner.cancel()

    def close(self) -> None:
        self.inner.close()


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


def test_a_failed_cold_create_leaves_the_slot_to_the_refill(tiny: models.ModelSource) -> None:
    engine = Breakable(load_engine(tiny, "onnxruntime"))
    runner = ModelRunner(engine, pool_size=2, spares=0)
    engine.execute_error, engine.execute_errors_left = (lambda: ContextFailure("enqueue")), 1
    engine.failing_creates = 1  # the replacement fails once; the refill then succeeds
    _, trail = runner.infer(X, local_retries=1)
    assert [a.outcome for a in trail] == ["ContextFailure", "ok"]
    assert _wait(lambda: runner.pool.usable == 2)
    assert runner.pool.stats.refill_failures == 0
    runner.close()
    assert runner.pool.live == 0


def test_a_foreign_exception_neither_leaks_nor_kills_the_context_slot(
    tiny: models.ModelSource,
) -> None:
    engine = Breakable(load_engine(tiny, "onnxruntime"))
    runner = ModelRunner(engine, pool_size=1, spares=1)
    engine.execute_error, engine.execute_errors_left = (lambda: KeyError("backend bug")), 1
    _, trail = runner.infer(X, local_retries=1)
    assert trail[0].outcome == "ContextFailure" and "KeyError" in trail[0].message
    assert trail[1].outcome == "ok"
    assert _wait(lambda: runner.pool.live == 2 and runner.pool.usable == 1)
    runner.close()
    assert runner.pool.live == 0


def _runner_with_faults(tiny: models.ModelSource, **kw: Any) -> tuple[ModelRunner, FaultInjector]:
    injector = FaultInjector()
    return ModelRunner(FaultyEngine(load_engine(tiny, "onnxruntime"), injector), **kw), injector


def test_an_abandoned_run_is_cancelled_and_its_context_replaced(tiny: models.ModelSource) -> None:
    runner, injector = _runner_with_faults(tiny, pool_size=1, spares=1)
    injector.inject(Fault("hang", seconds=60))
    call = Call()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            runner.infer(X, local_retries=2, call=call)
        except BaseException as exc:  # asserted below
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert _wait(lambda: injector.fired["hang"] == 1)
    hung_generation = 1
    call.cancel()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the hang did not honour the cancellation"
    assert isinstance(outcome[0], DeadlineExceeded)
    assert runner.pool.stats.abandoned == 1
    # The slot was refilled; the abandoned context is closed and never lent again.
    _, trail = runner.infer(X, local_retries=0)
    assert trail[-1].generation != hung_generation
    assert _wait(lambda: runner.pool.usable == 1 and runner.pool.live == 2)
    runner.close()
    assert runner.pool.live == 0


def test_the_wait_for_a_context_ends_at_the_deadline(tiny: models.ModelSource) -> None:
    runner, injector = _runner_with_faults(tiny, pool_size=1, spares=0)
    held = runner.pool.acquire()
    with pytest.raises(DeadlineExceeded, match="every context was busy"):
        runner.infer(X, local_retries=0, deadline=time.monotonic() + 0.2)
    runner.pool.release(held)
    runner.close()




def test_after_a_device_failure_no_context_is_created_on_the_broken_device(
    tiny: models.ModelSource,
) -> None:
    engine = Breakable(load_engine(tiny, "onnxruntime"))
    runner = ModelRunner(engine, pool_size=1, spares=0)
    engine.execute_error, engine.execute_errors_left = (lambda: DeviceFailure("illegal")), 1
    engine.failing_creates = 100  # the broken device refuses every new context
    with pytest.raises(DeviceFailure, match="illegal"):
        runner.infer(X, local_retries=2)
    assert engine.failing_creates == 100  # nothing was even tried
    with pytest.raises(DeviceFailure):
        runner.infer(X, local_retries=2)
    runner.close()


@pytest.fixture
def core(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ReplicaCore:
    """A replica's core with tiny and a second model (tiny under another name), each behind
    a Breakable engine."""
    second = tmp_path / "other.onnx"
    second.write_bytes(models.resolve("tiny", cache_dir).path.read_bytes())
    real = engine_module.load_engine
    monkeypatch.setattr(engine_module, "load_engine",
                        lambda *a, **k: Breakable(real(*a, **k)))
    config = {"models": [{"model": "tiny"}, {"model": str(second)}], "backend": "onnxruntime",
              "pool_size": 2, "replicas": 1, "spares": 0, "cache_dir": str(cache_dir),
              "health_check_period_s": 1.0, "ort_threads": None, "ort_allow_spinning": False,
              "cuda_batch_buckets": True}
    made = ReplicaCore(config, "r1")
    yield made
    made.close()


def test_a_device_failure_in_one_model_stops_every_model(core: ReplicaCore) -> None:
    tiny = core.runners["tiny"].engine.inner
    tiny.execute_error, tiny.execute_errors_left = (lambda: DeviceFailure("illegal")), 1
    with pytest.raises(DeviceFailure):
        core.infer("tiny", X, local_retries=2)
    other = core.runners["other"].engine.inner
    with pytest.raises(DeviceFailure, match="replica r1"):
        core.infer("other", X, local_retries=2)
    assert other.executed == 0  # nothing more runs on the broken GPU, for any model
    with pytest.raises(DeviceFailure):
        core.check_health()


def test_the_canary_runs_only_when_no_request_succeeded_within_a_period(
    core: ReplicaCore,
) -> None:
    engine = core.runners["tiny"].engine.inner
    core.check_health()
    assert engine.executed == 1  # idle: the canary
    core.infer("tiny", X, local_retries=0)
    core.check_health()
    assert engine.executed == 2  # the request is the proof
    core.check_health(now=time.monotonic() + 1.5)  # a period without requests
    assert engine.executed == 3


def test_a_canary_that_fails_once_is_retried_on_a_fresh_context(core: ReplicaCore) -> None:
    canary_engine = core.runners["tiny"].engine.inner
    canary_engine.execute_error = lambda: ContextFailure("flaky")
    canary_engine.execute_errors_left = 1
    core.check_health()
    assert core.broken is None


def test_a_canary_that_keeps_failing_fails_health_without_poisoning(core: ReplicaCore) -> None:
    canary_engine = core.runners["tiny"].engine.inner
    canary_engine.execute_error = lambda: ContextFailure("no memory")
    canary_engine.execute_errors_left = 2
    with pytest.raises(ReplicaFailure, match="canary inference of tiny failed twice"):
        core.check_health()
    assert core.broken is None  # not a device failure: requests still run
    core.infer("tiny", X, local_retries=0)


def test_health_fails_when_half_the_contexts_are_gone_for_a_period(core: ReplicaCore) -> None:
    runner = core.runners["tiny"]
    engine = runner.engine.inner
    engine.failing_creates = 1000  # every replacement and refill fails
    engine.execute_error, engine.execute_errors_left = (lambda: ContextFailure("x")), 2
    with pytest.raises(ContextFailure):
        core.infer("tiny", X, local_retries=1)
    assert _wait(lambda: runner.pool.stats.refill_failures >= 1)
    assert runner.pool.usable == 0
    core.check_health(now=100.0)  # short, but not yet for a whole period
    with pytest.raises(ReplicaFailure, match="only 0 of 2 contexts of tiny usable"):
        core.check_health(now=101.5)
    assert core.broken is None
