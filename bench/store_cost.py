"""What one reservation costs in each store, by pool size: issue #12's "flat in pool size".

    .venv/bin/python -m bench.store_cost                    # pools of 2, 100 and 1000 keys
    .venv/bin/python -m bench.store_cost --sizes 2,1000 --calls 2000

For each store (memory, SQLite, Redis on a private redis-server) and pool size, the same
reserve request (a client with a fair share, ModelScope's limits) is made ``--calls`` times in
a row, after one warm-up call that builds what the store keeps. Reported per reserve: the CPU
time of this process (the gateway's side: argument packing, the client, the decisions of the
memory and SQLite stores) and, for Redis, the server's own time per script
(the median of its SLOWLOG durations for the EVALSHA). The sizes take turns call by call.
Ratios are against the smallest pool of the
same store and strategy, in the same run. Results go to bench/results/store_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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
    # Limits no run can reach: every call is served, on every pool size alike.
    keys = tuple(KeySpec(f"key-{i}", "fp", 10**6, 10**6) for i in range(size))
    return ReserveRequest(
        "modelscope", "Qwen/Qwen3-8B", keys, strategy, DAY, NOW_MS, NOW_MS + 3_600_000, CLIENT
    )


async def _interleaved(
    stores: dict[int, QuotaStore], reqs: dict[int, ReserveRequest], calls: int
) -> dict[int, float]:
    """CPU µs of this process per reserve, by pool size. The sizes take turns call by call,
    so load that comes and goes on a shared machine lands on all of them alike."""
    cpu = dict.fromkeys(stores, 0.0)
    for size, store in stores.items():  # warm-up: builds the index, loads the script
        for _ in range(2):
            assert isinstance(await store.reserve(reqs[size]), Reservation)
    for _ in range(calls):
        for size, store in stores.items():
            started = time.process_time()
            assert isinstance(await store.reserve(reqs[size]), Reservation)
            cpu[size] += time.process_time() - started
    return {size: total / calls * 1e6 for size, total in cpu.items()}


async def _redis_times(admin: Redis, prefixes: dict[int, str]) -> dict[int, float]:
    """Redis's own µs per reserve script (median), by pool size, from its SLOWLOG."""
    durations: dict[int, list[int]] = {size: [] for size in prefixes}
    for entry in await admin.slowlog_get(1_000_000):
        command = entry["command"]
        text = command if isinstance(command, str) else command.decode()
        for size, prefix in prefixes.items():
            if text.startswith("EVALSHA") and f"{{{prefix}}}" in text:
                durations[size].append(int(entry["duration"]))
    return {size: float(statistics.median(d)) if d else 0.0 for size, d in durations.items()}


async def run(sizes: list[int], calls: int, strategies: list[Strategy]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        admin = Redis.from_url(server.url, decode_responses=True)
        await admin.config_set("slowlog-log-slower-than", 0)  # every command, with its time
        await admin.config_set("slowlog-max-len", 1_000_000)
        try:
            for strategy in strategies:
                reqs = {size: _request(size, strategy) for size in sizes}
                memory: dict[int, QuotaStore] = {size: MemoryStore() for size in sizes}
                sqlite: dict[int, QuotaStore] = {
                    size: SqliteStore(Path(tmp) / f"{strategy.value}-{size}.db") for size in sizes
                }
                prefixes = {size: f"cost-{strategy.value}-{size}" for size in sizes}
                redis: dict[int, QuotaStore] = {
                    size: RedisStore(server.url, prefix=prefixes[size]) for size in sizes
                }
                for name, stores in (("memory", memory), ("sqlite", sqlite), ("redis", redis)):
                    await admin.slowlog_reset()
                    cpu = await _interleaved(stores, reqs, calls)
                    server_us = await _redis_times(admin, prefixes) if name == "redis" else {}
                    for size in sizes:
                        row = _row(name, strategy, size, cpu[size])
                        if name == "redis":
                            row["redis_us"] = server_us[size]
                        rows.append(row)
                    for store in stores.values():
                        await store.aclose()
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
