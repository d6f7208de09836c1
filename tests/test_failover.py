"""Failover end to end: the simulator over real HTTP, the gateway in this process, raw HTTP.

Every test injects one upstream behaviour and checks what the client got (status, body, the
x-router-provider / x-router-key headers) and what the simulator counted: which keys were
called, how many answers it refused, which faults fired. ModelScope keys use ``fill_first``
so "alice first, then bob" is deterministic; cooldowns run on the shared GatewayClock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from router.demo import running
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from router.simulator.config import DEFAULT_MODELSCOPE_MODELS
from router.simulator.dialects import MS_THINKING
from tests.conftest import MODEL, TOKENS, GatewayClock
from tests.support import CLIENT_KEY, gateway, gateway_config
from tests.test_gateway import rejected

OTHER_MODEL = "deepseek-ai/DeepSeek-V3.1"
THIRD_MODEL = "moonshotai/Kimi-K2-Instruct"
RETIRED = "Qwen/QwQ-32B-Preview"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


# -- helpers --------------------------------------------------------------------------------


def make_sim(
    clock: GatewayClock,
    *,
    tokens: list[ModelScopeToken] | None = None,
    bailian_models: list[str] | None = None,
    **modelscope: Any,
) -> Simulator:
    """Three roomy ModelScope tokens (alice, bob, carol) and one Bailian key, unless told."""
    if tokens is None:
        tokens = [
            ModelScopeToken(secret=s, name=n, daily_limit=100, model_daily_limit=100)
            for n, s in TOKENS
        ]
    bailian: dict[str, Any] = {"keys": [BailianKey(secret="sk-test-bailian", name="main")]}
    if bailian_models is not None:
        bailian["models"] = bailian_models
    config = SimulatorConfig(
        modelscope=ModelScopeConfig(tokens=tokens, **modelscope),
        bailian=BailianConfig(**bailian),
    )
    return Simulator(config, clock=clock.seconds)


def config_of(
    sim: Simulator, *, limit: int = 1000, strategy: str = "fill_first", **kw: Any
) -> dict[str, Any]:
    """The gateway's config for ``sim``: its limits are roomier than the simulator's."""
    config = gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[(n, s, limit) for n, s in TOKENS],
        **kw,
    )
    config["providers"][0]["strategy"] = strategy
    return config


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def served(self) -> tuple[str | None, str | None]:
        return self.headers.get("x-router-provider"), self.headers.get("x-router-key")

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[str]:
        """The data fields of an SSE body, in order."""
        text = self.body.decode("utf-8", errors="replace")
        return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def chat(
    http: aiohttp.ClientSession,
    url: str,
    model: str = MODEL,
    *,
    stream: bool = False,
    **extra: Any,
) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    body.update(extra)
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
        return Reply(response.status, response.headers, await response.read())


def served_by(reply: Reply, provider: str, key: str) -> None:
    assert reply.status == 200, reply.body
    assert reply.served == (provider, key)


def stats(sim: Simulator, provider: str) -> dict[str, Any]:
    result: dict[str, Any] = sim.state.stats(provider)  # type: ignore[arg-type]
    return result


def used(sim: Simulator, provider: str = "modelscope") -> dict[str, int]:
    """Calls the simulator counted per token (successful, counted answers only)."""
    return {name: t["used"] for name, t in stats(sim, provider)["by_token"].items()}


# -- transient failures ---------------------------------------------------------------------


async def test_5xx_fails_over_and_the_failed_key_cools_briefly(gateway_clock: GatewayClock) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("status_503", token="alice", count=1)
        first = await chat(http, url)
        served_by(first, "modelscope", "bob")
        assert "bob" in first.json()["choices"][0]["message"]["content"]
        # The clock has not moved: alice is cooling, so fill_first skips her.
        for _ in range(3):
            served_by(await chat(http, url), "modelscope", "bob")
        gateway_clock.advance(seconds=1.5)  # past the first upstream-failure cooldown (1 s)
        served_by(await chat(http, url), "modelscope", "alice")
    assert rejected(sim, "modelscope", "503") == 1
    assert stats(sim, "modelscope")["faults_fired"] == {"status_503": 1}
    assert used(sim) == {"alice": 1, "bob": 4, "carol": 0}
    assert stats(sim, "bailian")["calls"] == 0


async def test_max_attempts_bounds_transient_failures(gateway_clock: GatewayClock) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim, max_attempts=2), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("status_500", count=100)  # every token of every provider
        reply = await chat(http, url)
    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["x-request-id"]
    assert "x-router-key" not in reply.headers
    assert reply.json() == {
        "error": {
            "message": "Every upstream attempt failed (last: server_error); try again shortly.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_failed",
        }
    }
    # exactly two upstream attempts: alice then bob; carol and Bailian never asked
    assert stats(sim, "modelscope")["faults_fired"] == {"status_500": 2}
    assert rejected(sim, "modelscope", "500") == 2
    assert stats(sim, "bailian")["faults_fired"] == {}
    assert stats(sim, "bailian")["rejected"] == {}
    assert sim.state.stats()["calls"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", ["reset", "html_200", "non_json_error"])
async def test_broken_answers_before_the_first_byte_fail_over(
    gateway_clock: GatewayClock, kind: str, stream: bool
) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add(kind, token="alice", count=1)
        reply = await chat(http, url, stream=stream)
    served_by(reply, "modelscope", "bob")
    if stream:
        events = reply.events()
        assert events[-1] == "[DONE]"
        assert b"<html" not in reply.body.lower()
        assert "bob" in "".join(events)
    else:
        assert reply.headers["Content-Type"].startswith("application/json")
        assert "bob" in reply.json()["choices"][0]["message"]["content"]
    assert stats(sim, "modelscope")["faults_fired"] == {kind: 1}
    assert used(sim) == {"alice": 0, "bob": 1, "carol": 0}
    assert stats(sim, "bailian")["calls"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_slow_first_byte_fails_over_before_the_first_byte(
    gateway_clock: GatewayClock, stream: bool
) -> None:
    async with make_sim(gateway_clock) as sim:
        config = config_of(sim)
        config["providers"][0]["timeout_seconds"] = 0.5
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            sim.faults.add("slow_first_byte:3000", token="alice", count=1)
            reply = await chat(http, url, stream=stream)
    served_by(reply, "modelscope", "bob")
    if stream:
        assert reply.events()[-1] == "[DONE]"
    assert stats(sim, "modelscope")["faults_fired"] == {"slow_first_byte:3000": 1}
    assert used(sim) == {"alice": 0, "bob": 1, "carol": 0}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_the_request_deadline_ends_a_hung_upstream_call_with_504(
    gateway_clock: GatewayClock, stream: bool
) -> None:
    """retry.deadline_seconds bounds the wait even when the provider's own timeout is far off;
    the task is left clean: the next request on the same gateway is served."""
    async with make_sim(gateway_clock) as sim:
        config = config_of(sim)
        config["retry"]["deadline_seconds"] = 0.3  # timeout_seconds stays 120
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            sim.faults.add("hang", token="alice", count=1)
            started = time.monotonic()
            reply = await chat(http, url, stream=stream)
            waited = time.monotonic() - started
            after = await chat(http, url, stream=stream)
    assert reply.status == 504, reply.body
    error = orjson.loads(reply.body)["error"]
    assert error["code"] == "upstream_timeout"
    assert "transport_read_timeout" in error["message"]
    assert 0.3 <= waited < 5  # the deadline, not the provider's 120 s
    served_by(after, "modelscope", "bob")  # alice cools after its failure
    assert stats(sim, "modelscope")["faults_fired"] == {"hang": 1}


# -- broken streams -------------------------------------------------------------------------


async def test_stream_cut_mid_way_ends_with_an_error_event_not_done(
    gateway_clock: GatewayClock,
) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("mid_stream_cut", token="alice", count=1)
        reply = await chat(http, url, stream=True)
    # Bytes had reached the client: no failover any more, the stream is alice's.
    assert reply.status == 200
    assert reply.served == ("modelscope", "alice")
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = reply.events()
    assert "[DONE]" not in events
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 2  # the simulator cuts after two chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    error = orjson.loads(events[-1])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_stream_broken"
    assert "broke" in error["message"] or "without [DONE]" in error["message"]
    assert used(sim) == {"alice": 1, "bob": 0, "carol": 0}  # a cut answer is still counted


async def test_malformed_sse_ends_without_a_clean_done(gateway_clock: GatewayClock) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("malformed_sse", token="alice", count=1)
        reply = await chat(http, url, stream=True)
    assert reply.status == 200
    assert reply.served == ("modelscope", "alice")
    assert b"<<<not json>>>" in reply.body  # relayed as it came, not parsed
    events = reply.events()
    assert "[DONE]" not in events
    error = orjson.loads(events[-1])["error"]
    assert error == {
        "message": "the upstream stream ended without [DONE]",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_stream_broken",
    }
    assert stats(sim, "modelscope")["faults_fired"] == {"malformed_sse": 1}


# -- keys and models taken out --------------------------------------------------------------


async def test_rejected_key_is_disabled_once_and_never_tried_again(
    gateway_clock: GatewayClock, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = [
        ModelScopeToken(secret="ms-test-alice", name="alice", status="unbound"),
        ModelScopeToken(secret="ms-test-bob", name="bob"),
        ModelScopeToken(secret="ms-test-carol", name="carol"),
    ]
    caplog.set_level(logging.INFO, logger="router.failover")
    async with (
        make_sim(gateway_clock, tokens=tokens) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        served_by(await chat(http, url), "modelscope", "bob")
        for model in (MODEL, MODEL, OTHER_MODEL, THIRD_MODEL):
            served_by(await chat(http, url, model), "modelscope", "bob")
        gateway_clock.advance(hours=1)  # no cooldown to wait out: disabled is disabled
        served_by(await chat(http, url, stream=True), "modelscope", "bob")
    assert rejected(sim, "modelscope", "401") == 1
    assert used(sim) == {"alice": 0, "bob": 6, "carol": 0}
    disabled = [r for r in caplog.records if "KEY DISABLED" in r.getMessage()]
    assert len(disabled) == 1
    message = disabled[0].getMessage()
    assert disabled[0].levelno == logging.ERROR
    assert "key alice" in message
    assert "Please bind your Alibaba Cloud account" in message
    assert "ms-test-alice" not in caplog.text


async def test_retired_model_goes_to_the_next_route_and_keeps_the_key(
    gateway_clock: GatewayClock,
) -> None:
    # ModelScope still lists the retired model; calling it answers 429 insufficient balance.
    async with make_sim(gateway_clock, models=[*DEFAULT_MODELSCOPE_MODELS, RETIRED]) as sim:
        config = config_of(sim)
        config["models"] = [
            {
                "id": "qwq",
                "routes": [
                    {"provider": "modelscope", "model": RETIRED},
                    {"provider": "bailian", "model": "qwen3-32b"},
                ],
            }
        ]
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            fallback = await chat(http, url, "qwq")
            served_by(fallback, "bailian", "main")
            assert fallback.json()["model"] == "qwen3-32b"
            # one ModelScope key asked, not all three: the model is the problem, not the key
            assert rejected(sim, "modelscope", "429") == 1
            # alice is neither out nor cooling: the next model goes to her at once
            served_by(await chat(http, url, MODEL), "modelscope", "alice")
    assert used(sim) == {"alice": 1, "bob": 0, "carol": 0}
    assert used(sim, "bailian") == {"main": 1}
    assert rejected(sim, "modelscope", "429") == 1


async def test_client_error_is_returned_as_is_after_one_upstream_call(
    gateway_clock: GatewayClock,
) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        reply = await chat(http, url, enable_thinking=True)
    assert reply.status == 400
    assert reply.served == ("modelscope", "alice")
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    # the upstream's own body (with its request_id), not one the gateway wrote
    assert set(body) == {"error", "request_id"}
    assert body["error"] == {
        "message": MS_THINKING,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert stats(sim, "modelscope")["rejected"] == {"400": 1}
    assert stats(sim, "bailian")["rejected"] == {}
    assert sim.state.stats()["calls"] == 0


async def test_model_daily_quota_takes_the_key_out_for_that_model_only(
    gateway_clock: GatewayClock,
) -> None:
    # alice may call MODEL once a day upstream; the gateway thinks 100_000.
    tokens = [
        ModelScopeToken(
            secret=s, name=n, daily_limit=100, model_daily_limit=100, model_limits={MODEL: 1}
        )
        if n == "alice"
        else ModelScopeToken(secret=s, name=n, daily_limit=100, model_daily_limit=100)
        for n, s in TOKENS
    ]
    # Without the remaining headers the gateway learns it from the 429 text alone.
    async with (
        make_sim(gateway_clock, tokens=tokens, ratelimit_headers=False) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        served_by(await chat(http, url), "modelscope", "alice")
        served_by(await chat(http, url), "modelscope", "bob")  # alice: 429 today's quota
        assert rejected(sim, "modelscope", "429") == 1
        served_by(await chat(http, url), "modelscope", "bob")  # alice not asked again
        gateway_clock.advance(hours=2)  # not a cooldown: out until the quota day ends
        served_by(await chat(http, url), "modelscope", "bob")
        served_by(await chat(http, url, OTHER_MODEL), "modelscope", "alice")
    assert rejected(sim, "modelscope", "429") == 1
    assert stats(sim, "modelscope")["by_token"]["alice"]["models"] == {MODEL: 1, OTHER_MODEL: 1}
    assert used(sim) == {"alice": 2, "bob": 3, "carol": 0}


async def test_request_limit_exceeded_is_the_model_first_then_the_whole_key(
    gateway_clock: GatewayClock,
) -> None:
    # alice has one call a day upstream; the gateway thinks 1000, so it meets the 429.
    tokens = [
        ModelScopeToken(secret=s, name=n, daily_limit=1 if n == "alice" else 100) for n, s in TOKENS
    ]
    async with (
        make_sim(gateway_clock, tokens=tokens, ratelimit_headers=False) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        served_by(await chat(http, url), "modelscope", "alice")
        # "Request limit exceeded." once: only MODEL is taken from alice
        served_by(await chat(http, url), "modelscope", "bob")
        served_by(await chat(http, url), "modelscope", "bob")
        assert rejected(sim, "modelscope", "429") == 1
        # a second model refused the same day: the whole key is out
        served_by(await chat(http, url, OTHER_MODEL), "modelscope", "bob")
        assert rejected(sim, "modelscope", "429") == 2
        served_by(await chat(http, url, THIRD_MODEL), "modelscope", "bob")
        served_by(await chat(http, url, OTHER_MODEL), "modelscope", "bob")
    assert rejected(sim, "modelscope", "429") == 2
    assert used(sim) == {"alice": 1, "bob": 5, "carol": 0}


async def test_retry_after_cools_the_key_exactly_that_long(gateway_clock: GatewayClock) -> None:
    async with (
        make_sim(gateway_clock) as sim,
        gateway(config_of(sim), gateway_clock) as url,
        aiohttp.ClientSession() as http,
    ):
        sim.faults.add("retry_after:5", token="alice", count=1)
        served_by(await chat(http, url), "modelscope", "bob")
        served_by(await chat(http, url), "modelscope", "bob")
        gateway_clock.advance(seconds=4)  # longer than the 2 s default of a throttle: still cooling
        served_by(await chat(http, url), "modelscope", "bob")
        gateway_clock.advance(seconds=2)  # 6 s after the 429
        served_by(await chat(http, url), "modelscope", "alice")
    assert rejected(sim, "modelscope", "429") == 1
    assert stats(sim, "modelscope")["faults_fired"] == {"retry_after:5": 1}
    assert used(sim) == {"alice": 1, "bob": 3, "carol": 0}


async def test_spent_routes_and_unknown_routes_give_429_not_404(
    gateway_clock: GatewayClock,
) -> None:
    # The gateway's (stale) list says Bailian serves qwen3-32b; Bailian answers 404.
    async with make_sim(gateway_clock, bailian_models=["text-embedding-v4"]) as sim:
        config = config_of(sim, limit=1)
        config["providers"][1]["models"] = ["qwen3-32b"]
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            for key in ("alice", "bob", "carol"):
                served_by(await chat(http, url), "modelscope", key)
            reply = await chat(http, url)
    assert reply.status == 429, reply.body
    assert reply.headers["Retry-After"] == str(10 * 3600)  # 14:00 in Shanghai: 10 h to reset
    error = reply.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "pool_exhausted"
    assert error["message"].startswith(f"The daily quota pool for '{MODEL}' is spent")
    assert rejected(sim, "bailian", "404") == 1
    assert used(sim) == {"alice": 1, "bob": 1, "carol": 1}


async def test_unknown_on_every_route_gives_404(gateway_clock: GatewayClock) -> None:
    # ModelScope lists the retired model (429 insufficient balance); the gateway's stale list
    # says Bailian serves qwen3-32b, Bailian answers 404.
    async with make_sim(
        gateway_clock,
        models=[*DEFAULT_MODELSCOPE_MODELS, RETIRED],
        bailian_models=["text-embedding-v4"],
    ) as sim:
        config = config_of(sim)
        config["providers"][1]["models"] = ["qwen3-32b"]
        config["models"] = [
            {
                "id": "gone",
                "routes": [
                    {"provider": "modelscope", "model": RETIRED},
                    {"provider": "bailian", "model": "qwen3-32b"},
                ],
            }
        ]
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            reply = await chat(http, url, "gone")
    assert reply.status == 404, reply.body
    assert reply.json() == {
        "error": {
            "message": "The model 'gone' is not served by any configured provider.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    # one key per provider was enough to learn it
    assert rejected(sim, "modelscope", "429") == 1
    assert rejected(sim, "bailian", "404") == 1
    assert sim.state.stats()["calls"] == 0


# -- what goes out --------------------------------------------------------------------------


@asynccontextmanager
async def echo_upstream(seen: list[tuple[CIMultiDict[str], bytes]]) -> AsyncIterator[str]:
    """An OpenAI-type upstream that records what it receives and answers a fixed completion."""

    async def completions(request: web.Request) -> web.Response:
        seen.append((CIMultiDict(request.headers), await request.read()))
        answer = {
            "id": "chatcmpl-echo",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "upstream-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "echo"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    async with running(app) as url:
        yield url


async def test_upstream_sees_only_its_own_key_and_the_clients_body(
    gateway_clock: GatewayClock,
) -> None:
    upstream_secret = "sk-upstream-secret-0123456789"
    seen: list[tuple[CIMultiDict[str], bytes]] = []
    async with echo_upstream(seen) as echo:
        config: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": "memory://"},
            "providers": [
                {
                    "name": "echo",
                    "type": "openai",
                    "base_url": f"{echo}/v1",
                    "models": ["upstream-model"],
                    "keys": [{"name": "k1", "secret": upstream_secret}],
                }
            ],
            "models": [
                {"id": "my-alias", "routes": [{"provider": "echo", "model": "upstream-model"}]}
            ],
            "clients": [{"name": "team", "key": CLIENT_KEY}],
        }
        client_headers = {
            "Authorization": f"Bearer {CLIENT_KEY}",
            "X-Api-Key": CLIENT_KEY,
            "Cookie": "session=cookie-secret-42",
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5, max=100",
            "X-Forwarded-For": "203.0.113.7",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "User-Agent": "client-agent/9.9",
            "Content-Type": "application/json",
        }
        payload = {
            "model": "my-alias",
            "messages": [{"role": "user", "content": "héllo ✓"}],
            "temperature": 0.25,
            "max_tokens": 7,
            "user": "u-1",
            "extra_field": {"nested": [1, 2, {"x": None}]},
        }
        raw = b'{"model":  "upstream-model", "messages": [{"role": "user", "content": "hi"}]}'
        async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
            replies = []
            for body in (orjson.dumps(payload), raw):
                async with http.post(
                    f"{url}/v1/chat/completions", data=body, headers=client_headers
                ) as response:
                    replies.append(Reply(response.status, response.headers, await response.read()))
    for reply in replies:
        served_by(reply, "echo", "k1")
        assert reply.json()["choices"][0]["message"]["content"] == "echo"
        assert upstream_secret not in str(dict(reply.headers))
    assert len(seen) == 2
    forbidden = (
        "x-api-key",
        "cookie",
        "keep-alive",
        "x-forwarded-for",
        "proxy-authorization",
        "x-request-id",
    )
    for headers, _body in seen:
        assert headers.getall("Authorization") == [f"Bearer {upstream_secret}"]
        for name in forbidden:
            assert name not in headers, name
        values = " ".join(headers.values())
        for secret in (CLIENT_KEY, "cookie-secret-42", "203.0.113.7", "cHJveHk6c2VjcmV0"):
            assert secret not in values
        assert "client-agent" not in values
        assert headers["Content-Type"] == "application/json"
    # an alias: the body is the client's, with only the model renamed
    assert orjson.loads(seen[0][1]) == {**payload, "model": "upstream-model"}
    # no rename needed: the very bytes the client sent
    assert seen[1][1] == raw
