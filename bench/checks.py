"""The checks beside throughput: Redis round trips, exact accounting, memory, a py-spy profile."""

from __future__ import annotations

import asyncio
import collections
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.procs import free_port
from bench.systems import (
    FAST,
    TOKENS,
    Simulator,
    chat_body,
    gateway_settings,
    pool_tokens,
    start_gateway,
)
from bench.wrk import Target, run_wrk

Counts = dict[str, int]
# Commands a client sends itself; INFO commandstats also counts the calls made inside scripts.
USAGE_SETTLE_S = 0.6  # past the gateway's usage.flush_seconds (0.2 s)
TOP_LEVEL = {"evalsha", "eval", "evalsha_ro", "eval_ro", "multi", "exec", "ping", "hello"}


class RedisCounters:
    """Counters of the private redis-server, read over one connection of our own."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port)

    def read(self) -> tuple[int, Counts]:
        """(socket reads processed, calls per command): a read is one client round trip.

        One INFO command for both sections, so each reading costs exactly one read.
        """
        raw: dict[str, Any] = self.client.execute_command("INFO", "stats", "commandstats")
        calls = {
            name.removeprefix("cmdstat_"): int(v["calls"])
            for name, v in raw.items()
            if name.startswith("cmdstat_")
        }
        return int(raw["total_reads_processed"]), calls

    def usage_batches(self, prefix: str) -> int:
        """Usage batches written under ``prefix`` (router.ledger marks each one in Redis)."""
        marks = self.client.scan_iter(match=f"{{{prefix}}}:usage-batch:*", count=1000)
        return sum(1 for _ in marks)

    def close(self) -> None:
        self.client.close()


def _delta(before: Counts, after: Counts) -> Counts:
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    diff.pop("info", None)  # our own INFO calls
    return {k: v for k, v in sorted(diff.items()) if v}


async def _calls(sim: Simulator) -> int:
    calls: int = (await sim.stats())["calls"]
    return calls


async def drive(target: Target, concurrency: int, total: int) -> int:
    """``total`` requests from ``concurrency`` kept-alive connections; returns the non-200s.

    Returns only once every answer is in: nothing is in flight before or after, so counters
    read around it see exactly these requests (wrk stops by cutting connections).
    """
    left = total
    failed = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json", **target.headers}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left, failed
        while left > 0:
            left -= 1
            async with session.post(target.url, json=target.body, headers=headers) as reply:
                await reply.read()
                failed += reply.status != 200

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failed


async def redis_round_trips(
    workdir: Path, redis_port: int, requests: int, connections: list[int], keys: int = 0
) -> dict[str, Any]:
    """Round trips (and commands) from the gateway to Redis per proxied request.

    Per concurrency: a warm-up at that concurrency (the Redis pool grows to it), then the
    counters, ``requests`` requests, the counters again, with nothing in flight at either
    reading (see ``drive``). ``keys``: that many keys in the provider (0: the default three).
    """
    tag = f"-k{keys}" if keys else ""
    prefix = f"bench-roundtrips{tag}"
    sim = await Simulator(workdir, FAST, name=f"sim-roundtrips{tag}", pool_size=keys).start()
    settings = gateway_settings(
        sim,
        f"redis://127.0.0.1:{redis_port}/0",
        port=free_port(),
        prefix=prefix,
        tokens=pool_tokens(keys) if keys else TOKENS,
    )
    gw = await start_gateway(workdir, f"gw-roundtrips{tag}", settings)
    counters = RedisCounters(redis_port)
    out: dict[str, Any] = {
        "keys": keys or len(TOKENS),
        "requests_per_run": requests,
        "runs": [],
    }
    try:
        target = Target(gw.url, chat_body(False), gw.headers)
        for c in connections:
            await drive(target, c, max(200, 10 * c))
            # The answers' usage goes to Redis in batches, usage.flush_seconds (0.2 s) after
            # them: wait that out on both sides, so each reading holds its requests' batches.
            await asyncio.sleep(USAGE_SETTLE_S)
            batches_before = counters.usage_batches(prefix)
            calls_before = await _calls(sim)
            reads_before, before = counters.read()
            failed = await drive(target, c, requests)
            await asyncio.sleep(USAGE_SETTLE_S)
            calls_after = await _calls(sim)
            reads_after, after = counters.read()
            usage_writes = counters.usage_batches(prefix) - batches_before
            proxied = calls_after - calls_before
            trips = reads_after - reads_before - 1  # the second reading's own INFO
            delta = _delta(before, after)
            top = {k: v for k, v in delta.items() if k in TOP_LEVEL or k.startswith("hgetall")}
            per = {k: round(v / proxied, 4) for k, v in top.items()} if proxied else {}
            scripts = top.get("evalsha", 0) + top.get("eval", 0)
            out["runs"].append(
                {
                    "connections": c,
                    "proxied": proxied,
                    "errors": failed,
                    # on the request path: the scripts (reserve, and settle when one is needed);
                    # HELLO (a new pooled connection) and the periodic MULTI/HGETALL/EXEC
                    # snapshot of the metrics are off it
                    "scripts_per_request": round(scripts / proxied, 4) if proxied else 0.0,
                    # of which usage batches (router.ledger), after the answers: the rest are
                    # the reservations made before each call
                    "usage_writes": usage_writes,
                    "reserves_per_request": (
                        round((scripts - usage_writes) / proxied, 4) if proxied else 0.0
                    ),
                    "round_trips": trips,
                    "round_trips_per_request": round(trips / proxied, 4) if proxied else 0.0,
                    "client_commands": top,
                    "client_commands_per_request": per,
                    "all_commands_incl_in_scripts": delta,
                }
            )
    finally:
        counters.close()
        gw.proc.stop()
        sim.stop()
    return out


async def accounting(
    workdir: Path, store_url: str, label: str, limit: int, connections: int
) -> dict[str, Any]:
    """Three tokens with ``limit`` calls each; drive past the pool; the upstream counts."""
    sim = await Simulator(workdir, FAST, name=f"sim-acct-{label}").start()
    settings = gateway_settings(
        sim,
        store_url,
        port=free_port(),
        prefix=f"bench-acct-{label}",
        token_limit=limit,
        bailian=False,
    )
    gw = await start_gateway(workdir, f"gw-acct-{label}", settings)
    pool = limit * len(TOKENS)
    sent = pool + max(100, pool // 10)
    try:
        target = Target(gw.url, chat_body(False), gw.headers)
        result = await run_wrk(
            target, connections=connections, duration_s=600, script_dir=workdir, limit=sent
        )
        await asyncio.sleep(0.5)
        stats = await sim.stats()
    finally:
        gw.proc.stop()
        sim.stop()
    used = {name: stats["by_token"][name]["used"] for name, _ in TOKENS}
    over = {name: n - limit for name, n in used.items() if n > limit}
    exact = not over and all(n == limit for n in used.values()) and result.ok == pool
    return {
        "store": label,
        "limit_per_token": limit,
        "tokens": len(TOKENS),
        "connections": connections,
        "requests_answered": result.ok + result.refused,
        "answered_200": result.ok,
        "answered_other": result.refused,
        "transport_errors": result.errors - result.error_detail["status"],
        "upstream_used": used,
        "upstream_rejected": stats.get("rejected", {}),
        "over_limit": over,
        "exact": exact,
    }


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def memory(workdir: Path, total: int, connections: int, keys: int = 0) -> dict[str, Any]:
    """RSS of a Redis gateway with ``keys`` keys (0: the default three) before, at half of and
    after ``total`` requests; Redis ``used_memory`` alongside, on a private redis-server of its
    own (empty at the start, so what it grows by is the gateway's)."""
    from tests.redis_server import RedisServer  # no pytest in it: a plain helper

    n_keys = keys or len(TOKENS)
    server = RedisServer().start()
    client = redis.Redis(port=server.port)
    sim = gw = None
    samples: list[dict[str, Any]] = []
    try:
        used_empty = _used_memory(client)
        sim = await Simulator(workdir, FAST, name="sim-memory", pool_size=keys).start()
        settings = gateway_settings(
            sim,
            server.url,
            port=free_port(),
            prefix="bench-memory",
            tokens=pool_tokens(keys) if keys else TOKENS,
        )
        gw = await start_gateway(workdir, "gw-memory", settings)
        target = Target(gw.url, chat_body(False), gw.headers)
        done = 0
        samples.append(
            {
                "requests": 0,
                "rss_mb": gw.proc.rss_mb()[0],
                "redis_used_memory": _used_memory(client),
            }
        )
        for _ in range(2):
            result = await run_wrk(
                target,
                connections=connections,
                duration_s=3600,
                script_dir=workdir,
                limit=total // 2,
            )
            done += result.ok + result.refused
            samples.append(
                {
                    "requests": done,
                    "rss_mb": gw.proc.rss_mb()[0],
                    "redis_used_memory": _used_memory(client),
                    "errors": result.errors,
                    "rps": result.rps,
                }
            )
        gw.proc.stop()
        await asyncio.sleep(0.2)  # the gateway's connections closed: what is left is data
        used_stopped = _used_memory(client)
        redis_keys = int(client.dbsize())
    finally:
        if gw is not None:
            gw.proc.stop()
        if sim is not None:
            sim.stop()
        client.close()
        server.close()
    mid, end = samples[1]["rss_mb"], samples[2]["rss_mb"]
    growth = round(end - mid, 1)
    used_after = samples[2]["redis_used_memory"]
    return {
        "connections": connections,
        "keys": n_keys,
        "samples": samples,
        "rss_after_total_mb": end,
        "growth_second_half_mb": growth,
        "under_80mb": end < 80,
        "flat": growth <= max(2.0, 0.05 * mid),
        "redis": {
            "used_memory_empty": used_empty,
            "used_memory_after": used_after,
            "used_memory_gateway_stopped": used_stopped,
            "redis_keys": redis_keys,
            # what the pool costs Redis per key of the provider, the gateway still connected
            "bytes_per_key": round((used_after - used_empty) / n_keys),
            # the same without the gateway's connections (their buffers): the data alone
            "bytes_per_key_data": round((used_stopped - used_empty) / n_keys),
        },
    }


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(Path(sys.executable).parent / "py-spy")
        if (Path(sys.executable).parent / "py-spy").exists()
        else None
    )


def summarize_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def share(counter: collections.Counter[str], skip: bool) -> list[dict[str, Any]]:
        ranked = [(k, n) for k, n in counter.most_common() if not (skip and _scaffolding(k))]
        return [{"function": k, "percent": round(100 * n / total, 1)} for k, n in ranked[:top]]

    # self time of run_app is the event loop's own (uvloop, C): kept in "self"
    return {"samples": total, "self": share(own, False), "inclusive": share(inclusive, True)}


_SCAFFOLDING = ("process ", "<module> ", "_run_code ", "_run_module_as_main ", "run_app ")


def _scaffolding(name: str) -> bool:
    """Frames every sample passes through (the process, runpy, the CLI, run_app)."""
    return name.startswith(_SCAFFOLDING) or name in {
        "main (router/cli.py)",
        "_serve (router/cli.py)",
        "serve (router/serve.py)",
    }


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; drop the line number
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name


async def profile(
    workdir: Path, out_dir: Path, redis_port: int, seconds: int, connections: int
) -> dict[str, Any]:
    """py-spy (sampling, non-blocking) on a Redis gateway under wrk load, JSON and stream."""
    exe = py_spy()
    if exe is None:
        return {"status": "not measured: py-spy is not installed (pip install py-spy)"}
    sim = await Simulator(workdir, FAST, name="sim-profile").start()
    settings = gateway_settings(
        sim, f"redis://127.0.0.1:{redis_port}/0", port=free_port(), prefix="bench-profile"
    )
    gw = await start_gateway(workdir, "gw-profile", settings)
    report: dict[str, Any] = {"connections": connections, "seconds": seconds}
    try:
        for stream in (False, True):
            mode = "stream" if stream else "json"
            target = Target(gw.url, chat_body(stream), gw.headers)
            await run_wrk(target, connections=4, duration_s=30, script_dir=workdir, limit=300)
            raw = out_dir / f"profile-{mode}.collapsed"
            spy = await asyncio.create_subprocess_exec(
                exe, "record", "--pid", str(gw.proc.pid), "--rate", "200", "--nonblocking",
                "--subprocesses", "--format", "raw", "--duration", str(seconds),
                "--output", str(raw),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(0.5)
            load = await run_wrk(
                target, connections=connections, duration_s=seconds, script_dir=workdir
            )
            _, err = await spy.communicate()
            if spy.returncode != 0 or not raw.exists():
                report[mode] = {"status": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
                continue
            report[mode] = {"rps_while_profiled": load.rps, **summarize_collapsed(raw)}
    finally:
        gw.proc.stop()
        sim.stop()
    return report
