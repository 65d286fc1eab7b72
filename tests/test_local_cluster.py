"""The private cluster's start: the ingress is in the environment while Ray starts and gone
after, trtserve's Ray settings reach its processes; a start-up timeout is tried once more, any
other failure is not. A tool that joins a cluster or starts its own (``join_or_start``) gives
the one it starts the same settings."""

from __future__ import annotations

import copy
import multiprocessing
import os
from typing import Any

import pytest

from deployments.ingress import DRAIN_ENV, HA_PROXY_ENV
from deployments.local_cluster import start_private_ray
from deployments.ray_config import INLINE_ARGUMENT_BYTES, SYSTEM_CONFIG, join_or_start
from tests.serving import local_serve, sent_through_object_store

# Ray's own words for the two start-up timeouts seen on the 2-core machine.
RAYLET_TIMEOUT = "The current node timed out during startup. This could happen because ..."
GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"


class Starts:
    """Stands in for ``ray.init`` only to count starts and see the environment of each (and,
    as Ray does, adds its own settings to the system config it is given); the real start is
    what every integration test runs."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.seen: list[dict[str, Any]] = []

    def __call__(self, **init: Any) -> None:
        self.seen.append({"init": copy.deepcopy(init), "haproxy": os.environ.get(HA_PROXY_ENV),
                          "drain": os.environ.get(DRAIN_ENV)})
        init["_system_config"]["automatic_object_spilling_enabled"] = True
        if self.failures:
            raise RuntimeError(self.failures.pop(0))


@pytest.mark.parametrize("timeout", [RAYLET_TIMEOUT, GCS_TIMEOUT])
def test_a_start_up_timeout_is_tried_once_more_in_the_ingress_environment(
    timeout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HA_PROXY_ENV, raising=False)
    starts = Starts(timeout)
    start_private_ray("haproxy", starts, num_cpus=4)
    assert [s["haproxy"] for s in starts.seen] == ["1", "1"]
    assert [s["drain"] for s in starts.seen] == ["1.0", "1.0"]
    # Each start gets trtserve's settings alone, whatever Ray added to the one before.
    assert starts.seen[1]["init"] == {"address": "local", "_system_config": SYSTEM_CONFIG,
                                      "num_cpus": 4}
    assert HA_PROXY_ENV not in os.environ  # restored: a later cluster chooses again


def test_a_second_timeout_and_any_other_failure_are_raised() -> None:
    twice = Starts(GCS_TIMEOUT, GCS_TIMEOUT)
    with pytest.raises(RuntimeError, match="gcs_server_port"):
        start_private_ray("proxy", twice)
    assert len(twice.seen) == 2 and twice.seen[0]["haproxy"] == "0"
    other = Starts("address already in use")
    with pytest.raises(RuntimeError, match="already in use"):
        start_private_ray("haproxy", other)
    assert len(other.seen) == 1


@pytest.mark.integration
def test_one_image_travels_inside_the_call_and_a_larger_argument_through_the_store() -> None:
    import ray

    assert not ray.is_initialized(), "another test left Ray running in this process"
    with local_serve():
        assert not sent_through_object_store(3 * 224 * 224 * 4)  # one resnet50 image
        # The limit counts the pickled argument, a few hundred bytes more than its data.
        assert not sent_through_object_store(INLINE_ARGUMENT_BYTES - 1024)
        assert sent_through_object_store(INLINE_ARGUMENT_BYTES + 1024)


def _join_or_start(address: str | None, answer: Any) -> None:
    """In a process of its own: the cluster ``join_or_start`` reached, and whether one image
    went through its object store."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if address is not None:
        os.environ["RAY_ADDRESS"] = address
    join_or_start(include_dashboard=False)
    try:
        answer.put((ray.get_runtime_context().gcs_address,
                    sent_through_object_store(3 * 224 * 224 * 4)))
    finally:
        ray.shutdown()


def _in_a_process(address: str | None) -> tuple[str, bool]:
    spawn = multiprocessing.get_context("spawn")
    answer = spawn.Queue()
    child = spawn.Process(target=_join_or_start, args=(address, answer))
    child.start()
    try:
        return answer.get(timeout=120)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()


@pytest.mark.integration
def test_a_tool_starts_its_own_cluster_with_trtserves_settings_or_joins_the_one_named() -> None:
    import ray

    assert not ray.is_initialized(), "another test left Ray running in this process"
    # No cluster named: the tool's own (trtserve chaos was started so, with Ray's defaults).
    _, through_store = _in_a_process(None)
    assert not through_store
    with local_serve():
        ours = ray.get_runtime_context().gcs_address
        assert _in_a_process(ours) == (ours, False)


def test_a_ray_client_address_goes_to_ray_init_as_it_is(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import ray

    # Ray's address check refuses "ray://..."; ray.init() itself connects through Ray Client.
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "init", lambda **init: seen.append(init))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    join_or_start(include_dashboard=False)
    assert seen == [{"include_dashboard": False}]
