"""A replica's lifeline: its death seen by other processes on the node, without Ray."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from deployments import lifeline
from deployments.lifeline import Watcher, path_for, sweep_dead

pytestmark = pytest.mark.skipif(
    not lifeline.available(), reason="lifelines need Linux, glibc and /dev/shm")

_HOLDER = """
import sys
from deployments.lifeline import Lifeline
line = Lifeline(sys.argv[1])
print("held" if line.held.is_set() else "not held", flush=True)
if sys.stdin.readline().strip() == "close":
    line.close()
"""


@pytest.fixture
def replica_id() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    path_for(name).unlink(missing_ok=True)


def _holder(replica_id: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, replica_id], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def _deaths() -> tuple[Watcher, queue.Queue[str]]:
    seen: queue.Queue[str] = queue.Queue()
    return Watcher(seen.put), seen


def test_a_killed_holder_is_seen_dead_by_every_watcher(replica_id: str) -> None:
    child = _holder(replica_id)
    watchers = [_deaths() for _ in range(3)]  # three Routers on the node
    for watcher, _ in watchers:
        watcher.watch(frozenset([replica_id, "a-replica-on-another-node"]))
    for _, seen in watchers:
        with pytest.raises(queue.Empty):
            seen.get(timeout=0.3)  # alive: nobody is told otherwise
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    for _, seen in watchers:
        assert seen.get(timeout=10) == replica_id
        assert seen.empty()
    assert not path_for(replica_id).exists()


def test_a_replica_stopping_on_purpose_removes_its_file_and_is_still_seen_to_end(
    replica_id: str,
) -> None:
    child = _holder(replica_id)
    watcher, seen = _deaths()
    watcher.watch(frozenset([replica_id]))
    assert child.stdin is not None
    child.stdin.write("close\n")
    child.stdin.flush()
    assert child.wait(10) == 0
    assert seen.get(timeout=10) == replica_id
    assert not path_for(replica_id).exists()



def test_the_file_of_a_replica_that_died_unheard_goes_when_a_replica_starts() -> None:
    alive, unheard = (f"test-{uuid.uuid4().hex[:12]}" for _ in range(2))
    try:
        living = _holder(alive)
        dying = _holder(unheard)
        dying.kill()  # no watcher: nobody removes its file
        dying.wait(10)
        assert path_for(unheard).exists()
        assert sweep_dead() >= 1  # what each Lifeline does as its replica starts
        assert not path_for(unheard).exists()
        assert path_for(alive).exists()
        watcher, seen = _deaths()  # the survivor's lifeline still works
        watcher.watch(frozenset([alive]))
        living.kill()
        living.wait(10)
        assert seen.get(timeout=10) == alive
    finally:
        for name in (alive, unheard):
            path_for(name).unlink(missing_ok=True)
