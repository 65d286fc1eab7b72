"""The engine replicas this process's request router knows, per deployment.

The request router (routing.py) publishes them at every update; the Router reads them to
answer at once when a request's exclusions cover every live replica. This lives apart from
routing.py because Serve pickles the request router's module by value: state kept there
would be a copy, not the process's own.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_live: dict[tuple[str, str], frozenset[str]] = {}


def publish(app: str, deployment: str, replica_ids: frozenset[str]) -> None:
    with _lock:
        _live[(app, deployment)] = replica_ids


def live_replicas(app: str, deployment: str) -> frozenset[str] | None:
    """The replica ids known for a deployment (None before its router's first update)."""
    with _lock:
        return _live.get((app, deployment))
