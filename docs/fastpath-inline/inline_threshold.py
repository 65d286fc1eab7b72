"""Ray alone: actor calls with one numpy argument of each size, sent inline (the limit raised
to 16 MiB) or through the object store (Ray's default limit, 100 KiB). 8 callers on one
asyncio loop of one driver, one async actor.

    python docs/fastpath-inline/inline_threshold.py 0          # Ray's default
    python docs/fastpath-inline/inline_threshold.py 16777216   # inline up to 16 MiB
"""

import asyncio
import sys
import time

import numpy as np
import ray

limit = int(sys.argv[1])
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
         _system_config={"max_direct_call_object_size": limit} if limit else None)


@ray.remote
class Sink:
    async def size(self, x: dict[str, np.ndarray]) -> int:
        return x["a"].nbytes


sink = Sink.remote()
ray.get(sink.size.remote({"a": np.zeros(4)}))


async def caller(x: dict[str, np.ndarray], calls: int) -> None:
    for _ in range(calls):
        await sink.size.remote(x)


async def main() -> None:
    for mb in (0.3, 0.6, 0.9, 1.2, 1.5, 2, 4, 8):
        x = {"a": np.random.rand(int(mb * 1e6 / 8))}
        await asyncio.gather(*[caller(x, 5) for _ in range(8)])
        calls = 40 if mb < 4 else 20
        start = time.perf_counter()
        await asyncio.gather(*[caller(x, calls) for _ in range(8)])
        rate = 8 * calls / (time.perf_counter() - start)
        print(f"limit {limit} size {mb} MB: {rate:.0f} calls/s", flush=True)


asyncio.run(main())
