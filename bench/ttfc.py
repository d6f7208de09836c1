"""Streaming time to first chunk: sequential requests on one kept-alive connection.

wrk measures until a whole answer is in; for a stream the user feels the first chunk. The
client is the same for every system, so its own cost cancels out in the differences.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from bench.wrk import Target


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure_ttfc(target: Target, samples: int, warmup: int = 5) -> dict[str, Any]:
    body = {**target.body, "stream": True}
    headers = {"Content-Type": "application/json", **target.headers}
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup + samples):
            started = time.perf_counter()
            try:
                async with session.post(target.url, json=body, headers=headers) as reply:
                    first = await reply.content.readany()
                    got_first = time.perf_counter()
                    await reply.read()
                    done = time.perf_counter()
                    if reply.status != 200 or not first:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            if i >= warmup:
                firsts.append((got_first - started) * 1000)
                totals.append((done - started) * 1000)
    return {
        "samples": len(firsts),
        "errors": errors,
        "ttfc_p50_ms": round(percentile(firsts, 50), 3),
        "ttfc_p99_ms": round(percentile(firsts, 99), 3),
        "total_p50_ms": round(percentile(totals, 50), 3),
    }
