"""Which HTTP ingress Serve runs: its bundled HAProxy (the default) or its Python proxy.

Serve reads the choice from the environment of the processes that start Ray, so it must be
made before ``ray.init`` starts a cluster here; a cluster that is already running keeps the
one it was started with. Measured on an H200 (docs/benchmarks.md): HTTP with binary tensors
at 256 callers went from 146 req/s through the Python proxy to 1,222 through HAProxy, which
forwards to the Router replicas' own HTTP servers. With HAProxy those servers listen on every
interface (HAProxy on other nodes must reach them), as Triton's do by default.
"""

from __future__ import annotations

import os
from typing import Literal

Ingress = Literal["haproxy", "proxy"]
INGRESSES: tuple[Ingress, ...] = ("haproxy", "proxy")
DEFAULT_INGRESS: Ingress = "haproxy"
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
PRIVATE_DRAIN_S = 1.0


def choose_ingress(ingress: Ingress, *, private: bool = False) -> None:
    """Set the ingress of the Ray cluster this process is about to start.

    Behind HAProxy a Router replica that is shut down (a redeploy, ``serve.delete``) stays
    reachable for Serve's 30 s so that outside load balancers can stop sending to it.
    ``private``: a cluster that only its own HAProxy fronts (a benchmark's, a test's), which
    reloads at once and retries a refused connection elsewhere, so 1 s is enough there.
    """
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress '{ingress}'; choose one of {', '.join(INGRESSES)}")
    os.environ[HA_PROXY_ENV] = "1" if ingress == "haproxy" else "0"
    if private:
        os.environ[DRAIN_ENV] = str(PRIVATE_DRAIN_S)

