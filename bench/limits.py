"""What shared limits cost per request: admit + release, in-process against Redis.

``python -m bench.limits --redis-url redis://127.0.0.1:6379/0`` times one admit (and
its release) with the in-process :class:`Admission` and with :class:`RedisAdmission`,
one caller at a time and with many concurrent callers, and prints a JSON line per
case (microseconds: p50, p90, p99). Each admit runs the whole script (two token
buckets and a stream slot); a release is one ``ZREM`` that runs after the admit
returns, so the time a request waits is the admit's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import uvloop

from voxrelay.service.limits import Admission, AdmissionControl
from voxrelay.service.limits_redis import RedisAdmission

__all__ = ["main", "measure"]

LIMITS = dict(requests_per_min=10**9, chars_per_min=10**9, streams_per_key=10**6)


async def measure(admission: AdmissionControl, *, admits: int, concurrency: int) -> list[float]:
    """Return the seconds each admit took, in bursts of *concurrency* arriving at once.

    A burst is what a busy replica sees when many streams start together (a stream
    admits once in its life); the last admit of a burst waits for the others.
    """
    took: list[float] = []

    async def caller(n: int) -> None:
        start = time.perf_counter()
        lease = await admission.admit(f"bench-{n % 50}", 100)
        took.append(time.perf_counter() - start)
        lease.release()

    for _ in range(max(1, admits // concurrency)):
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        await asyncio.sleep(0)
    return took


def summary(name: str, concurrency: int, took: list[float]) -> dict[str, object]:
    cuts = statistics.quantiles([t * 1e6 for t in took], n=100)
    return {
        "backend": name,
        "concurrency": concurrency,
        "admits": len(took),
        "p50_us": round(cuts[49], 1),
        "p90_us": round(cuts[89], 1),
        "p99_us": round(cuts[98], 1),
    }


async def run(url: str, admits: int, levels: list[int]) -> None:
    local = Admission(**LIMITS)
    shared = RedisAdmission.from_url(url, **LIMITS)
    await shared.start()
    try:
        for concurrency in levels:
            for name, admission in (("in-process", local), ("redis", shared)):
                await measure(admission, admits=min(admits, 500), concurrency=concurrency)
                took = await measure(admission, admits=admits, concurrency=concurrency)
                print(json.dumps(summary(name, concurrency, took)), flush=True)
            await shared.settle()
    finally:
        await shared.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--admits", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,200", help="comma-separated levels")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    # The server's loop: voxrelay serves on uvloop.
    uvloop.run(run(args.redis_url, args.admits, levels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
