"""The engine replicas this process's request router knows, per deployment, and those it
knew once.

The request router (routing.py) publishes them at every update. The Router reads them to
answer at once when a request's exclusions cover every live replica; the request router, to
fail a call aimed at a replica that is gone. This lives apart from routing.py because Serve
pickles the request router's module by value: state kept there would be a copy, not the
process's own.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_live: dict[tuple[str, str], frozenset[str]] = {}
_ever: dict[tuple[str, str], set[str]] = {}


def publish(app: str, deployment: str, replica_ids: frozenset[str]) -> None:
    with _lock:
        _live[(app, deployment)] = replica_ids
        _ever.setdefault((app, deployment), set()).update(replica_ids)


def gone(app: str, deployment: str, replica_id: str) -> bool:
    """Listed once and no longer: Serve never reuses a replica id, so it will not be back. An
    id never listed may be a replica too new to be known yet."""
    with _lock:
        key = (app, deployment)
        return replica_id in _ever.get(key, ()) and replica_id not in _live.get(key, ())


def live_replicas(app: str, deployment: str) -> frozenset[str] | None:
    """The replica ids known for a deployment (None before its router's first update)."""
    with _lock:
        return _live.get((app, deployment))
