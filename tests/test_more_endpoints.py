"""ModelScope's other APIs through the same quota engine: images, tasks, Anthropic, passthrough."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.simulator import Simulator
from tests.conftest import MODEL, GatewayClock
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, GatewayProcess, gateway
from tests.test_gateway import config_for

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
IMAGE_MODEL = "Qwen/Qwen-Image"


async def call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers={**AUTH, **(headers or {})}) as r,
    ):
        text = await r.text()
        data = await r.json() if r.content_type == "application/json" else text
        return r.status, data, dict(r.headers)


async def make_image(url: str) -> tuple[int, Any, dict[str, str]]:
    return await call(
        "POST",
        f"{url}/v1/images/generations",
        {"model": IMAGE_MODEL, "prompt": "a cat"},
        {"X-ModelScope-Async-Mode": "true"},
    )


async def poll(url: str, task_id: str) -> tuple[int, Any, dict[str, str]]:
    return await call(
        "GET", f"{url}/v1/tasks/{task_id}", headers={"X-ModelScope-Task-Type": "image_generation"}
    )


async def test_image_task_is_polled_at_the_key_that_made_it(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = config_for(sim)
    config["providers"][0]["strategy"] = "round_robin"
    async with gateway(config, gateway_clock) as url:
        status, created, headers = await make_image(url)
        assert status == 200
        maker = headers["x-router-key"]
        for _ in range(3):  # round robin: polls would land on other keys if routed by quota
            status, task, poll_headers = await poll(url, created["task_id"])
            assert status == 200
            assert task["task_status"] == "SUCCEED"
            assert poll_headers["x-router-key"] == maker
        status, missing, _ = await poll(url, "no-such-task")
        assert status == 404
        assert missing["error"]["code"] == "task_not_found"
    by_token = sim.state.stats("modelscope")["by_token"]
    assert sum(t["used"] for t in by_token.values()) == 1  # polls are not calls


@pytest.mark.slow
async def test_a_task_made_on_one_replica_is_polled_on_another(
    sim: Simulator, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = config_for(sim, store_url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    one, two = GatewayProcess(config, tmp_path, "one"), GatewayProcess(config, tmp_path, "two")
    try:
        await one.start()
        await two.start()
        status, created, headers = await make_image(one.url)
        assert status == 200
        status, task, poll_headers = await poll(two.url, created["task_id"])
    finally:
        one.stop()
        two.stop()
    assert status == 200
    assert task["task_status"] == "SUCCEED"
    assert poll_headers["x-router-key"] == headers["x-router-key"]


async def test_anthropic_messages_share_the_quota(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    async with gateway(config_for(sim, bailian_limit=0), gateway_clock) as url:
        status, message, _ = await call("POST", f"{url}/v1/messages", body, headers)
        assert status == 200
        assert message["type"] == "message"
        assert "sim reply from modelscope" in message["content"][0]["text"]
        status, text, _ = await call(
            "POST", f"{url}/v1/messages", {**body, "stream": True}, headers
        )
        assert status == 200
        assert isinstance(text, str)
        assert "event: message_stop" in text
        for _ in range(4):  # the rest of the pool: 3 keys x 2
            await call(
                "POST", f"{url}/v1/chat/completions", {"model": MODEL, "messages": body["messages"]}
            )
        status, error, _ = await call("POST", f"{url}/v1/messages", body, headers)
    assert status == 429
    assert error["type"] == "error"  # Anthropic's error shape on the Anthropic endpoint
    assert error["error"]["type"] == "rate_limit_error"
    assert sim.state.stats("modelscope")["rejected"].get("429", 0) == 0


async def test_passthrough_only_for_allow_listed_paths(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = config_for(sim)
    config["providers"][0]["passthrough"] = ["embeddings-alt"]
    async with gateway(config, gateway_clock) as url:
        for method, path in (
            ("POST", "/v1/audio/speech"),
            ("POST", "/v1/embeddings-alt/../../admin"),
            ("POST", "/v1/embeddings-alt%2F..%2Fx"),
            ("POST", "/v1/%2e%2e/healthz"),
            ("GET", "/v1/embeddings-alt"),
        ):
            async with (
                aiohttp.ClientSession() as http,
                http.request(
                    method, aiohttp.client.URL(f"{url}{path}", encoded=True), json={}, headers=AUTH
                ) as r,
            ):
                assert r.status in (404, 405), (method, path, r.status)
                assert (await r.json())["error"]["type"] == "invalid_request_error"
        # an allow-listed path goes to the provider that declares it (the simulator has no such
        # endpoint and answers 404: the gateway passes that on as the model/route being unknown)
        status, _, _ = await call("POST", f"{url}/v1/embeddings-alt", {"input": "x"})
        assert status == 404
    assert sim.state.stats()["calls"] == 0
