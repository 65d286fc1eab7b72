"""``trtserve serve``: starts Ray when none runs, serves until a signal, leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.ingress import DRAIN_ENV, HA_PROXY_ENV
from deployments.local_cluster import free_port

pytestmark = pytest.mark.integration

JOIN = """
import numpy as np, ray
from ray import serve
ray.init(address="auto", logging_level="ERROR")
out = serve.get_app_handle("trtserve").infer.remote("tiny", {"x": np.ones((1, 16), np.float32)})
print("joined", out.result(timeout_s=60)["probs"].shape)
from ray.util.state import list_actors
alive = list_actors(filters=[("state", "=", "ALIVE")])
print("ingress", sorted(a.class_name for a in alive if "Proxy" in a.class_name))
from tests.serving import sent_through_object_store
print("an image through the object store:", sent_through_object_store(3 * 224 * 224 * 4))
"""

NO_CLUSTER = """
import ray
try:
    ray.init(address="auto", logging_level="ERROR")
except ConnectionError:
    print("no cluster")
"""


def _start(cache_dir: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    # Not what other tests chose for their own clusters: the ingress must be the command's.
    env = {k: v for k, v in os.environ.items() if k not in (HA_PROXY_ENV, DRAIN_ENV)}
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "--cache-dir", str(cache_dir), "serve",
         "--model", "tiny", "--replicas", "1", "--cpus-per-replica", "0", "--port", str(port),
         *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no '{marker}' within {timeout_s} s:\n{''.join(seen[-40:])}")


def _haproxy_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "bin/haproxy "], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_serve_runs_until_a_signal_and_leaves_nothing(how: str, cache_dir: Path) -> None:
    import ray

    assert not ray.is_initialized(), "another test left Ray running in this process"
    proc = _start(cache_dir, free_port())
    try:
        lines = _read_until(proc, "trtserve: ready at", 180)
        assert any("started a Ray cluster" in line for line in lines)
        joined = _python(JOIN)
        assert "joined (1, 8)" in joined
        # The default ingress is Serve's HAProxy (its manager actor, beside the Python proxy
        # that stays as its fallback).
        assert "HAProxyManager" in joined
        # A caller that joins reads the cluster's Ray settings (ray_config.py) from its head.
        assert "an image through the object store: False" in joined
        haproxy = _haproxy_pids()
        assert haproxy, "no haproxy process while the command serves"
        # A second command joins this cluster, whose ingress it cannot change: it says so.
        # It is stopped before it deploys anything.
        joiner = _start(cache_dir, free_port(), "--ingress", "proxy")
        try:
            _read_until(joiner, "--ingress proxy is ignored", 120)
        finally:
            os.killpg(joiner.pid, signal.SIGKILL)
            joiner.wait(30)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:  # a terminal's Ctrl-C reaches the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest[-3000:]
    assert "trtserve: shutting down" in rest
    assert "no cluster" in _python(NO_CLUSTER)
    left = set(haproxy) & set(_haproxy_pids())
    assert not left, f"haproxy left behind: {sorted(left)}"
