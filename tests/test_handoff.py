"""Inputs handed to a replica in shared memory (deployments/handoff.py): read back in place
exactly, buffers written again only when the replica is done with them, a dead Router's
buffers let go; and on a real local Ray cluster with real ONNX Runtime replicas, batches of
large inputs go that way, answer each request with its own rows, and lose nothing when a
replica is killed or hangs under them."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from deployments import handoff, lifeline
from deployments.handoff import Inbox, Outbox
from deployments.ray_errors import unwrap

from .serving import FaultAt, deploy, engine, inject, local_serve, replica_ids

pytestmark = pytest.mark.skipif(not handoff.available(),
                                reason="needs Linux: os.memfd_create and /proc are missing here")

WIDTH = 32_768  # 128 KiB a row: over handoff.MIN_BYTES alone


def _big(seed: int, rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 4, 96, 96)).astype(np.float32),
            "ids": rng.integers(0, 1 << 40, (rows, 3), dtype=np.int64)}


def _mapping_buffers() -> set[str]:
    """The Serve deployments whose processes map a Router's buffer."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "memfd:trtserve-inputs" in (proc / "maps").read_text():
                found.add((proc / "cmdline").read_text().split(":")[-1].strip("\0 "))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def test_inputs_are_read_back_in_place_as_they_were_written() -> None:
    outbox, inbox = Outbox(), Inbox()
    try:
        inputs = _big(1, rows=3)
        lent = outbox.lend(inputs)
        assert lent is not None
        got = inbox.arrays(lent.shared)
        assert set(got) == set(inputs)
        for name, value in inputs.items():
            assert got[name].dtype == value.dtype
            np.testing.assert_array_equal(got[name], value)
            assert not got[name].flags.writeable
        outbox.give_back(lent, reusable=True)
    finally:
        outbox.close()


def test_small_inputs_objects_and_a_turned_off_outbox_go_through_ray() -> None:
    outbox = Outbox()
    try:
        assert outbox.lend({"x": np.ones((2, 16), np.float32)}) is None
        words = np.array([b"a" * 200_000], dtype=object)
        assert outbox.lend({"x": np.ones((1, 40_000), np.float32), "w": words}) is None
        outbox.after_failure(ValueError("any other failure"), "r1")
        assert outbox.lend(_big(1)) is not None
        outbox.turn_off("a replica could not open a buffer")
        assert outbox.lend(_big(1)) is None
    finally:
        outbox.close()


def test_a_buffer_is_written_again_only_after_the_replica_is_done_with_it() -> None:
    outbox, inbox = Outbox(), Inbox()
    try:
        first = outbox.lend(_big(1))
        assert first is not None
        outbox.give_back(first, reusable=True)
        second = outbox.lend(_big(2))
        assert second is not None and second.shared.inode == first.shared.inode
        seen = inbox.arrays(second.shared)
        outbox.give_back(second, reusable=False)  # as after a timeout: the replica may read on
        third = outbox.lend(_big(3))
        assert third is not None and third.shared.inode != second.shared.inode
        np.testing.assert_array_equal(seen["x"], _big(2)["x"])  # its pages stay for it
        np.testing.assert_array_equal(inbox.arrays(third.shared)["x"], _big(3)["x"])
        assert len(inbox) == 1  # the closed buffer's mapping was let go
        outbox.give_back(third, reusable=True)
    finally:
        outbox.close()


def test_a_replica_that_cannot_open_the_buffer_says_so() -> None:
    shared = handoff.SharedInputs(os.getpid(), 10_000, 1, (("x", "<f4", (1, 4), 0),))
    with pytest.raises(handoff.InputsUnreachable, match="cannot open"):
        Inbox().arrays(shared)


def _lend_and_wait(ready: Any) -> None:
    outbox = Outbox()
    lent = outbox.lend(_big(1))
    assert lent is not None
    ready.put(lent.shared)
    signal.pause()


def test_a_dead_routers_buffer_is_let_go_by_the_replica() -> None:
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Queue()
    child = spawn.Process(target=_lend_and_wait, args=(ready,))
    child.start()
    shared = ready.get(timeout=60)
    inbox, living = Inbox(), Outbox()
    try:
        seen = inbox.arrays(shared)
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        np.testing.assert_array_equal(seen["x"], _big(1)["x"])  # mapped: still readable
        lent = living.lend(_big(2))
        assert lent is not None
        np.testing.assert_array_equal(inbox.arrays(lent.shared)["x"], _big(2)["x"])
        assert len(inbox) == 1
    finally:
        living.close()


# On a real cluster: a model whose one-row request is over MIN_BYTES.


def _wide_model(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal((WIDTH, 8)).astype(np.float32) / 100
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve() as p:
        yield p


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wide_model(tmp_path_factory.mktemp("wide") / "wide.onnx")


def _rows(i: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(i).standard_normal((1, WIDTH)).astype(np.float32)}


def _call(router: Any, inputs: dict[str, np.ndarray]) -> Any:
    try:
        return router.infer_with_trail.remote("wide", inputs, timeout=30).result()
    except BaseException as exc:  # asserted on by the caller
        return exc


def _assert_own_rows(alone: ort.InferenceSession, inputs: dict[str, np.ndarray],
                     result: Any) -> list[dict[str, Any]]:
    assert not isinstance(result, BaseException), repr(result)
    outputs, trail = result
    # Distinct random rows differ in y by about 1 (weights / 100 over 32,768 terms);
    # batched and lone float32 sums agree to about 1e-5.
    np.testing.assert_allclose(outputs["y"], alone.run(None, inputs)[0], rtol=0, atol=1e-3)
    return trail  # type: ignore[no-any-return]


def _served(cache_dir: Path, wide: Path, **args: Any) -> tuple[Any, ort.InferenceSession]:
    """The app serving ``wide`` (2 replicas of one context), and the model alone."""
    router = deploy(cache_dir, models=[{"model": str(wide)}], replicas=2, pool_size=1, **args)
    return router, ort.InferenceSession(str(wide), providers=["CPUExecutionProvider"])


@pytest.mark.integration
def test_batches_of_large_inputs_go_through_shared_memory_and_answer_their_own_rows(
    port: int, cache_dir: Path, wide: Path
) -> None:
    router, alone = _served(cache_dir, wide)
    inputs = [_rows(i) for i in range(120)]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda x: _call(router, x), inputs))
    batches = [_assert_own_rows(alone, x, r)[-1]["batch"] for x, r in zip(inputs, results,
                                                                          strict=True)]
    assert max(batches) > 1, batches
    # The Router writes the buffers and the replicas read them: only where lifelines say the
    # replicas share the Router's node.
    expected = {"Router", "EngineReplica"} if lifeline.available() else set()
    assert _mapping_buffers() == expected


@pytest.mark.integration
def test_a_replica_killed_under_a_handed_off_batch_loses_no_request(
    port: int, cache_dir: Path, wide: Path
) -> None:
    router, alone = _served(cache_dir, wide)
    victim = sorted(replica_ids())[0]
    fault = FaultAt(30, {"kind": "crash"}, victim)
    inputs = [_rows(i) for i in range(200)]
    done = 0

    def one(x: dict[str, np.ndarray]) -> Any:
        nonlocal done
        result = _call(router, x)
        done += 1
        fault(done)
        return result

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, inputs))
    assert fault.injected
    trails = [_assert_own_rows(alone, x, r) for x, r in zip(inputs, results, strict=True)]
    assert any(a["outcome"] == "ReplicaFailure" for t in trails for a in t), \
        "no request was in flight on the replica that died"


@pytest.mark.integration
def test_a_replica_that_cannot_open_a_buffer_answers_what_the_router_acts_on(
    port: int, cache_dir: Path, wide: Path
) -> None:
    deploy(cache_dir, models=[{"model": str(wide)}], replicas=1)
    unreachable = handoff.SharedInputs(os.getpid(), 10_000, 1,
                                       (("x", "<f4", (1, WIDTH), 0),))
    with pytest.raises(Exception) as raised:
        engine().infer.remote("wide", unreachable).result(timeout_s=30)
    assert isinstance(unwrap(raised.value), handoff.InputsUnreachable), repr(raised.value)
    # What the Router does with it (attempts.py): no more handoffs; the attempt fails over.
    outbox = Outbox()
    try:
        outbox.after_failure(raised.value, "r1")
        assert outbox.lend(_big(1)) is None
    finally:
        outbox.close()


@pytest.mark.integration
def test_a_handed_off_batch_that_times_out_is_answered_from_another_replica(
    port: int, cache_dir: Path, wide: Path
) -> None:
    router, alone = _served(cache_dir, wide, retry={"attempt_timeout_s": 1, "deadline_s": 10})
    inject({"kind": "hang", "seconds": 60}, target=sorted(replica_ids())[0])
    inputs = [_rows(i) for i in range(96)]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda x: _call(router, x), inputs))
    # The timed-out attempt's buffer is closed, never written again; the retry gets another.
    trails = [_assert_own_rows(alone, x, r) for x, r in zip(inputs, results, strict=True)]
    # Timed out by the Router's clock or by the replica's own (the deadline each attempt
    # carries), whichever ends first.
    assert any(("timed out" in m or "ran out of its time there" in m)
               for t in trails for m in (a.get("message", "") for a in t)), \
        "no attempt timed out on the hung replica"
