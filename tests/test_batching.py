"""Dynamic batching on a real local Ray cluster with real ONNX Runtime replicas: batches
form under load and answer each request with its own rows; a request out of time in the
queue never runs; no batch waits for a context while another replica idles; a poison
request fails alone; a replica killed under a batch loses nothing; a malformed request fails
alone; a request whose caller went away is neither run on nor sent on."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployments import lifeline
from engines import models
from engines.errors import DeadlineExceeded, ExecutionError, InvalidInput

from .serving import (
    FaultAt,
    deploy,
    describe_all,
    load,
    load_until,
    local_serve,
    replica_died_under,
    replica_ids,
    requests_seen,
    varied_inputs,
    wait_until,
)

pytestmark = pytest.mark.integration

# Distinct random rows of tiny differ by far more than this in probs; float32 batched and
# unbatched runs agree to about 1e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve() as p:
        yield p


def _call(router: Any, inputs: dict[str, np.ndarray], timeout: float = 5) -> Any:
    try:
        return router.infer_with_trail.remote("tiny", inputs, timeout=timeout).result()
    except BaseException as exc:  # asserted on by the caller
        return exc


def _assert_own_rows(inputs: dict[str, np.ndarray], result: Any) -> list[dict[str, Any]]:
    assert not isinstance(result, BaseException), repr(result)
    outputs, trail = result
    want = models.tiny_reference(inputs["x"])
    np.testing.assert_allclose(outputs["probs"], want["probs"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(outputs["logits"], want["logits"], rtol=0, atol=10 * TOLERANCE)
    return trail


def test_batches_form_under_load_and_each_request_gets_its_own_rows(
    port: int, cache_dir: Path
) -> None:
    router = deploy(cache_dir, replicas=2, pool_size=1)
    rows = [1 + i % 3 for i in range(200)]
    inputs = [varied_inputs(i, rows=r) for i, r in enumerate(rows)]
    bad = {"x": inputs[7]["x"].astype(np.float64)}
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_call, router, x) for x in inputs]
        refused = pool.submit(_call, router, bad)
        results = [f.result() for f in futures]
    assert isinstance(refused.result(), InvalidInput)  # alone: the burst around it is served
    batches = []
    for x, result in zip(inputs, results, strict=True):
        trail = _assert_own_rows(x, result)
        assert trail[-1]["batch"] >= x["x"].shape[0]
        assert trail[-1]["router_ms"] >= trail[-1]["ms"]
        batches.append(trail[-1]["batch"])
    assert max(batches) > 3, batches  # rows of several requests ran as one


def test_a_request_out_of_time_in_the_batch_queue_never_runs(port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir, replicas=1, pool_size=1,
                    faults=[{"kind": "hang", "seconds": 3}])
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_call, router, varied_inputs(1), 5)
        assert wait_until(lambda: describe_all()[0]["faults_pending"] == [], 5)
        seen = requests_seen()
        late = _call(router, varied_inputs(2), 0.5)
        assert isinstance(late, DeadlineExceeded), repr(late)
        _assert_own_rows(varied_inputs(1), first.result())
    assert requests_seen() == seen  # the late request never reached a replica


def test_a_router_keeps_only_its_batches_in_flight_and_the_rest_gather(
    port: int, cache_dir: Path
) -> None:
    # Four contexts, but one batch in flight for this Router: behind a hanging batch the
    # next requests gather into one batch instead of taking the idle contexts one by one.
    # The hang lasts long enough for all seven to arrive behind it on a busy machine.
    router = deploy(cache_dir, replicas=1, pool_size=4, router_batches_in_flight=1,
                    faults=[{"kind": "hang", "seconds": 3}])
    inputs = [varied_inputs(i, rows=1) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        holding = pool.submit(_call, router, inputs[0])
        assert wait_until(lambda: describe_all()[0]["faults_pending"] == [], 5)
        results = [f.result() for f in [pool.submit(_call, router, x) for x in inputs[1:]]]
        _assert_own_rows(inputs[0], holding.result())
    batches = [_assert_own_rows(x, r)[-1]["batch"]
               for x, r in zip(inputs[1:], results, strict=True)]
    assert batches == [7] * 7, batches


def test_a_batch_never_waits_for_a_context_while_the_other_replica_idles(
    port: int, cache_dir: Path
) -> None:
    # Two replicas of one context each, every execution hanging: the Router's two batches in
    # flight leave together and answer together, so the next two are routed within one
    # acceptance's round trip. Each must take the replica the other did not
    # (routed.first_choice); one that followed the other would wait a whole hang for its
    # context. The wait is a few milliseconds or a whole hang, nothing between: half a hang
    # tells which, on any machine.
    hang_s = 0.6
    router = deploy(cache_dir, pool_size=1, router_replicas=1,
                    faults=[{"kind": "hang", "seconds": hang_s, "count": 1000}])

    def calls(caller: int) -> list[Any]:
        inputs = [varied_inputs(100 * caller + i, rows=1) for i in range(12)]
        return [(x, _call(router, x, timeout=30)) for x in inputs]

    with ThreadPoolExecutor(8) as pool:
        per_caller = list(pool.map(calls, range(8)))
    answered = [_assert_own_rows(x, r)[-1] for results in per_caller for x, r in results]
    waited = sorted(a["queue_ms"] for a in answered)
    assert waited[-1] < hang_s * 1000 / 2, waited[-5:]
    assert max(a["batch"] for a in answered) > 1  # the batches did form


def test_a_poison_request_in_a_batch_fails_alone(port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir, replicas=1, pool_size=1,
                    faults=[{"kind": "hang", "seconds": 3},
                            {"kind": "execution", "marker": 777.0, "count": 1_000_000}])
    inputs = [varied_inputs(i) for i in range(16)]
    inputs[9]["x"][0, 0] = 777.0
    with ThreadPoolExecutor(17) as pool:
        holding = pool.submit(_call, router, varied_inputs(100))
        assert wait_until(lambda: describe_all()[0]["faults_pending"][0]["kind"] == "execution",
                          5)
        futures = [pool.submit(_call, router, x) for x in inputs]  # gather behind the hang
        results = [f.result() for f in futures]
        holding.result()
    poison = results[9]
    assert isinstance(poison, ExecutionError), repr(poison)
    assert poison.http_status == 500
    assert any(a.get("batch", 0) > 2 for a in poison.trail), poison.trail  # it was batched
    for i, (x, result) in enumerate(zip(inputs, results, strict=True)):
        if i != 9:
            _assert_own_rows(x, result)


def test_a_replica_killed_under_a_batch_loses_no_request(port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir, replicas=2, pool_size=1)
    victim = sorted(replica_ids())[0]
    fault = FaultAt(40, {"kind": "crash"}, victim)
    results = load_until(router, load(router, 300, 24, on_progress=fault),
                         replica_died_under, 24)
    assert fault.injected
    for x, result in results:
        _assert_own_rows(x, result)
    assert replica_died_under(results), "no batch was in flight on the replica that died"
    # The Router acted on the replica's lifeline (lifeline.py), before Ray reported the death;
    # without Linux's /dev/shm and glibc there is none, and Ray's report is the only one.
    messages = [a.get("message", "") for _, r in results if not isinstance(r, BaseException)
                for a in r[1] if a["outcome"] == "ReplicaFailure"]
    assert any("lifeline" in m for m in messages) == lifeline.available(), messages


def _pool(replica: dict[str, Any]) -> dict[str, Any]:
    return replica["models"]["tiny"]["pool"]


def _batch_of_four(router: Any, marked: int | None = None) -> tuple[list[Any], list[Any]]:
    """Four one-row requests that leave the queue as one batch (preferred size 4); the
    ``marked`` one carries the hang fault's marker."""
    inputs = [varied_inputs(i, rows=1) for i in range(4)]
    if marked is not None:
        inputs[marked]["x"][0, 0] = 777.0
    return inputs, [router.infer_with_trail.remote("tiny", x, timeout=5) for x in inputs]


def test_a_batch_whose_callers_all_went_away_is_stopped_in_the_replica(
    port: int, cache_dir: Path
) -> None:
    router = deploy(cache_dir, replicas=1, pool_size=1, max_queue_delay_us=1_000_000,
                    preferred_batch_sizes=[4], faults=[{"kind": "hang", "seconds": 4}],
                    retry={"attempt_timeout_s": 5, "deadline_s": 5})
    _, responses = _batch_of_four(router)
    assert wait_until(lambda: describe_all()[0]["faults_pending"] == [], 5)
    for response in responses:
        response.cancel()
    # Stopped: the hang was cancelled in the replica (its context abandoned and replaced)
    # instead of running to its end for nobody.
    assert wait_until(lambda: _pool(describe_all()[0])["abandoned"] == 1, 10), describe_all()
    assert requests_seen() == 1
    _assert_own_rows(varied_inputs(10), _call(router, varied_inputs(10)))


def test_callers_gone_from_a_failed_batch_are_not_sent_on(port: int, cache_dir: Path) -> None:
    router = deploy(cache_dir, replicas=2, pool_size=1, max_queue_delay_us=1_000_000,
                    preferred_batch_sizes=[4],
                    faults=[{"kind": "hang", "seconds": 30, "marker": 777.0}],
                    retry={"attempt_timeout_s": 3, "deadline_s": 5})
    inputs, responses = _batch_of_four(router, marked=0)
    assert wait_until(lambda: any(r["faults_pending"] == [] for r in describe_all()), 5)
    responses[0].cancel()
    responses[1].cancel()
    # The batch's attempt times out; the two requests still wanted fail over, alone.
    for x, response in zip(inputs[2:], responses[2:], strict=True):
        trail = _assert_own_rows(x, response.result(timeout_s=10))
        assert trail[0]["batch"] == 4 and "timed out" in trail[0]["message"], trail
        assert trail[-1]["outcome"] == "ok" and trail[-1]["replica"] != trail[0]["replica"]
    # The two whose callers went away never ran again: the batch and two lone requests in
    # all, and the other replica's marked hang never fired.
    assert not wait_until(lambda: requests_seen() > 3, 3)
    assert requests_seen() == 3
    assert any(r["faults_pending"] for r in describe_all())
