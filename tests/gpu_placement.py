"""Where Serve places the replica that replaces one broken by a real CUDA fault (issue 12).

Run on the GPU machine (docs/gpu.md), from the checkout:

    python3 -m tests.gpu_placement [--replicas N] [--gpus-per-replica F]

The app is deployed with ``replicas`` engine replicas (default: two per GPU less one, so on
2 GPUs 3 replicas at 0.5 GPU leave room for a replacement to stack or to spread); a real
sticky CUDA error strikes one of them under 8 callers; once Serve has replaced it, one JSON
line says which GPU each replica held before and after, and how many requests failed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import serve

from engines import cuda

from .serving import FaultAt, deploy, describe_all, load, replica_ids, wait_until


def _placements() -> dict[str, Any]:
    return {r["replica_id"]: {"ray_gpu_ids": r["device"]["ray_gpu_ids"],
                              "uuid": (r["device"]["cuda"] or {}).get("uuid")}
            for r in describe_all()}


def main() -> None:
    gpus = cuda.visible_device_count()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=max(1, 2 * gpus - 1))
    parser.add_argument("--gpus-per-replica", type=float, default=0.5)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    serve.start()
    try:
        router = deploy(Path(tempfile.mkdtemp()), backend="onnxruntime",
                        replicas=args.replicas, gpus_per_replica=args.gpus_per_replica)
        before = _placements()
        victim = sorted(before)[0]
        fault = FaultAt(50, {"kind": "cuda"}, victim)
        results = load(router, 400, 8, on_progress=fault)
        replaced = wait_until(lambda: victim not in replica_ids()
                              and len(replica_ids()) == args.replicas, 120)
        print(json.dumps({
            "gpus": gpus, "replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica,
            "victim": victim, "fault_injected": fault.injected,
            "requests": len(results),
            "failed": sum(isinstance(r, BaseException) for _, r in results),
            "replaced": replaced, "before": before, "after": _placements(),
        }))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
