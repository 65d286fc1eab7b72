"""Context pool, local retries and injected faults, on real ONNX Runtime contexts."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from engines import models
from engines.backend import load_engine
from engines.cuda import no_device_reason, provoke_illegal_address
from engines.errors import (
    ContextFailure,
    DeviceFailure,
    EngineLoadFailure,
    InvalidInput,
    RetriesExhausted,
)
from engines.faults import Fault, FaultInjector, FaultyEngine
from engines.runner import ModelRunner

X = {"x": np.ones((2, 16), np.float32)}


def _runner(tiny: models.ModelSource, **kwargs) -> tuple[ModelRunner, FaultInjector]:
    injector = FaultInjector()
    engine = FaultyEngine(load_engine(tiny, "onnxruntime"), injector)
    return ModelRunner(engine, replica="r1", **kwargs), injector


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_context_fault_is_retried_on_a_fresh_context(tiny: models.ModelSource) -> None:
    runner, injector = _runner(tiny, pool_size=1, spares=1)
    injector.inject(Fault("context"))
    outputs, trail = runner.infer(X, local_retries=2)
    np.testing.assert_allclose(outputs["probs"], models.tiny_reference(X["x"])["probs"], atol=1e-6)
    assert [a.outcome for a in trail] == ["ContextFailure", "ok"]
    assert trail[0].generation != trail[1].generation
    assert trail[1].generation == 2  # the warm spare, created with the pool
    assert {a.replica for a in trail} == {"r1"}
    assert runner.pool.stats.promoted == 1 and runner.pool.stats.cold_creates == 0
    assert _wait_until(lambda: runner.pool.spares == 1)  # refilled in the background
    runner.close()
    assert runner.pool.live == 0


def test_local_retries_are_bounded(tiny: models.ModelSource) -> None:
    runner, injector = _runner(tiny)
    injector.inject(Fault("context", count=5))
    with pytest.raises(ContextFailure, match="3 contexts failed in a row") as caught:
        runner.infer(X, local_retries=2)
    assert [a["outcome"] for a in caught.value.trail] == ["ContextFailure"] * 3
    assert len({a["generation"] for a in caught.value.trail}) == 3
    _, trail = runner.infer(X, local_retries=2)  # 2 faults left, then success
    assert [a.outcome for a in trail] == ["ContextFailure", "ContextFailure", "ok"]
    runner.close()
    assert runner.pool.live == 0


def test_a_device_fault_poisons_the_engine(tiny: models.ModelSource) -> None:
    runner, injector = _runner(tiny)
    injector.inject(Fault("device"))
    with pytest.raises(DeviceFailure) as caught:
        runner.infer(X, local_retries=2)
    assert caught.value.replica_id == "r1"
    assert [a["outcome"] for a in caught.value.trail] == ["DeviceFailure"]
    assert runner.poisoned is not None
    injector.clear()  # sticky: disarming pending faults does not heal the device
    for _ in range(3):
        with pytest.raises(DeviceFailure):
            runner.infer(X, local_retries=2)
    runner.close()
    assert runner.pool.live == 0


def test_a_device_fault_fails_every_engine_in_the_process(tiny: models.ModelSource) -> None:
    injector = FaultInjector()
    a = ModelRunner(FaultyEngine(load_engine(tiny, "onnxruntime"), injector))
    b = ModelRunner(FaultyEngine(load_engine(tiny, "onnxruntime"), injector))
    injector.inject(Fault("device"))
    with pytest.raises(DeviceFailure):
        a.infer(X, local_retries=2)
    with pytest.raises(DeviceFailure):
        b.infer(X, local_retries=2)
    a.close()
    b.close()


def test_faults_can_target_one_model(tiny: models.ModelSource) -> None:
    runner, injector = _runner(tiny)
    injector.inject(Fault("context", model="resnet50"))
    _, trail = runner.infer(X, local_retries=2)
    assert [a.outcome for a in trail] == ["ok"]
    assert injector.pending()[0]["remaining"] == 1
    runner.close()


def test_a_hang_delays_but_answers(tiny: models.ModelSource) -> None:
    runner, injector = _runner(tiny)
    injector.inject(Fault("hang", seconds=0.2))
    outputs, trail = runner.infer(X, local_retries=2)
    assert [a.outcome for a in trail] == ["ok"]
    assert injector.fired["hang"] == 1 and injector.pending() == []
    assert outputs["probs"].shape == (2, 8)
    runner.close()


def test_a_crash_ends_the_process(tiny: models.ModelSource) -> None:
    script = (
        "import numpy as np\n"
        "from engines import models\n"
        "from engines.backend import load_engine\n"
        "from engines.faults import Fault, FaultInjector, FaultyEngine\n"
        "from engines.runner import ModelRunner\n"
        "inj = FaultInjector()\n"
        "from pathlib import Path\n"
        f"src = models.resolve('tiny', Path({str(tiny.path.parent.parent)!r}))\n"
        "r = ModelRunner(FaultyEngine(load_engine(src, 'onnxruntime'), inj))\n"
        "inj.inject(Fault('crash'))\n"
        "r.infer({'x': np.ones((1, 16), np.float32)}, local_retries=0)\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 17, done.stderr
    assert "survived" not in done.stdout


def test_invalid_faults_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown fault kind"):
        Fault.from_dict({"kind": "meteor"})
    with pytest.raises(InvalidInput, match="needs seconds"):
        Fault.from_dict({"kind": "hang"})
    with pytest.raises(InvalidInput, match="unknown fault field"):
        Fault.from_dict({"kind": "context", "cont": 2})


def test_concurrent_requests_each_get_their_own_context(tiny: models.ModelSource) -> None:
    # Enough local retries that even all 6 faults landing on one request cannot fail it.
    runner, injector = _runner(tiny, pool_size=4, spares=2)
    injector.inject(Fault("context", count=6))
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((3, 16)).astype(np.float32) for _ in range(40)]
    results: list[tuple[int, dict[str, np.ndarray]] | BaseException] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            out, _ = runner.infer({"x": batches[i]}, local_retries=6)
            with lock:
                results.append((i, out))
        except BaseException as exc:  # recorded, then asserted below
            with lock:
                results.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40
    for item in results:
        assert not isinstance(item, BaseException), item
        i, out = item
        np.testing.assert_allclose(
            out["logits"], models.tiny_reference(batches[i])["logits"], rtol=1e-5, atol=1e-5
        )
    assert injector.fired["context"] == 6
    assert _wait_until(lambda: runner.pool.live == 6)  # 4 active + 2 spares
    runner.close()
    assert runner.pool.live == 0


def test_pool_close_with_a_context_lent_out(tiny: models.ModelSource) -> None:
    runner, _ = _runner(tiny, pool_size=2)
    context = runner.pool.acquire()
    runner.pool.close()
    assert runner.pool.live == 1
    runner.pool.release(context)
    assert runner.pool.live == 0
    with pytest.raises(ContextFailure, match="closed"):
        runner.pool.acquire()


def test_errors_survive_pickling_with_their_trail() -> None:
    err = RetriesExhausted("gave up", trail=[{"outcome": "DeviceFailure"}], replica_id="r9")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RetriesExhausted
    assert (back.message, back.trail, back.replica_id) == ("gave up", err.trail, "r9")
    assert back.http_status == 503


@pytest.mark.skipif(no_device_reason(0) is None, reason="a CUDA GPU is visible here")
def test_a_cuda_fault_is_refused_without_a_gpu() -> None:
    fault = Fault.from_dict({"kind": "cuda"})  # writing one down needs no GPU: app configs do
    injector = FaultInjector()
    with pytest.raises(InvalidInput, match="'cuda' fault needs a CUDA GPU in this process"):
        injector.inject(fault)
    assert injector.pending() == []
    with pytest.raises(EngineLoadFailure, match="cannot provoke a CUDA fault on GPU 0"):
        provoke_illegal_address(0)
