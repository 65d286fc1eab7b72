"""The dynamic batcher on its own (plain asyncio, no Ray): when batches leave, how big they
get, what is never mixed, and what happens to a request whose deadline passes in the queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from deployments.batcher import (
    Batcher,
    BatchPolicy,
    Pending,
    concatenate,
    router_slots,
    split,
)
from engines.errors import DeadlineExceeded
from engines.spec import IOSpec, TensorSpec


def _x(rows: int, cols: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)}


class Recorder:
    """A ``run`` that holds each batch until released and answers each row doubled."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()

    async def run(self, batch: list[Pending]) -> None:
        self.batches.append([p.rows for p in batch])
        await self.gate.wait()
        outputs = {"y": concatenate(batch)["x"] * 2}
        for pending, part in zip(batch, split(outputs, batch), strict=True):
            pending.future.set_result(part)


async def _ticks() -> None:
    """Let every ready task run: the submits, then the batches they start."""
    for _ in range(5):
        await asyncio.sleep(0)


def _submit(batcher: Batcher, inputs: dict[str, np.ndarray], deadline_s: float = 10) -> Any:
    return asyncio.ensure_future(
        batcher.submit(Pending(inputs, time.monotonic() + deadline_s, None))
    )


def test_a_lone_request_leaves_at_once_and_load_forms_batches() -> None:
    async def scenario() -> None:
        rec = Recorder()
        batcher = Batcher("m", BatchPolicy(batch_size=8), lambda: 1, rec.run)
        first = _submit(batcher, _x(1, seed=0))
        await _ticks()
        assert rec.batches == [[1]]  # nothing waited for company
        later = [_submit(batcher, _x(rows, seed=i)) for i, rows in enumerate([2, 3, 4, 1], 1)]
        await _ticks()
        assert rec.batches == [[1]]  # the only slot is busy: they gather
        rec.gate.set()
        results = await asyncio.gather(first, *later)
        assert rec.batches == [[1], [2, 3], [4, 1]]  # at most 8 rows, in arrival order
        for i, (rows, got) in enumerate(zip([1, 2, 3, 4, 1], results, strict=True)):
            np.testing.assert_array_equal(got["y"], _x(rows, seed=i)["x"] * 2)

    asyncio.run(scenario())


def test_requests_with_other_non_batch_dimensions_are_never_mixed() -> None:
    async def scenario() -> None:
        rec = Recorder()
        batcher = Batcher("m", BatchPolicy(batch_size=8), lambda: 1, rec.run)
        busy = _submit(batcher, _x(1))
        await _ticks()
        mixed = [_submit(batcher, _x(1, cols=c, seed=i)) for i, c in enumerate([4, 5, 4, 5])]
        await _ticks()
        rec.gate.set()
        await asyncio.gather(busy, *mixed)
        assert sorted(map(len, rec.batches[1:])) == [2, 2]

    asyncio.run(scenario())


def test_a_request_out_of_time_in_the_queue_is_answered_and_never_runs() -> None:
    async def scenario() -> None:
        rec = Recorder()
        batcher = Batcher("m", BatchPolicy(batch_size=8), lambda: 1, rec.run)
        busy = _submit(batcher, _x(1))
        await _ticks()
        late = _submit(batcher, _x(3), deadline_s=0.05)
        with pytest.raises(DeadlineExceeded):
            await late
        rec.gate.set()
        await busy
        await _ticks()
        assert rec.batches == [[1]]  # the late request never reached run

    asyncio.run(scenario())


def test_a_queue_delay_waits_for_the_preferred_size_but_no_longer() -> None:
    async def scenario() -> None:
        rec = Recorder()
        rec.gate.set()
        policy = BatchPolicy(batch_size=8, max_queue_delay_us=200_000, preferred_batch_sizes=(4,))
        batcher = Batcher("m", policy, lambda: 4, rec.run)
        four = [_submit(batcher, _x(1, seed=i)) for i in range(4)]
        await asyncio.gather(*four)
        assert rec.batches == [[1, 1, 1, 1]]  # held until the preferred size
        alone = _submit(batcher, _x(1))
        await alone  # left after the delay, short of the preferred size
        assert rec.batches[-1] == [1]

    asyncio.run(scenario())


def test_the_policy_follows_the_model() -> None:
    batched = IOSpec((TensorSpec("x", np.float32, (-1, 4)),),
                     (TensorSpec("y", np.float32, (-1, 2)),), max_batch=16)
    assert BatchPolicy.for_model({"batch_size": 32}, batched).batch_size == 16
    assert BatchPolicy.for_model({"batch_size": 1}, batched).enabled is False
    scalar_out = IOSpec((TensorSpec("x", np.float32, (-1, 4)),),
                        (TensorSpec("total", np.float32, ()),))
    assert BatchPolicy.for_model({"batch_size": 32}, scalar_out).enabled is False
    with pytest.raises(ValueError, match="outside"):
        BatchPolicy(batch_size=8, preferred_batch_sizes=(16,))


def test_routers_share_the_contexts_of_the_replicas() -> None:
    # 2 replicas x 4 contexts: one batch per context in flight from all Routers together.
    assert router_slots(8, 1, "auto") == 8
    assert router_slots(8, 4, "auto") == 2
    assert router_slots(8, 3, "auto") == 3  # rounded up: no context left without a batch
    assert router_slots(8, 12, "auto") == 1  # every Router can always send one
    assert router_slots(8, 4, 3) == 3  # a number is taken as it is
