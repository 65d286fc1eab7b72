"""routed.Routed: an attempt waits for a replica within the request's time, then runs within
its own, counted from the replica's acceptance, which the request router may report from
another thread; and each replica's attempts in flight, counted from the request router's
first choice. A replica whose lifeline says it died ends the attempts it accepted at once."""

from __future__ import annotations

import asyncio

import pytest

from deployments.routed import Routed, accepted, dead, first_choice, in_flight, replica_died


def test_an_attempt_no_replica_accepts_times_out_with_nobody_to_blame() -> None:
    async def attempt() -> Routed:
        routed = Routed(0.2, lambda: 60.0)
        with pytest.raises(TimeoutError):
            async with routed:
                await asyncio.sleep(60)
        return routed

    assert asyncio.run(attempt()).replica_id is None


def test_acceptance_starts_the_attempts_own_time_and_names_the_replica() -> None:
    async def attempt() -> Routed:
        routed = Routed(60.0, lambda: 0.2)
        with pytest.raises(TimeoutError):
            async with routed:
                await asyncio.to_thread(accepted, routed.attempt_id, "replica-1")
                await asyncio.sleep(60)
        return routed

    assert asyncio.run(attempt()).replica_id == "replica-1"


def test_an_accepted_attempt_may_outlast_the_wait_for_a_replica() -> None:
    async def attempt() -> Routed:
        routed = Routed(2.0, lambda: 60.0)
        async with routed:  # raises TimeoutError if the wait's 2 s still applied
            await asyncio.to_thread(accepted, routed.attempt_id, "replica-2")
            await asyncio.sleep(3.0)
        return routed

    assert asyncio.run(attempt()).replica_id == "replica-2"


def test_a_report_after_the_attempt_ended_changes_nothing() -> None:
    async def attempt() -> Routed:
        routed = Routed(60.0, lambda: 0.0)
        async with routed:
            pass
        accepted(routed.attempt_id, "late")
        accepted("never-sent", "other")
        await asyncio.sleep(0.05)  # a callback wrongly scheduled would run here
        return routed

    assert asyncio.run(attempt()).replica_id is None


def test_an_attempt_counts_as_in_flight_from_its_acceptance_to_its_end() -> None:
    async def attempts() -> list[dict[str, int]]:
        seen = []
        first, second = Routed(60.0, lambda: 60.0), Routed(60.0, lambda: 60.0)
        async with first:
            async with second:
                seen.append(in_flight())
                accepted(first.attempt_id, "replica-3")
                accepted(second.attempt_id, "replica-3")
                seen.append(in_flight())
            seen.append(in_flight())
        seen.append(in_flight())
        return seen

    assert asyncio.run(attempts()) == [{}, {"replica-3": 2}, {"replica-3": 1}, {}]


def test_an_attempt_that_ends_by_timeout_or_failure_is_no_longer_in_flight() -> None:
    async def attempt() -> None:
        async with Routed(60.0, lambda: 0.05) as routed:
            accepted(routed.attempt_id, "replica-4")
            await asyncio.sleep(60)

    with pytest.raises(TimeoutError):
        asyncio.run(attempt())
    assert in_flight() == {}


def test_an_attempt_counts_where_it_was_first_chosen_before_any_replica_accepts_it() -> None:
    # Two batches routed within one acceptance's round trip: the second must see the first.
    async def attempts() -> list[dict[str, int]]:
        seen = []
        first, second = Routed(60.0, lambda: 60.0), Routed(60.0, lambda: 60.0)
        async with first, second:
            first_choice(first.attempt_id, "replica-5")
            seen.append(in_flight())
            first_choice(second.attempt_id, "replica-6")
            accepted(first.attempt_id, "replica-5")
            accepted(second.attempt_id, "replica-7")  # replica-6 was full after all
            seen.append(in_flight())
        seen.append(in_flight())
        return seen

    assert asyncio.run(attempts()) == [
        {"replica-5": 1}, {"replica-5": 1, "replica-7": 1}, {}]


def test_a_first_choice_after_the_attempt_ended_counts_nowhere() -> None:
    async def attempt() -> None:
        async with Routed(60.0, lambda: 60.0) as routed:
            pass
        first_choice(routed.attempt_id, "replica-8")

    asyncio.run(attempt())
    assert in_flight() == {}


def test_a_replica_death_ends_the_attempts_it_accepted_and_no_others() -> None:
    async def attempts() -> tuple[Routed, Routed, Routed]:
        on_dead, elsewhere, late = (Routed(60.0, lambda: 60.0) for _ in range(3))
        async with elsewhere:
            accepted(elsewhere.attempt_id, "replica-alive")
            with pytest.raises(TimeoutError):
                async with on_dead:
                    accepted(on_dead.attempt_id, "replica-dying")
                    await asyncio.sleep(0.05)
                    await asyncio.to_thread(replica_died, "replica-dying")
                    await asyncio.sleep(60)
            # Accepted after the death was reported (the report raced the acceptance).
            with pytest.raises(TimeoutError):
                async with late:
                    accepted(late.attempt_id, "replica-dying")
                    await asyncio.sleep(60)
            await asyncio.sleep(0.05)
        return on_dead, elsewhere, late

    on_dead, elsewhere, late = asyncio.run(attempts())
    assert (on_dead.died, late.died, elsewhere.died) == (True, True, False)
    assert "replica-dying" in dead() and "replica-alive" not in dead()
    assert in_flight() == {}
