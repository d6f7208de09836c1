"""Clients that go away mid-stream: the upstream call is cancelled and nothing is left behind.

The gateway runs in this process (so its tasks, its upstream connector and this process's
file descriptors can be inspected); the simulator streams slowly over real HTTP, and runs
its handlers with ``handler_cancellation``, so its in-flight count drops only when the
gateway really closed the upstream connection.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.quota.days import quota_day, to_ms
from router.quota.types import KeyUsage
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from router.state import LIVE, STORE
from tests.conftest import MODEL, TOKENS, GatewayClock
from tests.support import CLIENT_KEY, gateway_config

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


def slow_sim(clock: GatewayClock, chunks: int = 10, delay_ms: int = 50) -> Simulator:
    tokens = [
        ModelScopeToken(secret=s, name=n, daily_limit=100_000, model_daily_limit=100_000)
        for n, s in TOKENS
    ]
    config = SimulatorConfig(
        modelscope=ModelScopeConfig(tokens=tokens),
        bailian=BailianConfig(keys=[BailianKey(secret="sk-test-bailian", name="main")]),
        stream_chunks=chunks,
        stream_chunk_delay_ms=delay_ms,
    )
    return Simulator(config, clock=clock.seconds)


@dataclass
class Gateway:
    url: str
    app: web.Application
    registry: CollectorRegistry
    settings: Settings

    def aborts(self, side: str) -> float:
        value = self.registry.get_sample_value("router_stream_aborts_total", {"side": side})
        return value or 0.0

    def answered(self, status: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            if metric.name == "router_requests":
                total += sum(
                    s.value
                    for s in metric.samples
                    if s.name == "router_requests_total" and s.labels["status"] == status
                )
        return total

    @property
    def connector(self) -> aiohttp.BaseConnector:
        sessions = self.app[LIVE].runtime.upstreams._sessions
        return sessions["modelscope"].connector  # type: ignore[return-value]

    def acquired(self) -> int:
        """Upstream connections handed out and not given back (a leak if any stay)."""
        return len(self.connector._acquired)  # type: ignore[attr-defined]

    def pooled(self) -> int:
        """Idle keep-alive connections in the pool."""
        conns = self.connector._conns  # type: ignore[attr-defined]
        return sum(len(v) for v in conns.values())

    def handling(self) -> int:
        return self.app[LIVE].runtime.inflight

    async def snapshot(self, clock: GatewayClock, index: int = 0) -> list[KeyUsage]:
        """Today's usage and state of every key of a provider, from the gateway's store."""
        provider = self.settings.providers[index]
        pool = self.app[LIVE].runtime.pool
        now = clock()
        day = quota_day(now, self.settings.quota.tz, self.settings.quota.reset_time)
        return await self.app[STORE].snapshot(
            provider.name, pool.default_specs(provider), day, to_ms(now)
        )

    async def used(self, clock: GatewayClock) -> dict[str, int]:
        """Per key, today's count in the gateway's store."""
        return {u.key: u.used for u in await self.snapshot(clock)}


@asynccontextmanager
async def in_process_gateway(
    sim: Simulator, clock: GatewayClock, config: dict[str, Any] | None = None
) -> AsyncIterator[Gateway]:
    """The gateway in this process, with its app at hand (store, runtime, metrics)."""
    if config is None:
        config = gateway_config(
            sim.modelscope_url, sim.bailian_url, tokens=[(n, s, 100_000) for n, s in TOKENS]
        )
    settings = Settings.model_validate(config)
    registry = CollectorRegistry()
    app = create_app(settings, clock=clock, registry=registry, fetch_catalog=False)
    async with running(app) as url:
        yield Gateway(url, app, registry, settings)


def sim_used(sim: Simulator) -> dict[str, int]:
    by_token = sim.state.stats("modelscope")["by_token"]
    return {name: t["used"] for name, t in by_token.items()}  # type: ignore[attr-defined]


def sim_inflight(sim: Simulator) -> int:
    count: int = sim.state.stats("modelscope")["inflight"]  # type: ignore[assignment]
    return count


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5) -> float:
    """Poll ``check`` (bounded); the seconds it took to hold."""
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{check} did not hold within {timeout} s")
        await asyncio.sleep(0.01)


async def abort_mid_stream(http: aiohttp.ClientSession, url: str) -> None:
    """Open a stream, read its first event, then drop the connection."""
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH) as response:
        assert response.status == 200
        data = b""
        while b"\n\n" not in data:
            chunk = await response.content.readany()
            assert chunk
            data += chunk
        response.close()  # closes the connection, not back to the pool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def complete_stream(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH) as response:
        assert response.status == 200
        return await response.read()


async def test_a_client_gone_mid_stream_cancels_the_upstream_call_counted_once(
    gateway_clock: GatewayClock,
) -> None:
    async with (
        slow_sim(gateway_clock, chunks=50) as sim,
        in_process_gateway(sim, gateway_clock) as gw,
    ):
        async with aiohttp.ClientSession() as http:
            await abort_mid_stream(http, gw.url)
            # 50 chunks of 50 ms: the upstream would stream 2.5 s more; it ends at once
            took = await until(lambda: sim_inflight(sim) == 0, timeout=2)
            await until(lambda: gw.handling() == 0)
        assert gw.aborts("client") == 1
        assert gw.aborts("upstream") == 0
        assert gw.answered("200") == 1
        assert gw.acquired() == 0
        assert gw.pooled() == 0  # an unfinished upstream answer is never pooled
        assert await gw.used(gateway_clock) == sim_used(sim) == {"alice": 1, "bob": 0, "carol": 0}
    print(f"\nupstream call ended {took * 1000:.0f} ms after the client left")


async def test_a_client_gone_before_the_first_byte_is_a_client_abort_not_a_500(
    gateway_clock: GatewayClock,
) -> None:
    async with slow_sim(gateway_clock) as sim, in_process_gateway(sim, gateway_clock) as gw:
        sim.faults.add("latency:300", token="alice", count=1)
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TimeoutError):
                await http.post(
                    f"{gw.url}/v1/chat/completions",
                    json=CHAT,
                    headers=AUTH,
                    timeout=aiohttp.ClientTimeout(total=0.1),
                )
            await until(lambda: gw.handling() == 0 and sim_inflight(sim) == 0)
        assert gw.answered("500") == 0
        assert gw.aborts("client") == 1
        assert gw.acquired() == 0
        assert await gw.used(gateway_clock) == sim_used(sim) == {"alice": 1, "bob": 0, "carol": 0}


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_thousand_aborted_streams_leave_no_task_connection_or_fd_behind(
    gateway_clock: GatewayClock,
) -> None:
    total, batch = 1000, 50
    async with (
        slow_sim(gateway_clock, chunks=10, delay_ms=20) as sim,
        in_process_gateway(sim, gateway_clock) as gw,
        aiohttp.ClientSession() as http,
    ):
        # warm up: one whole stream, so pools and lazy state exist before the baseline
        assert (await complete_stream(http, gw.url)).rstrip().endswith(b"[DONE]")
        await until(lambda: gw.handling() == 0 and sim_inflight(sim) == 0)
        tasks, fds, pooled = len(asyncio.all_tasks()), open_fds(), gw.pooled()
        started = time.monotonic()
        for _ in range(total // batch):
            await asyncio.gather(*(abort_mid_stream(http, gw.url) for _ in range(batch)))
        aborted = time.monotonic() - started
        await until(lambda: gw.handling() == 0 and sim_inflight(sim) == 0, timeout=10)
        await until(lambda: len(asyncio.all_tasks()) <= tasks, timeout=5)
        await until(lambda: open_fds() <= fds + 4, timeout=5)
        after_tasks, after_fds = len(asyncio.all_tasks()), open_fds()
        assert gw.acquired() == 0
        assert gw.pooled() <= pooled  # aborted answers are closed, never pooled
        assert gw.aborts("client") == total
        assert gw.aborts("upstream") == 0
        assert gw.answered("500") == 0
        used = await gw.used(gateway_clock)
        assert used == sim_used(sim)
        assert sum(used.values()) == total + 1
        # still serving normally afterwards
        assert (await complete_stream(http, gw.url)).rstrip().endswith(b"[DONE]")
    assert aborted < 30
    print(
        f"\n{total} aborts in {aborted:.1f} s: tasks {tasks} -> {after_tasks}, "
        f"fds {fds} -> {after_fds}, counted {sum(used.values())}"
    )


async def test_stream_chunks_reach_the_client_while_the_upstream_is_still_sending(
    gateway_clock: GatewayClock,
) -> None:
    """No buffering: with the upstream sending a chunk every 100 ms, each chunk but the last
    is at the client while the upstream is still at work (a gateway that held the stream back
    would hand it all over once the upstream had finished)."""
    chunks = 5
    async with (
        slow_sim(gateway_clock, chunks=chunks, delay_ms=100) as sim,
        in_process_gateway(sim, gateway_clock) as gw,
        aiohttp.ClientSession() as http,
        http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=AUTH) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events, while_upstream_busy = 0, 0
        async for line in response.content:
            if line.startswith(b"data: {"):
                events += 1
                while_upstream_busy += sim_inflight(sim) == 1
        assert events >= chunks
        assert while_upstream_busy >= chunks - 1
