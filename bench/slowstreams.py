"""Many streams held open at once against a slow upstream (issue #12, ``--slow-streams N``).

N streaming chat completions are sent at once from one aiohttp session (a connector with room
for all of them), to the simulator directly, to the bare pass-through and to the gateway, each
in front of the same slow simulator (``bench.systems.SLOW``: the first chunk after 200 ms, the
stream open for seconds). Per stream: the time to first byte (from the send to the first body
byte) and whether it ended well (HTTP 200 and the final ``data: [DONE]``).

Two rounds per system, one after the other on the same client session: ``cold`` (every
connection, the client's and the system's to the upstream, is opened in the burst) and ``warm``
(the kept-alive connections of the cold round are reused, as they are in steady traffic). The
errors of both rounds count; time to first byte is judged on the warm round, where the accept
queues of the processes (the simulator's is aiohttp's default of 128, the gateway's and the
pass-through's 1024) do not decide the tail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import resource
import time
from typing import Any

import aiohttp

from bench.procs import Proc
from bench.ttfc import percentile
from bench.wrk import Target

DONE = b"data: [DONE]"
ROUNDS = ("cold", "warm")


def raise_nofile(wanted: int) -> dict[str, Any]:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit).

    The systems are started later as children of this process and inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"wanted": wanted, "before": soft, "now": now, "hard": hard, "enough": now >= wanted}


async def _one(
    session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]
) -> tuple[float | None, float | None, str | None]:
    """(ms to the first body byte, ms to the end, None or what went wrong)."""
    started = time.perf_counter()
    first_ms: float | None = None
    try:
        async with session.post(url, data=data, headers=headers) as reply:
            first = await reply.content.readany()
            first_ms = (time.perf_counter() - started) * 1000
            rest = await reply.read()
            total_ms = (time.perf_counter() - started) * 1000
            status = reply.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return first_ms, None, type(exc).__name__
    if status != 200:
        return first_ms, total_ms, f"HTTP {status} {_code(first + rest)}".rstrip()
    if not first:
        return None, total_ms, "empty body"
    if DONE not in (first + rest)[-256:]:
        return first_ms, total_ms, "no final data: [DONE]"
    return first_ms, total_ms, None


def _code(body: bytes) -> str:
    """The ``error.code`` of an OpenAI-shaped error body (503 store_unavailable...), or ""."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""


def summarize(outcomes: list[tuple[float | None, float | None, str | None]]) -> dict[str, Any]:
    """Errors and the time to first byte of the streams that ended well."""
    good = [o for o in outcomes if o[2] is None]
    firsts = [o[0] for o in good if o[0] is not None]
    totals = [o[1] for o in good if o[1] is not None]
    kinds = collections.Counter(o[2] for o in outcomes if o[2] is not None)
    return {
        "streams": len(outcomes),
        "completed": len(good),
        "errors": len(outcomes) - len(good),
        "error_kinds": dict(kinds.most_common()),
        "ttfb_p50_ms": round(percentile(firsts, 50), 1),
        "ttfb_p90_ms": round(percentile(firsts, 90), 1),
        "ttfb_p99_ms": round(percentile(firsts, 99), 1),
        "ttfb_max_ms": round(max(firsts, default=0.0), 1),
        "total_p50_ms": round(percentile(totals, 50), 1),
        "total_p99_ms": round(percentile(totals, 99), 1),
    }


async def _rss_sampler(proc: Proc, peak: list[float], stop: asyncio.Event) -> None:
    """The largest RSS of ``proc``'s tree seen while ``stop`` is unset (read off the loop)."""
    while not stop.is_set():
        rss, _ = await asyncio.to_thread(proc.rss_mb)
        peak[0] = max(peak[0], rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def open_streams(
    target: Target, n: int, proc: Proc | None = None, timeout_s: float = 600
) -> dict[str, Any]:
    """``n`` streams at once, twice (cold then warm); RSS of ``proc`` at peak and after."""
    data = json.dumps({**target.body, "stream": True}).encode()
    headers = {"Content-Type": "application/json", **target.headers}
    # room for every stream at once, no per-host cap; keep-alive long enough for round two
    connector = aiohttp.TCPConnector(limit=n + 16, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    out: dict[str, Any] = {"streams": n}
    peak = [0.0]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for name in ROUNDS:
            stop = asyncio.Event()
            sampler = asyncio.create_task(_rss_sampler(proc, peak, stop)) if proc else None
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(_one(session, target.url, data, headers) for _ in range(n))
            )
            wall = time.perf_counter() - started
            stop.set()
            if sampler is not None:
                await sampler
            out[name] = {**summarize(list(outcomes)), "wall_s": round(wall, 2)}
    if proc is not None:
        out["rss_peak_mb"] = peak[0]
        out["rss_after_mb"] = proc.rss_mb()[0]
    out["errors"] = sum(out[r]["errors"] for r in ROUNDS)
    return out
