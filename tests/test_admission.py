"""The engine replica's per-model limit: failovers first, and no slot ever lost to a waiter
that gave up (plain asyncio, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.admission import Admission


async def _hold(admission: Admission, name: str, failover: bool, order: list[str],
                release: asyncio.Event) -> None:
    async with admission.slot(failover=failover):
        order.append(name)
        await release.wait()


def test_failovers_take_the_next_free_slot_before_fresh_attempts() -> None:
    async def scenario() -> list[str]:
        admission, order, release = Admission(1), [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(admission, "running", False, order, release))]
        await asyncio.sleep(0)
        for name, failover in (("fresh 1", False), ("fresh 2", False),
                               ("failover 1", True), ("failover 2", True)):
            tasks.append(asyncio.create_task(_hold(admission, name, failover, order, release)))
            await asyncio.sleep(0)
        assert admission.waiting == 4
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == [
        "running", "failover 1", "failover 2", "fresh 1", "fresh 2"]


@pytest.mark.parametrize("granted_first", [False, True])
def test_a_waiter_that_gives_up_loses_no_slot(granted_first: bool) -> None:
    async def scenario() -> list[str]:
        admission, order, release = Admission(1), [], asyncio.Event()
        held = admission.slot(failover=False)
        await held.__aenter__()
        leaving = asyncio.create_task(_hold(admission, "leaving", True, order, release))
        staying = asyncio.create_task(_hold(admission, "staying", False, order, release))
        await asyncio.sleep(0)
        if granted_first:
            # The slot goes to the failover, whose caller is cancelled before it resumes.
            await held.__aexit__(None, None, None)
            leaving.cancel()
        else:
            leaving.cancel()
            await asyncio.sleep(0)
            await held.__aexit__(None, None, None)
        release.set()
        await asyncio.wait_for(staying, 1.0)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        # The one slot came back: a later request still gets it.
        await asyncio.wait_for(_hold(admission, "after", False, order, release), 1.0)
        assert admission.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["staying", "after"]


def test_a_limit_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Admission(0)
