"""What an operator sees, on a real local Ray cluster: the metrics scraped over HTTP from the
node's Prometheus endpoint after traffic with a context fault, a device fault, requests out
of time and a cancelled one; the Grafana dashboard against the scraped names; the Router's
JSON log lines; and ``serve status`` from another process, with Ray's auth token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import requests
from ray import serve

from deployments.app import APP_NAME
from deployments.local_cluster import free_port
from deployments.metrics import RELABEL_REGEX, SPECS
from engines.errors import DeadlineExceeded

from .serving import (
    deploy,
    describe_all,
    inject,
    local_serve,
    one_at_a_time,
    varied_inputs,
    wait_until,
)

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parent.parent / "docs"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
REQUESTS = 30  # at least; more until one has met the device fault (see ``traffic``)
HTTP_EVERY = 6  # every sixth request goes over HTTP (decode/encode times, the protocol's id)


@dataclass(frozen=True)
class Sample:
    name: str  # as a user scrapes it with the documented relabelling
    labels: dict[str, str]
    value: float


def scrape() -> list[Sample]:
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = []
    for line in body.splitlines():
        match = SAMPLE.match(line)
        if line.startswith("#") or match is None:
            continue
        name, labels, value = match.groups()
        relabelled = re.fullmatch(RELABEL_REGEX, name)
        if relabelled is not None:
            samples.append(Sample(relabelled.group(1), dict(LABEL.findall(labels or "")),
                                  float(value)))
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _bucket(samples: list[Sample], histogram: str, le: float) -> float:
    return sum(x.value for x in samples
               if x.name == f"{histogram}_bucket" and float(x.labels["le"]) == le)


@dataclass
class Traffic:
    trails: list[list[dict[str, Any]]]  # of the requests that succeeded, one per request sent
    http_ids: list[str]
    samples: list[Sample]
    log_lines: list[dict[str, Any]]
    armed: dict[str, str]  # replica id -> the fault armed there


def _http_infer(port: int, inputs: dict[str, np.ndarray], request_id: str
                ) -> list[dict[str, Any]]:
    x = inputs["x"]
    body = {"id": request_id, "inputs": [{"name": "x", "shape": list(x.shape),
                                          "datatype": "FP32", "data": x.ravel().tolist()}]}
    reply = requests.post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", json=body,
                          timeout=30)
    assert reply.status_code == 200, reply.text
    trail: list[dict[str, Any]] = json.loads(reply.headers["trtserve-attempts"])
    return trail


def _cancel_one(router: Any) -> None:
    """A request that hangs in a replica, cancelled by its caller."""

    def healthy() -> set[str]:
        return {r["replica_id"] for r in describe_all() if r["healthy"]}

    # The replica poisoned by the device fault is replaced first: it is about to exit (a call
    # aimed at it would wait for nothing), and its replacement, unarmed, would not hang.
    assert wait_until(lambda: len(healthy()) == 2 and len(describe_all()) == 2, 60)
    for replica in healthy():
        inject({"kind": "hang", "seconds": 30, "marker": 777.0}, target=replica)
    inputs = varied_inputs(999)
    inputs["x"][0, 0] = 777.0
    response = router.infer_with_trail.remote("tiny", inputs, timeout=10)
    assert wait_until(lambda: any(r["faults_pending"] == [] for r in describe_all()), 10)
    response.cancel()


def _router_log_lines() -> list[dict[str, Any]]:
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    lines = []
    for path in logs.glob(f"replica_{APP_NAME}_Router_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            start = line.find('{"event": "trtserve_request"')
            if start >= 0:
                lines.append(json.loads(line[start:]))
    return lines


@pytest.fixture(scope="module")
def dashboard_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def port(dashboard_port: int) -> Iterator[int]:
    with local_serve(dashboard_port=dashboard_port) as p:
        yield p


@pytest.fixture(scope="module")
def traffic(port: int, cache_dir: Path) -> Traffic:
    # batch_size 1: every execution holds one request, so counts follow from the trails.
    router = deploy(cache_dir, models=[{"model": "tiny", "batch_size": 1}], replicas=2,
                    # The hung request below must be cancelled by its caller, never time out.
                    retry={"deadline_s": 10, "attempt_timeout_s": 10})
    broken, flaky = sorted({r["replica_id"] for r in describe_all()})
    inject({"kind": "device"}, target=broken)
    inject({"kind": "context", "count": 2}, target=flaky)
    http_ids: list[str] = []

    def one(i: int) -> list[dict[str, Any]]:
        inputs = varied_inputs(i)
        if i % HTTP_EVERY == 0:
            http_ids.append(f"client-{i}")
            return _http_infer(port, inputs, http_ids[-1])
        _, trail = router.infer_with_trail.remote("tiny", inputs, timeout=10).result()
        return trail

    def met_device_fault(trail: list[dict[str, Any]]) -> bool:
        return any(e["outcome"] == "DeviceFailure" for e in trail)

    trails = one_at_a_time(one, met_device_fault, least=REQUESTS)
    for _ in range(2):
        with pytest.raises(DeadlineExceeded):
            router.infer_with_trail.remote("tiny", varied_inputs(0), timeout=1e-6).result()
    _cancel_one(router)

    swaps = sum(e["outcome"] == "ContextFailure" for t in trails for e in t)
    samples: list[Sample] = []

    def exported() -> bool:
        nonlocal samples
        samples = scrape()
        return (total(samples, "trtserve_requests", outcome="cancelled") == 1
                and total(samples, "nv_inference_request_success") == len(trails)
                and total(samples, "trtserve_context_swaps") == swaps
                and total(samples, "trtserve_replica_gpu") >= 2)

    assert wait_until(exported, 90, every_s=2), sorted({s.name for s in samples})
    lines: list[dict[str, Any]] = []

    def logged() -> bool:
        nonlocal lines
        lines = _router_log_lines()
        return len(lines) >= sum(len(t) > 1 for t in trails) + 3

    assert wait_until(logged, 30), lines
    return Traffic(trails, http_ids, samples, lines, {broken: "device", flaky: "context"})


def _replica_runs(trail: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The trail cut into attempts: consecutive entries from one replica."""
    runs: list[list[dict[str, Any]]] = []
    for entry in trail:
        if runs and runs[-1][-1].get("replica") == entry.get("replica"):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def test_metrics_count_what_the_traffic_did(traffic: Traffic) -> None:
    s, trails = traffic.samples, traffic.trails
    entries = [e for t in trails for e in t]
    outcomes = Counter(e["outcome"] for e in entries)
    sent = len(trails)
    where = Counter(traffic.armed.get(t[0].get("replica"), t[0].get("replica")) for t in trails)
    assert outcomes["ContextFailure"] == 2 and outcomes["DeviceFailure"] >= 1, (outcomes, where)
    assert outcomes["ok"] == sent >= REQUESTS

    # Requests, by Triton's names and ours.
    assert total(s, "nv_inference_request_success", model="tiny", version="1") == sent
    assert total(s, "nv_inference_request_failure", reason="DEADLINE") == 2
    assert total(s, "nv_inference_request_failure", reason="CANCELED") == 1
    assert total(s, "nv_inference_request_failure") == 3
    assert total(s, "trtserve_requests", outcome="ok") == sent
    assert total(s, "trtserve_requests", outcome="DeadlineExceeded") == 2
    assert total(s, "trtserve_requests", outcome="cancelled") == 1
    assert total(s, "nv_inference_pending_request_count") == 0

    # Attempts: each trail entry counted exactly once, by outcome.
    assert total(s, "trtserve_attempts") == len(entries)
    for outcome, n in outcomes.items():
        assert total(s, "trtserve_attempts", outcome=outcome) == n, outcome

    # The fault machinery.
    runs = [_replica_runs(t) for t in trails]
    local = sum(len(r) - 1 for rs in runs for r in rs)
    assert total(s, "trtserve_local_retries") == local >= 2
    assert total(s, "trtserve_failovers") == sum(len(rs) - 1 for rs in runs) >= 1
    assert total(s, "trtserve_replicas_poisoned") == 1
    assert total(s, "trtserve_ejections") == 1
    assert total(s, "trtserve_context_swaps") == 2
    for zero in ("trtserve_retry_budget_refusals", "trtserve_load_shed",
                 "trtserve_query_of_death_refusals"):
        assert zero in {x.name for x in s} and total(s, zero) == 0, zero

    # Executions, rows and times.
    assert total(s, "nv_inference_exec_count") == sent
    assert total(s, "nv_inference_count") == 2 * sent
    # Every execution held 2 rows (Ray's histogram _sum is approximate: buckets, not sums).
    assert total(s, "trtserve_batch_size_count") == sent
    assert _bucket(s, "trtserve_batch_size", 2) - _bucket(s, "trtserve_batch_size", 1) == sent
    assert total(s, "trtserve_request_duration_ms_count") == sent
    for name in ("request", "queue", "compute_infer", "compute_input", "compute_output"):
        assert total(s, f"nv_inference_{name}_duration_us") > 0, name

    # What only the replicas know.
    contexts = {r["models"]["tiny"]["concurrency"] + 1 for r in describe_all()}  # + 1 spare
    assert {max(x.value for x in s if x.name == "trtserve_live_contexts")} == contexts
    assert total(s, "trtserve_replica_gpu", gpu_uuid="none") >= 2


def test_every_metric_is_scraped_and_documented(traffic: Traffic) -> None:
    scraped = {x.name for x in traffic.samples}
    doc = (DOCS / "metrics.md").read_text()
    assert RELABEL_REGEX in doc
    for spec in SPECS:
        base = f"{spec.name}_count" if spec.kind == "histogram" else spec.name
        assert base in scraped, spec.name
        assert f"`{spec.name}`" in doc, spec.name


def test_the_dashboard_only_uses_scraped_metrics(traffic: Traffic) -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    scraped = {x.name for x in traffic.samples}
    for expr in exprs:
        names = set(re.findall(r"\b((?:nv_inference|trtserve)_[a-z0-9_]+)", expr))
        assert names and names <= scraped, (expr, names - scraped)


def test_requests_that_retried_or_failed_are_logged_as_json(traffic: Traffic) -> None:
    retried = [t for t in traffic.trails if len(t) > 1]
    lines = traffic.log_lines
    ok = [line for line in lines if line["outcome"] == "ok"]
    # Exactly the retried successes: never one for a first-try success.
    assert sorted(len(line["attempts"]) for line in ok) == sorted(len(t) for t in retried)
    assert Counter(line["outcome"] for line in lines if line["outcome"] != "ok") == {
        "DeadlineExceeded": 2, "cancelled": 1}
    assert all(line["model"] == "tiny" and line["request_id"] and line["total_ms"] > 0
               for line in lines)
    http_retried = {f"client-{i}" for i, t in enumerate(traffic.trails)
                    if len(t) > 1 and i % HTTP_EVERY == 0}
    assert http_retried <= {line["request_id"] for line in ok}


def _serve_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``serve`` CLI as from a fresh shell: none of this process's Ray variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([str(Path(sys.executable).parent / "serve"), *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_serve_status_and_shutdown_from_another_shell_with_the_auth_token(
    traffic: Traffic, port: int, dashboard_port: int, tmp_path: Path
) -> None:
    address = f"http://127.0.0.1:{dashboard_port}"
    token = ray._raylet.AuthenticationTokenLoader.instance().get_raw_token(
        ignore_auth_mode=True)
    assert token
    # A machine with no token file: HOME has none.
    home = str(tmp_path)
    refused = _serve_cli("status", "--address", address, HOME=home)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(token)
    for env in ({"RAY_AUTH_TOKEN": token}, {"RAY_AUTH_TOKEN_PATH": str(token_file)}):
        status = _serve_cli("status", "--address", address, HOME=home, RAY_AUTH_MODE="token",
                            **env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"{APP_NAME}:" in status.stdout and "RUNNING" in status.stdout, status.stdout
    assert APP_NAME in serve.status().applications
    shutdown = _serve_cli("shutdown", "--yes", "--address", address, HOME=home,
                          RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
    assert wait_until(lambda: not _serving(port), 60)


def _serving(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=5).ok
    except requests.ConnectionError:
        return False
