"""Serve alone, no trtserve: CALLERS concurrent callers on one event loop of one process send
a 588 KiB float32 array (one ResNet-50 image) to a deployment that answers a few bytes,
through a handle by reference (Serve's default: a Ray actor call, the argument inline under
the 1 MiB limit trtserve sets) and by value (Serve's gRPC, `_by_reference=False`),
alternating. Prints calls/s and the CPU each call cost the caller and the replica.

    python docs/fastpath-byvalue/handle_transport.py CALLERS SECONDS ROUNDS
"""

import asyncio
import os
import resource
import sys
import time

import numpy as np
import ray
from ray import serve


@serve.deployment(max_ongoing_requests=256, num_replicas=1)
class Echo:
    async def __call__(self, x: np.ndarray) -> int:
        return x.shape[0]

    def cpu_s(self) -> float:
        t = os.times()
        return t.user + t.system


def caller_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def drive(handle, callers: int, seconds: float, x: np.ndarray) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await handle.remote(x)
            done += 1

    await asyncio.gather(*(one() for _ in range(callers)))
    return done


def main() -> None:
    callers, seconds, rounds = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    ray.init(address="local", _system_config={"max_direct_call_object_size": 1 << 20},
             include_dashboard=False)
    base = serve.run(Echo.bind(), name="echo")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(rounds):
        for by_reference in (True, False):
            handle = base.options(_by_reference=by_reference)
            asyncio.run(drive(handle, callers, 2, x))
            caller0, replica0 = caller_cpu_s(), base.cpu_s.remote().result()
            t0 = time.monotonic()
            n = asyncio.run(drive(handle, callers, seconds, x))
            wall = time.monotonic() - t0
            caller = (caller_cpu_s() - caller0) / n * 1000
            replica = (base.cpu_s.remote().result() - replica0) / n * 1000
            print(f"by_reference={by_reference!s:5} {n / wall:6.0f} calls/s  CPU per call: "
                  f"caller {caller:.2f} ms, replica {replica:.2f} ms", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
