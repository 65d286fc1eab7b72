"""The retry path under the failures that used to stall it, on a real local Ray cluster with
real HTTP: a model failing everywhere, hung and queued attempts, a query of death, overload,
and a huge JSON body. Deadlines stay at 5 s or less, so a regression fails instead of hanging."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from engines import models
from engines.errors import DeadlineExceeded, PoisonInput, RetriesExhausted

from .serving import (
    deploy,
    describe_all,
    inject,
    load,
    local_serve,
    one_at_a_time,
    replica_ids,
    requests_seen,
    varied_inputs,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with local_serve() as p:
        yield p


@pytest.fixture(scope="module")
def other_model(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second model: tiny's file under another name."""
    path = tmp_path_factory.mktemp("models") / "other.onnx"
    path.write_bytes(models.resolve("tiny", cache_dir).path.read_bytes())
    return str(path)


def _call(router: Any, model: str, inputs: dict[str, np.ndarray], timeout: float) -> Any:
    try:
        return router.infer_with_trail.remote(model, inputs, timeout=timeout).result()
    except BaseException as exc:  # asserted on by the caller
        return exc


def _ok(result: Any, inputs: dict[str, np.ndarray]) -> bool:
    if isinstance(result, BaseException):
        return False
    want = models.tiny_reference(inputs["x"])["probs"]
    return bool(np.allclose(result[0]["probs"], want, rtol=1e-5, atol=1e-6))


def test_one_model_failing_everywhere_never_stalls_the_others(
    port: int, cache_dir: Path, other_model: str
) -> None:
    router = deploy(cache_dir, models=["tiny", other_model], replicas=2,
                    faults=[{"kind": "context", "count": 1_000_000, "model": "tiny"}])
    with ThreadPoolExecutor(32) as pool:
        failing = [pool.submit(_call, router, "tiny", varied_inputs(i), 5) for i in range(8)]
        during = [(varied_inputs(100 + i), i) for i in range(24)]
        healthy = [pool.submit(_call, router, "other", x, 5) for x, _ in during]
        for future in failing:
            result = future.result()
            assert isinstance(result, RetriesExhausted), repr(result)
            assert [a["outcome"] for a in result.trail] == ["ContextFailure"] * 6
        after = [(varied_inputs(200 + i), i) for i in range(24)]
        healthy += [pool.submit(_call, router, "other", x, 5) for x, _ in after]
        for (x, _), future in zip(during + after, healthy, strict=True):
            assert _ok(future.result(), x), repr(future.result())


def test_a_timed_out_attempt_is_cancelled_and_ejects_nobody(port: int, cache_dir: Path) -> None:
    # An ejection would outlast the calls that look for the slow replica below (SPREAD_S).
    router = deploy(cache_dir, replicas=2, pool_size=2,
                    retry={"attempt_timeout_s": 1, "deadline_s": 5, "eject_s": 120})
    slow, fast = sorted(replica_ids())
    inject({"kind": "hang", "seconds": 60}, target=slow)

    def call(i: int) -> Any:
        inputs = varied_inputs(i)
        result = _call(router, "tiny", inputs, 5)
        assert _ok(result, inputs), repr(result)
        return result

    def went_to_slow(result: Any) -> bool:
        return any(a["replica"] == slow for a in result[1])

    trail = one_at_a_time(call, went_to_slow)[-1][1]
    assert trail[0]["replica"] == slow, "no request went to the hung replica"
    assert trail[0]["outcome"] == "ReplicaFailure" and "timed out" in trail[0]["message"]
    assert trail[-1]["outcome"] == "ok" and trail[-1]["replica"] == fast

    def pool_of(replica: str) -> dict[str, Any]:
        return next(r for r in describe_all() if r["replica_id"] == replica)["models"]["tiny"]

    # Cancelled in the replica: the hang ended long before its 60 s, the context was closed
    # and its slot refilled.
    assert wait_until(lambda: pool_of(slow)["pool"]["abandoned"] == 1
                      and pool_of(slow)["pool"]["usable"] == 2
                      and pool_of(slow)["pool"]["live"] == 3, 10), pool_of(slow)
    # Not ejected: the slow replica keeps getting its share of new requests.
    before = next(r for r in describe_all() if r["replica_id"] == slow)["requests_seen"]
    one_at_a_time(lambda i: call(1000 + i), went_to_slow)
    after = next(r for r in describe_all() if r["replica_id"] == slow)["requests_seen"]
    assert after > before


def test_a_request_out_of_time_in_the_replica_queue_never_runs_and_models_do_not_share_threads(
    port: int, cache_dir: Path, other_model: str
) -> None:
    router = deploy(cache_dir, models=["tiny", other_model], replicas=1, pool_size=1,
                    faults=[{"kind": "hang", "seconds": 3, "model": "tiny"}],
                    retry={"attempt_timeout_s": 5, "deadline_s": 5})
    with ThreadPoolExecutor(4) as pool:
        hung = pool.submit(_call, router, "tiny", varied_inputs(1), 5)
        assert wait_until(lambda: describe_all()[0]["faults_pending"] == [], 5)
        seen = requests_seen()
        queued = pool.submit(_call, router, "tiny", varied_inputs(2), 1)
        other_inputs = varied_inputs(3)
        other = pool.submit(_call, router, "other", other_inputs, 2)
        late = queued.result()
        assert isinstance(late, DeadlineExceeded), repr(late)
        assert _ok(other.result(), other_inputs), repr(other.result())
        assert requests_seen() == seen + 1  # the other model's; the late one never ran
        assert _ok(hung.result(), varied_inputs(1))


def test_a_query_of_death_costs_two_replicas_and_is_then_refused(
    port: int, cache_dir: Path
) -> None:
    router = deploy(cache_dir, replicas=3,
                    faults=[{"kind": "device", "marker": 1234.5}],
                    retry={"deadline_s": 5})
    first = replica_ids()
    deadly = varied_inputs(7)
    deadly["x"][1, 0] = 1234.5
    result = _call(router, "tiny", deadly, 5)
    assert isinstance(result, PoisonInput), repr(result)
    assert [a["outcome"] for a in result.trail] == ["DeviceFailure", "DeviceFailure"]
    broken = {a["replica"] for a in result.trail}
    assert len(broken) == 2
    # Everything else is served meanwhile, by the third replica and the replacements.
    for inputs, outcome in load(router, 60, 6):
        assert _ok(outcome, inputs), repr(outcome)
    survivor = first - broken
    assert wait_until(lambda: survivor <= replica_ids() and not broken & replica_ids(), 30)
    # Counted only once the broken replicas have exited: one leaving between the two counts
    # would take its request with it and read as a request un-seen.
    seen = requests_seen()
    again = _call(router, "tiny", {"x": deadly["x"].copy()}, 5)
    assert isinstance(again, PoisonInput) and "refused without running it" in again.message
    assert requests_seen() == seen


def test_overload_is_a_503_with_retry_after_and_loses_nothing_admitted(
    port: int, cache_dir: Path
) -> None:
    # Batching off: each request is its own execution, so sixteen callers overflow a replica
    # that admits two. With batching on, the sixteen could leave the Router in as few as two
    # batches, which the replica admits, and no 503 would come (CI saw that: all 200).
    deploy(cache_dir, models=[{"model": "tiny", "batch_size": 1}], replicas=1,
           engine_max_ongoing_requests=1,
           engine_max_queued_requests=1, faults=[{"kind": "hang", "seconds": 0.3, "count": 1000}],
           retry={"backpressure_wait_s": 0.2, "deadline_s": 5})
    url = f"http://127.0.0.1:{port}/v2/models/tiny/infer"

    def post(i: int) -> tuple[np.ndarray, requests.Response]:
        x = varied_inputs(i, rows=1)["x"]
        body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        return x, requests.post(url, json=body, timeout=30)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(post, range(16)))
    statuses = sorted({r.status_code for _, r in replies})
    assert statuses == [200, 503], statuses
    for x, reply in replies:
        if reply.status_code == 503:
            assert int(reply.headers.get("Retry-After", 0)) >= 1, reply.text
            assert "queue stayed full" in reply.json()["error"]
        else:
            probs = np.array(next(o for o in reply.json()["outputs"]
                                  if o["name"] == "probs")["data"], np.float32)
            np.testing.assert_allclose(probs, models.tiny_reference(x)["probs"].ravel(),
                                       rtol=1e-5, atol=1e-6)


def test_health_is_answered_while_a_huge_json_body_decodes(port: int, cache_dir: Path) -> None:
    limit = 48 * 1024 * 1024
    deploy(cache_dir, max_body_bytes=limit, max_json_body_bytes=limit)
    rows = (limit - 1024) // (16 * 2)
    body = (f'{{"inputs":[{{"name":"x","shape":[{rows},16],"datatype":"FP32","data":['
            + ",".join(["0"] * (rows * 16))
            + ']}],"outputs":[{"name":"nope"}]}').encode()
    assert len(body) <= limit
    order: list[str] = []
    lock = threading.Lock()
    sent = threading.Event()

    def big() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v2/models/tiny/infer", body=body,
                     headers={"Content-Type": "application/json"})
        sent.set()
        reply = conn.getresponse()
        answer = json.loads(reply.read())
        with lock:
            order.append(f"infer {reply.status} {answer['error'][:25]}")

    worker = threading.Thread(target=big)
    worker.start()
    assert sent.wait(60)
    # Give the Router time to take the body in and start decoding it (seconds, for this size).
    threading.Event().wait(1.0)
    reply = requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=60)
    with lock:
        order.append(f"live {reply.status_code}")
    worker.join(60)
    assert [entry[:15] for entry in order] == ["live 200", "infer 400 unkno"], order


def test_a_json_body_over_its_own_limit_is_a_413(port: int, cache_dir: Path) -> None:
    deploy(cache_dir, max_json_body_bytes=4096)
    url = f"http://127.0.0.1:{port}/v2/models/tiny/infer"
    body = {"inputs": [{"name": "x", "shape": [64, 16], "datatype": "FP32",
                        "data": [0.125] * (64 * 16)}]}
    reply = requests.post(url, json=body, timeout=30)
    assert reply.status_code == 413, reply.text
    assert "JSON request body" in reply.json()["error"]
    small = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
    assert requests.post(url, json=small, timeout=30).status_code == 200
