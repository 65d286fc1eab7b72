"""A private Ray cluster for this process (a benchmark's, a test's), never one already running
on the machine, started with the chosen HTTP ingress.

On the 2-core machine a new cluster's start has twice timed out with no error of its own (a
raylet that never came up, a GCS whose port file never appeared) while the machine was busy
with the cluster before it. Starting again is what a user would do, so it is tried once more;
a second failure is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from .ingress import Ingress, ingress_env

START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def start_private_ray(ingress: Ingress, start: Callable[..., Any] = ray.init,
                      **init: Any) -> None:
    """``start(address="local", **init)`` inside the ingress's environment, once more after a
    start-up timeout. ``start`` is Ray's ``ray.init``; the parameter lets the retry rule be
    checked without a slow machine."""
    for attempt in (1, 2):
        try:
            with ingress_env(ingress, private=True):
                start(address="local", **init)
            return
        except Exception as exc:
            if attempt == 2 or not any(text in str(exc) for text in START_TIMEOUTS):
                raise
            ray.shutdown()
