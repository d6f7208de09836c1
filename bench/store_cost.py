"""What one reservation costs in each store, by pool size: issue #12's "flat in pool size".

    .venv/bin/python -m bench.store_cost                    # pools of 2, 100 and 1000 keys
    .venv/bin/python -m bench.store_cost --sizes 2,1000 --calls 2000

For each store (memory, SQLite, Redis on a private redis-server) and pool size, the same
reserve request (a client with a fair share, ModelScope's limits) is made ``--calls`` times in
a row, after one warm-up call that builds what the store keeps. Reported per reserve: the CPU
time of this process (the gateway's side: argument packing, the client, the decisions of the
memory and SQLite stores) and, for Redis, the server's own time per script
(INFO commandstats ``usec_per_call`` of EVALSHA). Ratios are against the smallest pool of the
same store and strategy, in the same run. Results go to bench/results/store_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore
from router.quota.types import (
    ClientQuota,
    FairShare,
    KeySpec,
    Reservation,
    ReserveRequest,
    Strategy,
)
from tests.redis_server import RedisServer

NOW_MS = 4_102_279_200_000  # any clock: the stores' TTLs are durations from it
DAY = "20991230"
CLIENT = ClientQuota("alice", None, FairShare(0.1, (("alice", 1.0), ("bob", 1.0)), None))


def _request(size: int, strategy: Strategy) -> ReserveRequest:
    keys = tuple(KeySpec(f"key-{i}", "fp", 2000, 500) for i in range(size))
    return ReserveRequest(
        "modelscope", "Qwen/Qwen3-8B", keys, strategy, DAY, NOW_MS, NOW_MS + 3_600_000, CLIENT
    )


async def _measure(store: QuotaStore, req: ReserveRequest, calls: int) -> float:
    """CPU µs of this process per reserve."""
    assert isinstance(await store.reserve(req), Reservation)  # warm-up: builds the index
    started = time.process_time()
    for _ in range(calls):
        assert isinstance(await store.reserve(req), Reservation)
    return (time.process_time() - started) / calls * 1e6


async def run(sizes: list[int], calls: int, strategies: list[Strategy]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        admin = Redis.from_url(server.url, decode_responses=True)
        try:
            for strategy in strategies:
                for size in sizes:
                    req = _request(size, strategy)
                    memory = MemoryStore()
                    rows.append(_row("memory", strategy, size, await _measure(memory, req, calls)))
                    await memory.aclose()
                    sqlite = SqliteStore(str(Path(tmp) / f"{strategy.value}-{size}.db"))
                    rows.append(_row("sqlite", strategy, size, await _measure(sqlite, req, calls)))
                    await sqlite.aclose()
                    redis = RedisStore(server.url, prefix=f"cost-{strategy.value}-{size}")
                    await admin.config_resetstat()
                    cpu = await _measure(redis, req, calls)
                    stats = (await admin.info("commandstats")).get("cmdstat_evalsha", {})
                    row = _row("redis", strategy, size, cpu)
                    row["redis_us"] = float(stats.get("usec_per_call", 0.0))
                    rows.append(row)
                    await redis.aclose()
        finally:
            await admin.aclose()
    return rows


def _row(store: str, strategy: Strategy, size: int, cpu_us: float) -> dict[str, Any]:
    return {"store": store, "strategy": strategy.value, "keys": size, "cpu_us": round(cpu_us, 1)}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's cost against the smallest pool of its store and strategy (same run)."""
    smallest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["keys"]):
        smallest.setdefault((row["store"], row["strategy"]), row)
    out = []
    for row in rows:
        base = smallest[row["store"], row["strategy"]]
        ratio = dict(row)
        ratio["cpu_ratio"] = round(row["cpu_us"] / base["cpu_us"], 2) if base["cpu_us"] else None
        if "redis_us" in row and base.get("redis_us"):
            ratio["redis_ratio"] = round(row["redis_us"] / base["redis_us"], 2)
        out.append(ratio)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,100,1000")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--strategies", default=",".join(s.value for s in Strategy))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = [Strategy(s) for s in args.strategies.split(",")]
    rows = ratios(asyncio.run(run(sizes, args.calls, strategies)))
    table = Table(title="one reserve, by store and pool size (CPU of the caller; Redis's own time)")
    for column in ("store", "strategy", "keys", "CPU µs", "× smallest", "Redis µs", "× smallest"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["store"],
            r["strategy"],
            str(r["keys"]),
            f"{r['cpu_us']:.0f}",
            str(r["cpu_ratio"]),
            f"{r['redis_us']:.0f}" if "redis_us" in r else "",
            str(r.get("redis_ratio", "")),
        )
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "store_cost.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
