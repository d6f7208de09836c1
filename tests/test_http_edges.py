"""The gateway as clients meet it over HTTP (issue #11): long Retry-Afters that SDKs must not
sleep through, paths as clients mangle them, Anthropic's error shape, x-request-id everywhere.

Real loopback HTTP against the simulator, with the official openai and anthropic SDKs.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict
from yarl import URL

from router.simulator import Simulator
from tests.conftest import MODEL, GatewayClock, sim_config
from tests.support import CLIENT_KEY, gateway
from tests.test_gateway import config_for

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN_KEY = "sk-test-edges-admin"
METRICS_TOKEN = "edges-metrics-token"
MESSAGES: Any = [{"role": "user", "content": "hi"}]
#: A client-side bound on one SDK call, retries and their sleeps included: an SDK that sleeps
#: a long Retry-After shows as a TimeoutError, not as a test that hangs until pytest-timeout.
SDK_BOUND_S = 20
README = Path(__file__).resolve().parent.parent / "README.md"


class Attempts:
    """Counts the HTTP requests an SDK sends (its retries included)."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request: object) -> None:
        self.count += 1


def anthropic_client(base_url: str, attempts: Attempts | None = None) -> anthropic.AsyncAnthropic:
    """The SDK as users configure it: default retries, only the base URL and key given."""
    hooks: dict[str, Any] = {"request": [attempts]} if attempts is not None else {}
    return anthropic.AsyncAnthropic(
        base_url=base_url,
        api_key=CLIENT_KEY,
        http_client=anthropic.DefaultAsyncHttpxClient(event_hooks=hooks),
    )


def openai_sdk(base_url: str, attempts: Attempts | None = None) -> openai.AsyncOpenAI:
    hooks: dict[str, Any] = {"request": [attempts]} if attempts is not None else {}
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=CLIENT_KEY,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    )


async def spend_the_pool(url: str, calls: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(calls):
            body = {"model": MODEL, "messages": MESSAGES}
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status == 200, await r.text()


async def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    json: Any = None,
    data: bytes | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One raw request, the path sent as given (encoded=True: no client-side normalising)."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            URL(url, encoded=True),
            headers=headers,
            json=json,
            data=data,
            allow_redirects=False,
        ) as r,
    ):
        return r.status, CIMultiDict(r.headers), await r.read()


# -- 1. a long Retry-After must not hang SDKs ----------------------------------------------------


async def test_anthropic_sdk_fails_fast_when_the_pool_is_spent(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    """The anthropic SDK sleeps the whole Retry-After (here ten hours) before it retries,
    unless the answer says x-should-retry: false."""
    attempts = Attempts()
    async with gateway(config_for(sim, bailian_limit=0), gateway_clock) as url:
        await spend_the_pool(url, 6)  # 3 keys x 2, no paid fallback
        client = anthropic_client(url, attempts)
        try:
            async with asyncio.timeout(SDK_BOUND_S):
                with pytest.raises(anthropic.RateLimitError) as info:
                    await client.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
        finally:
            await client.close()
    assert attempts.count == 1  # the SDK did not retry
    headers = info.value.response.headers
    assert headers["retry-after"] == str(10 * 3600)  # still says when the pool is back
    assert headers["x-should-retry"] == "false"
    assert headers["x-request-id"]
    body: Any = info.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "resets at" in body["error"]["message"]


async def test_openai_sdk_does_not_wait_out_a_long_retry_after(gateway_clock: GatewayClock) -> None:
    """The openai SDK sleeps a Retry-After of up to two minutes, twice: 90 s before the reset it
    would wait three minutes for an answer it can have now."""
    gateway_clock.now = datetime(2026, 11, 29, 15, 58, 30, tzinfo=UTC)  # 23:58:30 in Shanghai
    attempts = Attempts()
    async with (
        Simulator(sim_config(2, 2), clock=gateway_clock.seconds) as sim,
        gateway(config_for(sim, bailian_limit=0), gateway_clock) as url,
    ):
        await spend_the_pool(url, 6)
        client = openai_sdk(f"{url}/v1", attempts)
        try:
            async with asyncio.timeout(SDK_BOUND_S):
                with pytest.raises(openai.RateLimitError) as info:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        finally:
            await client.close()
    assert attempts.count == 1
    headers = info.value.response.headers
    assert headers["retry-after"] == "90"
    assert headers["x-should-retry"] == "false"
    body: Any = info.value.body
    assert body["code"] == "pool_exhausted"


async def test_a_short_throttling_cooldown_stays_retryable_and_a_long_one_does_not(
    gateway_clock: GatewayClock,
) -> None:
    async with Simulator(sim_config(2, 2), clock=gateway_clock.seconds) as sim:
        config = config_for(sim)
        del config["providers"][1]  # no paid fallback: the throttled keys are the only route
        del config["providers"][0]["keys"][1:]  # one key: too few for a provider breaker
        async with gateway(config, gateway_clock) as url:
            body = {"model": MODEL, "messages": MESSAGES}
            sim.faults.add("throttle", count=1, provider="modelscope")
            status, headers, raw = await request(
                "POST", f"{url}/v1/chat/completions", AUTH, json=body
            )
            assert status == 429, raw
            assert b'"rate_limited"' in raw
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert "x-should-retry" not in headers  # the SDKs retry it after Retry-After
            gateway_clock.advance(seconds=60)  # the cooldowns are over
            sim.faults.add("retry_after:600", count=1, provider="modelscope")
            status, headers, raw = await request(
                "POST", f"{url}/v1/chat/completions", AUTH, json=body
            )
            assert status == 429, raw
            assert b'"rate_limited"' in raw
            assert headers["Retry-After"] == "600"  # the upstream's own
            assert headers["x-should-retry"] == "false"


# -- 2. paths as clients mangle them -------------------------------------------------------------


async def test_mangled_paths_reach_the_endpoint_with_their_body(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with gateway(config_for(sim), gateway_clock) as url:
        body = {"model": MODEL, "messages": MESSAGES}
        for path in (
            "/v1/v1/chat/completions",
            "//v1//chat/completions",
            "/v1/chat/completions/",
            "/v1/v1//chat/completions/?x=1",
        ):
            status, headers, raw = await request("POST", f"{url}{path}", AUTH, json=body)
            assert status == 200, (path, raw)  # no redirect: the POST body was served
            assert headers["x-router-provider"] == "modelscope"
            assert b'"chat.completion"' in raw
        for path in ("/v1/models/", "/v1//models", "/v1/v1/models"):
            status, _, raw = await request("GET", f"{url}{path}", AUTH)
            assert status == 200, (path, raw)
            assert MODEL.encode() in raw
        # the SDKs with a base URL that ends in a slash, or that has /v1 twice
        client = openai_sdk(f"{url}/v1/v1/")
        try:
            reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True
            )
            parts = [c.choices[0].delta.content async for c in stream if c.choices]
        finally:
            await client.close()
        assert reply.choices[0].message.content
        assert "".join(p or "" for p in parts)
    assert sim.state.stats()["calls"] == 6


async def test_anthropic_sdk_with_the_root_or_a_v1_base_url(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    """The anthropic SDK appends /v1/messages itself: the base URL is the gateway's root; one
    given with /v1 (as for the openai SDK) works as well."""
    async with gateway(config_for(sim), gateway_clock) as url:
        for base in (url, f"{url}/v1", f"{url}/"):
            client = anthropic_client(base)
            try:
                message = await client.messages.create(
                    model=MODEL, max_tokens=16, messages=MESSAGES
                )
            finally:
                await client.close()
            assert message.type == "message"
            assert message.content


async def test_the_readme_anthropic_example_works_as_written(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    """The README's anthropic SDK snippet, only its host and key swapped: the root base URL."""
    text = README.read_text(encoding="utf-8")
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
        if "from anthropic import" in b
    ]
    assert blocks, "the README has no anthropic SDK example"
    async with gateway(config_for(sim), gateway_clock) as url:
        for block in blocks:
            assert 'base_url="http://127.0.0.1:8080"' in block  # the root, not /v1
            code = block.replace("http://127.0.0.1:8080", url)
            code = re.sub(r'api_key="[^"]*"', f'api_key="{CLIENT_KEY}"', code)
            namespace: dict[str, Any] = {}
            await asyncio.to_thread(exec, code, namespace)
            assert namespace["reply"].content
    assert sim.state.stats()["calls"] == len(blocks)


async def test_dot_segments_and_encoded_slashes_are_still_refused(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = config_for(sim)
    config["providers"][0]["passthrough"] = ["embeddings-alt"]
    async with gateway(config, gateway_clock) as url:
        body = {"model": MODEL, "messages": MESSAGES}
        for path in (
            "/v1/v1/../chat/completions",
            "//v1/./chat/completions/",
            "/v1//chat%2Fcompletions",
            "/v1/v1/chat%2fcompletions/",
            "/v1/%2e%2e/v1/chat/completions/",
            "/v1//embeddings-alt/../../admin/",
            "/v1/v1/embeddings-alt%2F..%2Fx",
            "/v1/chat/completions/..",
            "/v1/chat/completions/./",
            "//admin/../metrics",
            "/v1/chat\\completions/",
        ):
            status, headers, raw = await request("POST", f"{url}{path}", AUTH, json=body)
            assert status in (404, 405), (path, status, raw)
            assert raw.startswith(b'{"error":{'), (path, raw)
            assert b'"invalid_request_error"' in raw
            assert headers["x-request-id"]
        # the allow-listed passthrough path itself, mangled, still reaches its provider
        status, _, raw = await request("POST", f"{url}/v1/v1/embeddings-alt/", AUTH, json={})
        # the simulator has no such endpoint: its 404 is passed on as the model being unknown
        assert status == 404
        assert b'"model_not_found"' in raw
    assert sim.state.stats()["calls"] == 0


async def test_errors_on_anthropic_paths_come_in_anthropic_s_shape(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = config_for(sim)
    config["server"]["max_body_bytes"] = 4096
    async with gateway(config, gateway_clock) as url:
        wrong = anthropic.AsyncAnthropic(base_url=url, api_key="sk-wrong", max_retries=0)
        client = anthropic_client(url)
        try:
            with pytest.raises(anthropic.AuthenticationError) as unauthorized:
                await wrong.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
            with pytest.raises(anthropic.NotFoundError) as unknown_model:
                await client.messages.create(
                    model="no/such-model", max_tokens=16, messages=MESSAGES
                )
            with pytest.raises(anthropic.NotFoundError) as unknown_path:
                await client.messages.count_tokens(model=MODEL, messages=MESSAGES)
            with pytest.raises(anthropic.BadRequestError) as bad:
                await client.messages.create(model=MODEL, max_tokens=16, messages=[])
            big: Any = [{"role": "user", "content": "x" * 8192}]
            with pytest.raises(anthropic.APIStatusError) as too_large:
                await client.messages.create(model=MODEL, max_tokens=16, messages=big)
        finally:
            await wrong.close()
            await client.close()
        expected = [
            (unauthorized, 401, "authentication_error"),
            (unknown_model, 404, "not_found_error"),
            (unknown_path, 404, "not_found_error"),
            (bad, 400, "invalid_request_error"),
            (too_large, 413, "request_too_large"),
        ]
        for info, status, kind in expected:
            error = info.value
            assert error.status_code == status
            assert error.body == {
                "type": "error",
                "error": {"type": kind, "message": error.body["error"]["message"]},  # type: ignore[index]
            }
            assert error.response.headers["x-request-id"]
        # the same on a mangled path, and a route error (not the proxy's) on the way
        status, _, raw = await request("POST", f"{url}/v1/v1/messages/batches/", AUTH, json={})
        assert status == 404
        assert raw.startswith(b'{"type":"error","error":{"type":"not_found_error"')
    assert sim.state.stats()["calls"] == 0


# -- 3. x-request-id on every answer -------------------------------------------------------------


async def test_every_answer_carries_x_request_id(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = config_for(sim)
    config["server"]["max_body_bytes"] = 4096
    config["admin"] = {"key": ADMIN_KEY}
    config["metrics"] = {"token": METRICS_TOKEN}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    metrics = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with gateway(config, gateway_clock) as url:
        cases: list[tuple[str, str, dict[str, str] | None, bytes | None, int]] = [
            ("GET", "/v1/models", AUTH, None, 200),
            ("GET", "/v1/models", None, None, 401),
            ("GET", "/v1/models/", {"Authorization": "Bearer sk-wrong"}, None, 401),
            ("POST", "/v1/chat/completions", None, b"{}", 401),
            ("GET", "/nothing/here", AUTH, None, 404),
            ("POST", "/v1/audio/speech", AUTH, b"{}", 404),
            ("GET", "/v1/chat/completions", AUTH, None, 405),
            ("DELETE", "/healthz", None, None, 405),
            ("POST", "/v1/chat/completions", AUTH, b"x" * 8192, 413),
            ("POST", "/admin/keys/modelscope/alice/disable", admin, b"x" * 8192, 413),
            ("GET", "/healthz", None, None, 200),
            ("GET", "/readyz", None, None, 200),
            ("GET", "/metrics", metrics, None, 200),
            ("GET", "/metrics", None, None, 401),
            ("GET", "/admin/quota", admin, None, 200),
            ("GET", "/admin/quota", None, None, 401),
            ("GET", "/admin/clients", AUTH, None, 403),
            ("POST", "/v1/chat/completions", AUTH, b"not json", 400),
        ]
        ids = set()
        for method, path, headers, data, status in cases:
            got, answer, raw = await request(method, f"{url}{path}", headers, data=data)
            assert got == status, (method, path, got, raw[:200])
            rid = answer.get("x-request-id")
            assert rid is not None, (method, path, answer)
            assert len(rid) >= 8
            ids.add(rid)
        assert len(ids) == len(cases)  # one per request
        # a client's own (well-formed) id is kept, on the gateway's own answers too
        for path in ("/healthz", "/nothing"):
            _, answer, _ = await request("GET", f"{url}{path}", {"X-Request-Id": "trace-42.a_b"})
            assert answer["x-request-id"] == "trace-42.a_b"
    assert sim.state.stats()["calls"] == 0
