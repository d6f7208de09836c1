"""End to end: the simulator over real HTTP, the gateway in this process, real clients."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI, RateLimitError

from router.simulator import Simulator

# MODEL, TOKENS and sim_config are imported from here by other test modules too.
from tests.conftest import MODEL, TOKENS, GatewayClock, sim_config
from tests.support import CLIENT_KEY, gateway, gateway_config


def config_for(
    sim: Simulator, limit: int = 2, bailian_limit: int | None = 2, **kw: Any
) -> dict[str, Any]:
    return gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[(n, s, limit) for n, s in TOKENS],
        bailian=("main", "sk-test-bailian", bailian_limit),
        **kw,
    )


def openai_client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)


async def ask(
    client: AsyncOpenAI, model: str = MODEL, stream: bool = False
) -> tuple[str, str, str]:
    messages: Any = [{"role": "user", "content": "hi"}]
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=stream
    )
    provider, key = raw.headers["x-router-provider"], raw.headers["x-router-key"]
    if not stream:
        return provider, key, raw.parse().choices[0].message.content or ""
    parts = [
        chunk.choices[0].delta.content
        async for chunk in raw.parse()
        if chunk.choices and chunk.choices[0].delta.content
    ]
    return provider, key, "".join(parts)


def rejected(sim: Simulator, provider: str, status: str) -> int:
    count: int = sim.state.stats(provider)["rejected"].get(status, 0)  # type: ignore[arg-type]
    return count


async def test_openai_client_fails_over_on_429_stream_and_non_stream(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    sim.faults.add("throttle", token="alice", count=1)
    async with gateway(config_for(sim), gateway_clock) as url:
        client = openai_client(url)
        try:
            provider, key, text = await ask(client)
            assert (provider, key) == ("modelscope", "bob")
            assert "bob" in text
            sim.faults.add("throttle", token="carol", count=1)
            provider, key, text = await ask(client, stream=True)
            # alice cools after her throttle, carol is throttled now: the stream comes from bob
            assert (provider, key) == ("modelscope", "bob")
            assert "bob" in text
        finally:
            await client.close()
    assert rejected(sim, "modelscope", "429") == 2


async def test_pool_spent_then_fallback_then_429_with_retry_after(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    served: list[tuple[str, str]] = []
    async with gateway(config_for(sim), gateway_clock) as url:
        client = openai_client(url)
        try:
            for _ in range(8):
                provider, key, _text = await ask(client)
                served.append((provider, key))
            with pytest.raises(RateLimitError) as info:
                await ask(client)
        finally:
            await client.close()
    assert [p for p, _ in served] == ["modelscope"] * 6 + ["bailian"] * 2
    assert sorted(k for _, k in served[:6]) == ["alice", "alice", "bob", "bob", "carol", "carol"]
    error = info.value
    assert error.status_code == 429
    body: Any = error.body
    assert body["code"] == "pool_exhausted"
    assert "resets at" in body["message"]
    # 06:00 UTC is 14:00 in Shanghai: ten hours to the reset
    assert int(error.response.headers["retry-after"]) == 10 * 3600
    assert rejected(sim, "modelscope", "429") == 0
    assert rejected(sim, "bailian", "429") == 0
    assert sim.state.stats()["calls"] == 8


async def test_day_boundary_is_shanghai_midnight(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    gateway_clock.now = datetime(
        2026, 11, 29, 15, 59, 59, 999000, tzinfo=UTC
    )  # 23:59:59.999 in Shanghai
    async with gateway(config_for(sim, bailian_limit=0), gateway_clock) as url:
        client = openai_client(url)
        try:
            for _ in range(6):
                await ask(client)
            with pytest.raises(RateLimitError) as info:
                await ask(client)
            assert info.value.response.headers["retry-after"] == "1"
            gateway_clock.now = datetime(2026, 11, 29, 16, 0, tzinfo=UTC)  # 00:00 in Shanghai
            provider, _key, _ = await ask(client)
            assert provider == "modelscope"
            for _ in range(5):
                await ask(client)
            gateway_clock.now = datetime(
                2026, 11, 30, 0, 0, 1, tzinfo=UTC
            )  # UTC midnight: no reset
            with pytest.raises(RateLimitError):
                await ask(client)
        finally:
            await client.close()
    assert rejected(sim, "modelscope", "429") == 0


async def test_remaining_header_takes_a_key_out_without_a_429(gateway_clock: GatewayClock) -> None:
    async with Simulator(sim_config(50, None), clock=gateway_clock.seconds) as sim:
        sim.state.modelscope.set_usage("alice", used=49)  # the token was used elsewhere today
        config = config_for(sim, limit=50, bailian_limit=None)
        config["providers"][0]["strategy"] = "fill_first"
        async with gateway(config, gateway_clock) as url:
            client = openai_client(url)
            try:
                first = await ask(client)
                second = await ask(client)
                third = await ask(client)
            finally:
                await client.close()
    assert first[:2] == ("modelscope", "alice")  # upstream says 0 remaining after this one
    assert second[:2] == ("modelscope", "bob")
    assert third[:2] == ("modelscope", "bob")
    assert rejected(sim, "modelscope", "429") == 0
    assert sim.state.stats("modelscope")["by_token"]["alice"]["used"] == 50


async def test_cherry_studio_style_client(sim: Simulator, gateway_clock: GatewayClock) -> None:
    """Base URL http://host:port (Cherry appends /v1), both auth headers, streamed usage."""
    async with gateway(config_for(sim), gateway_clock) as base, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "X-Api-Key": CLIENT_KEY}
        async with http.get(f"{base}/v1/models", headers=headers) as response:
            assert response.status == 200
            ids = [m["id"] for m in (await response.json())["data"]]
        assert MODEL in ids
        assert "qwen3-32b" in ids
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["x-router-provider"] == "modelscope"
            assert len(response.headers["x-request-id"]) >= 8
            text = (await response.read()).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = [orjson.loads(e)["usage"] for e in events[:-1] if orjson.loads(e).get("usage")]
    assert usage
    assert usage[-1]["total_tokens"] > 0


async def test_embeddings(sim: Simulator, gateway_clock: GatewayClock) -> None:
    async with gateway(config_for(sim), gateway_clock) as url:
        client = openai_client(url)
        try:
            result = await client.embeddings.create(
                model="Qwen/Qwen3-Embedding-8B", input=["a", "b"], encoding_format="float"
            )
        finally:
            await client.close()
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
