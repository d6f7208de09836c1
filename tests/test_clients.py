"""Team features on the request path: client keys, allowed models, paid fallback, daily limits."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from router.simulator import Simulator
from tests.conftest import MODEL, GatewayClock, sim_config
from tests.support import gateway
from tests.test_gateway import config_for

ALICE_KEY = "sk-team-alice-canary"
BOB_KEY = "sk-team-bob-canary"


def team_config(sim: Simulator, **alice: Any) -> dict[str, Any]:
    config = config_for(sim)
    config["clients"] = [
        {"name": "alice", "key_sha256": hashlib.sha256(ALICE_KEY.encode()).hexdigest(), **alice},
        {"name": "bob", "key": BOB_KEY},
    ]
    config["fair_share"] = {"below": 0}  # these tests are about other rules: no share-out
    return config


async def chat(url: str, key: str, model: str = MODEL) -> tuple[int, dict[str, Any], str | None]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, await r.json(), r.headers.get("x-router-provider")


async def test_hashed_client_key_authenticates(sim: Simulator, gateway_clock: GatewayClock) -> None:
    async with gateway(team_config(sim), gateway_clock) as url:
        status, _, provider = await chat(url, ALICE_KEY)
        assert (status, provider) == (200, "modelscope")
        status, body, _ = await chat(url, hashlib.sha256(ALICE_KEY.encode()).hexdigest())
        assert status == 401  # the digest itself is not a key
        assert body["error"]["type"] == "authentication_error"


async def test_model_allow_list(sim: Simulator, gateway_clock: GatewayClock) -> None:
    async with gateway(
        team_config(sim, models=["Qwen/*", "deepseek-ai/DeepSeek-V3.?"]), gateway_clock
    ) as url:
        assert (await chat(url, ALICE_KEY, MODEL))[0] == 200
        assert (await chat(url, ALICE_KEY, "deepseek-ai/DeepSeek-V3.1"))[0] == 200
        status, body, _ = await chat(url, ALICE_KEY, "moonshotai/Kimi-K2-Instruct")
        assert status == 403
        assert body["error"]["code"] == "model_not_allowed"
        assert (await chat(url, BOB_KEY, "moonshotai/Kimi-K2-Instruct"))[0] == 200
    assert sim.state.stats()["calls"] == 3


async def test_client_without_fallback_never_reaches_the_paid_provider(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with gateway(team_config(sim, fallback=False), gateway_clock) as url:
        for _ in range(6):  # the free pool: 3 keys x 2
            assert (await chat(url, ALICE_KEY))[2] == "modelscope"
        status, body, _ = await chat(url, ALICE_KEY)
        assert status == 429
        assert body["error"]["code"] == "pool_exhausted"
        assert (await chat(url, BOB_KEY))[2] == "bailian"  # bob may spill over
    assert sim.state.stats("bailian")["calls"] == 1


async def test_client_daily_limit_names_its_own_limit(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with gateway(team_config(sim, daily_limit=2), gateway_clock) as url:
        assert (await chat(url, ALICE_KEY))[0] == 200
        assert (await chat(url, ALICE_KEY))[0] == 200
        status, body, _ = await chat(url, ALICE_KEY)
        assert status == 429
        assert body["error"]["code"] == "client_daily_limit"
        assert "alice" in body["error"]["message"]
        assert "daily limit of 2 calls" in body["error"]["message"]
        assert (await chat(url, BOB_KEY))[0] == 200  # the pool itself is not spent
        gateway_clock.now = gateway_clock.now.replace(
            hour=16, minute=0
        )  # 00:00 in Shanghai: a new day
        assert (await chat(url, ALICE_KEY))[0] == 200
    assert sim.state.stats()["calls"] == 4


async def test_fair_share_keeps_a_part_of_the_free_pool_for_the_quiet_client(
    gateway_clock: GatewayClock,
) -> None:
    async with Simulator(sim_config(10, 0), clock=gateway_clock.seconds) as sim:
        config = config_for(sim, limit=10, bailian_limit=0)
        config["clients"] = [
            {"name": "alice", "key": ALICE_KEY, "fallback": False},
            {"name": "bob", "key": BOB_KEY, "fallback": False},
        ]
        async with gateway(config, gateway_clock) as url:
            alice = [await chat(url, ALICE_KEY) for _ in range(30)]
            bob = [await chat(url, BOB_KEY) for _ in range(6)]
    # 30 calls in the pool; below 30% (8 left) the rest is split 4 + 4
    assert [status for status, _, _ in alice].count(200) == 22 + 4
    refused = alice[26][1]["error"]
    assert refused["code"] == "client_fair_share"
    assert "alice" in refused["message"]
    assert "share of 4 calls" in refused["message"]
    assert [status for status, _, _ in bob] == [200] * 4 + [429] * 2
    assert bob[4][1]["error"]["code"] == "pool_exhausted"
    assert sim.state.stats("modelscope")["rejected"].get("429", 0) == 0


async def test_client_refusals_until_the_reset_tell_sdks_not_to_retry(
    gateway_clock: GatewayClock,
) -> None:
    """A client's daily limit and its fair share last until the reset (ten hours here): the
    SDKs are told not to retry (x-should-retry: false) instead of sleeping the Retry-After,
    which the anthropic SDK does whatever its length."""
    async with Simulator(sim_config(10, 0), clock=gateway_clock.seconds) as sim:
        config = config_for(sim, limit=10, bailian_limit=0)
        config["clients"] = [
            {"name": "alice", "key": ALICE_KEY, "fallback": False},
            {"name": "bob", "key": BOB_KEY, "fallback": False, "daily_limit": 1},
        ]
        async with gateway(config, gateway_clock) as url:
            bob = anthropic.AsyncAnthropic(base_url=url, api_key=BOB_KEY)  # default retries
            alice = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ALICE_KEY)
            messages: Any = [{"role": "user", "content": "hi"}]
            try:
                async with asyncio.timeout(20):  # a retry after 10 h shows as a TimeoutError
                    await bob.messages.create(model=MODEL, max_tokens=16, messages=messages)
                    with pytest.raises(anthropic.RateLimitError) as limit:
                        await bob.messages.create(model=MODEL, max_tokens=16, messages=messages)
                    for _ in range(25):  # below 30% of the pool, alice's share is spent
                        await alice.chat.completions.create(model=MODEL, messages=messages)
                    with pytest.raises(openai.RateLimitError) as share:
                        await alice.chat.completions.create(model=MODEL, messages=messages)
            finally:
                await bob.close()
                await alice.close()
    body: Any = limit.value.body
    assert body["error"]["type"] == "rate_limit_error"
    assert "daily limit of 1 calls" in body["error"]["message"]
    share_body: Any = share.value.body
    assert share_body["code"] == "client_fair_share"
    for error in (limit.value, share.value):
        assert error.response.headers["x-should-retry"] == "false"
        assert error.response.headers["retry-after"] == str(10 * 3600)
    assert sim.state.stats()["calls"] == 1 + 25
