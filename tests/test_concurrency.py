"""300 clients at once over 3 keys of 50 and a fallback of 100: exact counts, no upstream 429."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.simulator import Simulator
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, GatewayProcess, gateway
from tests.test_gateway import TOKENS, config_for, sim_config

REQUESTS = 300
KEY_LIMIT = 50
FALLBACK_LIMIT = 100


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(sim_config(KEY_LIMIT, FALLBACK_LIMIT)) as simulator:
        yield simulator


async def fire(urls: list[str]) -> list[tuple[int, dict[str, Any], str | None]]:
    """REQUESTS chat calls at once, spread over the gateways in turn."""
    body = {"model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> tuple[int, dict[str, Any], str | None]:
            url = f"{urls[i % len(urls)]}/v1/chat/completions"
            async with http.post(url, json=body, headers=headers) as response:
                return response.status, await response.json(), response.headers.get("Retry-After")

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def assert_exact(sim: Simulator, results: list[tuple[int, dict[str, Any], str | None]]) -> None:
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 3 * KEY_LIMIT + FALLBACK_LIMIT, 429: REQUESTS - 250}
    for status, body, retry_after in results:
        if status == 429:
            assert body["error"]["code"] == "pool_exhausted"
            assert body["error"]["type"] == "rate_limit_error"
            assert retry_after is not None
            assert int(retry_after) > 0
    ms = sim.state.stats("modelscope")
    assert {name: ms["by_token"][name]["used"] for name, _ in TOKENS} == {
        name: KEY_LIMIT for name, _ in TOKENS
    }
    assert sim.state.stats("bailian")["by_token"]["main"]["used"] == FALLBACK_LIMIT
    assert ms["rejected"].get("429", 0) == 0
    assert sim.state.stats("bailian")["rejected"].get("429", 0) == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_one_gateway_never_overspends(
    kind: str, sim: Simulator, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store_url = server.url
    else:
        store_url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'q.db'}"
    config = config_for(
        sim,
        limit=KEY_LIMIT,
        bailian_limit=FALLBACK_LIMIT,
        store_url=store_url,
        prefix=f"t{uuid.uuid4().hex[:8]}",
    )
    async with gateway(config) as url:
        results = await fire([url])
    assert_exact(sim, results)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_three_gateway_processes_share_one_redis(
    sim: Simulator, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = config_for(
        sim,
        limit=KEY_LIMIT,
        bailian_limit=FALLBACK_LIMIT,
        store_url=redis_server.url,
        prefix=f"t{uuid.uuid4().hex[:8]}",
    )
    gateways = [GatewayProcess(config, tmp_path, f"gw{i}") for i in range(3)]
    try:
        await asyncio.gather(*(g.start() for g in gateways))
        results = await fire([g.url for g in gateways])
    finally:
        for g in gateways:
            g.stop()
    assert_exact(sim, results)
    served = Counter(status for status, _, _ in results[0::3])
    assert served[200] > 0  # every replica served its share
