"""The Ray settings of a cluster trtserve starts, beside its HTTP ingress (``ingress.py``).

Ray sends a task's argument inside the task's own message up to
``max_direct_call_object_size`` (100 KiB by default), and above it through the node's object
store: a put, a seal and a pin at the caller, a fetch at the callee, reference counting
between them, all of it through the one raylet of the node. A handle call with one
``resnet50`` image (588 KiB) took that path. Inline up to 1 MiB, it does not: handle calls
with a model that costs almost nothing served 37% more on the 2-core machine
(docs/benchmarks.md, "Handle calls' inputs inline"). Above about 1 MiB the copies of an
inline argument cost more than the store does (same section), so larger ones still go
through it.

The calling process decides, from the cluster's config: set where the head starts
(``ray.init(_system_config=...)``, ``ray start --system-config``), every process that joins
the cluster reads it from there. ``serve run`` starts its cluster without one; the README
sets ``RAY_max_direct_call_object_size`` in its environment instead, which reaches Serve's
processes but not a driver that joins later.
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Final

INLINE_ARGUMENT_BYTES: Final = 1 << 20
SYSTEM_CONFIG: Final = MappingProxyType({"max_direct_call_object_size": INLINE_ARGUMENT_BYTES})


def system_config() -> dict[str, int]:
    """A fresh copy for ``ray.init``, which adds its own settings to the dict it is given."""
    return dict(SYSTEM_CONFIG)


def join_or_start(**init: Any) -> None:
    """``ray.init(**init)``: it joins the cluster RAY_ADDRESS names (a Ray Client address
    too), or the last one ``ray start`` started on this machine. Where it would start one of
    its own instead, that one gets trtserve's config, so that a tool's own cluster
    (``trtserve chaos``, ``trtserve bench serve``) sends arguments the way a served one
    does."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    client = "://" in os.environ.get("RAY_ADDRESS", "")  # ray.init() checks this first
    if not client and canonicalize_bootstrap_address(None) is None:  # Ray's own rule
        ray.init(address="local", _system_config=system_config(), **init)
    else:
        ray.init(**init)
