"""Which HTTP ingress Serve runs: its bundled HAProxy (the default) or its Python proxy.

Serve reads the choice from the environment of the processes that start Ray, so it must be in
place while ``ray.init`` starts a cluster here; a cluster that is already running keeps the one
it was started with. Why HAProxy: it forwards to the Router replicas' own HTTP servers, where
the Python proxy is one more Python process per node in every request's path (measured in
docs/benchmarks.md, "HAProxy as the default ingress").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

Ingress = Literal["haproxy", "proxy"]
INGRESSES: tuple[Ingress, ...] = get_args(Ingress)
DEFAULT_INGRESS: Ingress = "haproxy"
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
PRIVATE_DRAIN_S = 1.0


@contextmanager
def ingress_env(ingress: Ingress, *, private: bool = False) -> Iterator[None]:
    """Start Ray inside this block for a cluster with ``ingress``. The environment is
    restored after it, so a later cluster of this process chooses again.

    Behind HAProxy a Router replica that is shut down (a redeploy, ``serve.delete``) stays
    reachable for Serve's 30 s so that outside load balancers can stop sending to it.
    ``private``: a cluster that only its own HAProxy fronts (a benchmark's, a test's), which
    reloads at once and retries a refused connection elsewhere, so 1 s is enough there. Its
    ports stay Serve's fixed ones (README, "HTTP ingress"): free ones picked here were taken
    by Ray's own processes before HAProxy bound them, and HAProxy failed to start.
    """
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress '{ingress}'; choose one of {', '.join(INGRESSES)}")
    chosen = {HA_PROXY_ENV: "1" if ingress == "haproxy" else "0"}
    if private:
        chosen[DRAIN_ENV] = str(PRIVATE_DRAIN_S)
    saved = {name: os.environ.get(name) for name in chosen}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
