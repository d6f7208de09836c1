"""Tests of the upstream simulator (ModelScope and Bailian stand-ins) over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI, RateLimitError

from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
    default_simulator_config,
    load_simulator_config,
    parse_rule,
    quota_day,
    run_simulator,
)
from router.simulator.app import ragged
from router.simulator.faults import Faults
from router.simulator.sse import BAD_USAGE

MS_HEADERS = (
    "modelscope-ratelimit-requests-limit",
    "modelscope-ratelimit-requests-remaining",
    "modelscope-ratelimit-model-requests-limit",
    "modelscope-ratelimit-model-requests-remaining",
)
QWEN = "Qwen/Qwen3-32B"
DSV3 = "deepseek-ai/DeepSeek-V3.1"
R1 = "deepseek-ai/DeepSeek-R1-0528"
EMBED = "Qwen/Qwen3-Embedding-8B"
IMAGE = "Qwen/Qwen-Image"
RETIRED = "Qwen/QwQ-32B-Preview"
# 2026-03-10 10:00:00 in Shanghai (02:00 UTC)
START = datetime(2026, 3, 10, 2, 0, tzinfo=UTC).timestamp()
NEXT_MIDNIGHT = datetime(2026, 3, 10, 16, 0, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_config(**overrides: Any) -> SimulatorConfig:
    ms = ModelScopeConfig(
        tokens=[
            ModelScopeToken(
                secret="ms-alice",
                name="alice",
                daily_limit=5,
                model_daily_limit=3,
                model_limits={DSV3: 1},
            ),
            ModelScopeToken(secret="ms-bob", name="bob"),
            ModelScopeToken(secret="ms-unbound", name="unbound", status="unbound"),
            ModelScopeToken(secret="ms-unverified", name="unverified", status="unverified"),
        ],
        **overrides.pop("modelscope", {}),
    )
    bl = BailianConfig(
        keys=[
            BailianKey(secret="sk-ok", name="main", daily_limit=2),
            BailianKey(secret="sk-arrears", name="arrears", status="arrears"),
            BailianKey(secret="sk-invalid", name="invalid", status="invalid"),
        ],
        **overrides.pop("bailian", {}),
    )
    return SimulatorConfig(modelscope=ms, bailian=bl, **overrides)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with Simulator(make_config(), clock=clock) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat_body(model: str = QWEN, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def post(
    http: aiohttp.ClientSession, url: str, secret: str | None, body: Any, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    headers = auth(secret) if secret else {}
    headers.update(kw.pop("headers", {}))
    async with http.post(url, json=body, headers=headers, **kw) as resp:
        raw = await resp.read()
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = raw.decode()
        return resp.status, data, dict(resp.headers)


async def ms_chat(
    http: aiohttp.ClientSession,
    sim: Simulator,
    secret: str | None = "ms-alice",
    client_timeout: aiohttp.ClientTimeout | None = None,
    **body: Any,
) -> tuple[int, Any, dict[str, str]]:
    url = f"{sim.modelscope_url}/chat/completions"
    kw: dict[str, Any] = {"timeout": client_timeout} if client_timeout else {}
    return await post(http, url, secret, chat_body(**body), **kw)


async def bl_chat(
    http: aiohttp.ClientSession, sim: Simulator, secret: str | None = "sk-ok", **body: Any
) -> tuple[int, Any, dict[str, str]]:
    body.setdefault("model", "qwen3-32b")
    return await post(http, f"{sim.bailian_url}/chat/completions", secret, chat_body(**body))


def rl(headers: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(headers[h]) for h in MS_HEADERS)


async def wait_until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def parse_sse(text: str) -> list[Any]:
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


# -- listing, success, headers ------------------------------------------------------------
async def test_models_listing_without_auth(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sim.modelscope_url}/models") as resp:
        assert resp.status == 200
        data = await resp.json()
        assert not any(h in resp.headers for h in MS_HEADERS)
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    for model in (QWEN, DSV3, EMBED, "moonshotai/Kimi-K2-Instruct"):
        assert model in ids
    qwen = next(m for m in data["data"] if m["id"] == QWEN)
    assert qwen["object"] == "model"
    assert qwen["owned_by"] == "Qwen"
    # a bad token changes nothing, and listing costs nothing
    async with http.get(f"{sim.modelscope_url}/models", headers=auth("nope")) as resp:
        assert resp.status == 200
    assert sim.state.stats("modelscope")["calls"] == 0


async def test_bailian_models_need_a_key(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sim.bailian_url}/models") as resp:
        assert resp.status == 401
    async with http.get(f"{sim.bailian_url}/models", headers=auth("sk-ok")) as resp:
        assert resp.status == 200
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert "qwen3-32b" in ids
    assert "text-embedding-v4" in ids


async def test_chat_names_token_and_headers_count_down(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, body, headers = await ms_chat(http, sim)
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == QWEN
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == f"sim reply from modelscope/alice for {QWEN}"
    assert "ms-alice" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert rl(headers) == (5, 4, 3, 2)
    _, _, headers = await ms_chat(http, sim)
    assert rl(headers) == (5, 3, 3, 1)
    _, _, headers = await ms_chat(http, sim, model=DSV3)
    assert rl(headers) == (5, 2, 1, 0)


async def test_per_model_cap(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert (await ms_chat(http, sim, model=DSV3))[0] == 200
    status, body, headers = await ms_chat(http, sim, model=DSV3)
    assert status == 429
    assert body["errors"]["message"] == (
        f"You have exceeded today's quota for model {DSV3}, please try again tomorrow"
    )
    assert body["errors"]["request_id"]
    assert rl(headers) == (5, 4, 1, 0)
    # another model of the same token still works
    assert (await ms_chat(http, sim, model=QWEN))[0] == 200
    stats = sim.state.stats("modelscope")
    assert stats["calls"] == 2
    assert stats["rejected"] == {"429": 1}
    assert stats["by_token"]["alice"] == {"used": 2, "models": {DSV3: 1, QWEN: 1}}


async def test_daily_cap(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for model in (QWEN, QWEN, QWEN, DSV3, R1):
        assert (await ms_chat(http, sim, model=model))[0] == 200
    status, body, headers = await ms_chat(http, sim, model="moonshotai/Kimi-K2-Instruct")
    assert status == 429
    assert body == {
        "errors": {"message": "Request limit exceeded.", "request_id": body["errors"]["request_id"]}
    }
    assert rl(headers) == (5, 0, 3, 3)


async def test_day_resets_at_shanghai_midnight(
    sim: Simulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim.state.modelscope.set_usage("alice", used=5)
    assert (await ms_chat(http, sim))[0] == 429
    clock.t = NEXT_MIDNIGHT - 1  # 23:59:59 in Shanghai
    assert (await ms_chat(http, sim))[0] == 429
    clock.t = NEXT_MIDNIGHT
    status, _, headers = await ms_chat(http, sim)
    assert status == 200
    assert rl(headers) == (5, 4, 3, 2)
    assert sim.state.stats("modelscope")["quota_day"] == "2026-03-11"


def test_quota_day_boundaries() -> None:
    assert quota_day(NEXT_MIDNIGHT - 1) == date(2026, 3, 10)
    assert quota_day(NEXT_MIDNIGHT) == date(2026, 3, 11)
    assert quota_day(START) == date(2026, 3, 10)


async def test_clock_advance_over_http(
    sim: Simulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim.state.modelscope.set_usage("alice", used=5)
    async with http.post(f"{sim.modelscope_root}/_sim/clock", json={"advance": 86400}) as resp:
        assert resp.status == 200
        assert (await resp.json())["quota_day"] == "2026-03-11"
    assert (await ms_chat(http, sim))[0] == 200
    async with http.post(f"{sim.modelscope_root}/_sim/clock", json={"advance": "x"}) as resp:
        assert resp.status == 400


async def test_headers_never_negative_and_can_be_turned_off(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    async with Simulator(make_config(), clock=clock) as sim:
        sim.state.modelscope.set_usage("alice", used=50, model=QWEN, model_used=70)
        status, _, headers = await ms_chat(http, sim)
        assert status == 429
        assert rl(headers) == (5, 0, 3, 0)
    config = make_config(modelscope={"ratelimit_headers": False})
    async with Simulator(config, clock=clock) as sim:
        status, _, headers = await ms_chat(http, sim)
        assert status == 200
        assert not any(h in headers for h in MS_HEADERS)


# -- ModelScope errors --------------------------------------------------------------------
async def test_auth_failures(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body, headers = await ms_chat(http, sim, secret=None)
    assert status == 401
    assert body["errors"]["message"] == (
        "Authentication failed, please make sure that a valid ModelScope token is supplied."
    )
    status, body, _ = await ms_chat(http, sim, secret="ms-nobody")
    assert status == 401
    assert "valid ModelScope token" in body["errors"]["message"]
    status, body, headers = await ms_chat(http, sim, secret="ms-unbound")
    assert status == 401
    assert body["error"]["message"] == "Please bind your Alibaba Cloud account before use."
    assert body["request_id"]
    assert not any(h in headers for h in MS_HEADERS)
    status, body, _ = await ms_chat(http, sim, secret="ms-unverified")
    assert status == 403
    assert body["error"]["message"].endswith(
        "please make sure your associated Aliyun account is real name verified."
    )
    stats = sim.state.stats("modelscope")
    assert stats["calls"] == 0
    assert stats["rejected"] == {"401": 3, "403": 1}


async def test_unknown_model(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body, headers = await ms_chat(http, sim, model="acme/Nope-1B")
    assert status == 400
    assert body["errors"]["message"] == "Model id : acme/Nope-1B , has no provider supported"
    assert body["errors"]["request_id"]
    assert rl(headers)[:2] == (5, 5)


async def test_retired_model_insufficient_balance(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await ms_chat(http, sim, model=RETIRED)
    assert status == 429
    assert body["error"] == {
        "http_code": "429",
        "message": "insufficient balance (1008)",
        "type": "insufficient_balance_error",
    }
    assert body["request_id"]
    assert sim.state.stats("modelscope")["calls"] == 0


async def test_bad_requests(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.modelscope_url}/chat/completions"
    async with http.post(url, data=b"{not json", headers=auth("ms-alice")) as resp:
        assert resp.status == 400
        assert "errors" in await resp.json()
    status, _, _ = await post(http, url, "ms-alice", {"messages": []})
    assert status == 400
    status, _, _ = await post(http, url, "ms-alice", {"model": QWEN})
    assert status == 400
    assert sim.state.stats("modelscope")["calls"] == 0


async def test_thinking_needs_stream(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body, _ = await ms_chat(http, sim, enable_thinking=True)
    assert status == 400
    assert body["error"]["message"] == "enable thinking can not be support when stream=False."
    assert body["error"]["type"] == "invalid_request_error"
    # thinking off, or streamed: fine
    assert (await ms_chat(http, sim, enable_thinking=False))[0] == 200
    url = f"{sim.modelscope_url}/chat/completions"
    async with http.post(
        url, json=chat_body(enable_thinking=True, stream=True), headers=auth("ms-alice")
    ) as resp:
        assert resp.status == 200
        events = parse_sse(await resp.text())
    reasoning = [
        e for e in events[:-1] if e["choices"] and "reasoning_content" in e["choices"][0]["delta"]
    ]
    assert reasoning
    assert sim.state.stats("modelscope")["calls"] == 2


# -- streaming ----------------------------------------------------------------------------
async def test_stream_chunks_usage_and_done(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.modelscope_url}/chat/completions"
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(url, json=body, headers=auth("ms-bob")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert rl(dict(resp.headers)) == (2000, 1999, 500, 499)
        events = parse_sse(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert len(pieces) == 5
    assert all(pieces)
    assert "".join(pieces) == f"sim reply from modelscope/bob for {QWEN}"
    assert chunks[6]["choices"][0]["finish_reason"] == "stop"
    assert chunks[7]["choices"] == []
    assert chunks[7]["usage"]["total_tokens"] > 0
    assert len(chunks) == 8
    # without include_usage: no usage chunk
    async with http.post(url, json=chat_body(stream=True), headers=auth("ms-bob")) as resp:
        events = parse_sse(await resp.text())
    assert len(events) == 8
    assert all("usage" not in e for e in events[:-1])


async def test_reasoning_model_streams_reasoning(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    url = f"{sim.modelscope_url}/chat/completions"
    async with http.post(url, json=chat_body(R1, stream=True), headers=auth("ms-bob")) as resp:
        events = parse_sse(await resp.text())
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning.startswith("sim reasoning")
    assert content == f"sim reply from modelscope/bob for {R1}"
    # non-streamed reasoning model: reasoning_content on the message
    status, body, _ = await ms_chat(http, sim, secret="ms-bob", model=R1)
    assert status == 200
    assert body["choices"][0]["message"]["reasoning_content"]


async def test_stream_chunk_settings(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    config = make_config(stream_chunks=3, stream_chunk_delay_ms=1)
    async with Simulator(config, clock=clock) as sim:
        url = f"{sim.modelscope_url}/chat/completions"
        async with http.post(url, json=chat_body(stream=True), headers=auth("ms-bob")) as resp:
            events = parse_sse(await resp.text())
    assert len(events) == 1 + 3 + 1 + 1


async def test_openai_sdk_stream_and_non_stream(sim: Simulator) -> None:
    async with AsyncOpenAI(base_url=sim.modelscope_url, api_key="ms-bob", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == f"sim reply from modelscope/bob for {QWEN}"
        assert completion.usage is not None
        stream = await client.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == f"sim reply from modelscope/bob for {QWEN}"
        assert usage is not None
        assert usage.total_tokens > 0
        embedding = await client.embeddings.create(model=EMBED, input=["a", "b"])
        assert len(embedding.data) == 2
        assert len(embedding.data[0].embedding) == 8
    async with AsyncOpenAI(base_url=sim.bailian_url, api_key="sk-ok", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="qwen3-32b", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == "sim reply from bailian/main for qwen3-32b"
        await client.chat.completions.create(
            model="qwen3-32b", messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(RateLimitError) as info:
            await client.chat.completions.create(
                model="qwen3-32b", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.code == "Throttling.AllocationQuota"
    assert sim.state.stats("modelscope")["calls"] == 3


# -- embeddings and images ----------------------------------------------------------------
async def test_embeddings(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.modelscope_url}/embeddings"
    status, body, headers = await post(http, url, "ms-bob", {"model": EMBED, "input": "x"})
    assert status == 200
    assert body["object"] == "list"
    assert body["model"] == EMBED
    assert body["data"][0]["object"] == "embedding"
    assert body["data"][0]["index"] == 0
    vector = body["data"][0]["embedding"]
    assert len(vector) == 8
    assert all(isinstance(v, float) for v in vector)
    assert body["usage"]["total_tokens"] >= 1
    assert rl(headers) == (2000, 1999, 500, 499)
    status, body2, _ = await post(
        http, url, "ms-bob", {"model": EMBED, "input": ["x", "y"], "encoding_format": "float"}
    )
    assert status == 200
    assert [d["index"] for d in body2["data"]] == [0, 1]
    assert body2["data"][0]["embedding"] == vector  # deterministic
    assert body2["data"][1]["embedding"] != vector
    status, _, _ = await post(http, url, "ms-bob", {"model": EMBED, "input": 3})
    assert status == 400
    status, body, _ = await post(
        http, f"{sim.bailian_url}/embeddings", "sk-ok", {"model": "text-embedding-v4", "input": "x"}
    )
    assert status == 200
    assert len(body["data"][0]["embedding"]) == 8


async def test_image_task_flow(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.modelscope_url}/images/generations"
    body = {"model": IMAGE, "prompt": "a cat"}
    status, _, _ = await post(http, url, "ms-bob", body)
    assert status == 400  # async mode header missing
    status, created, headers = await post(
        http, url, "ms-bob", body, headers={"X-ModelScope-Async-Mode": "true"}
    )
    assert status == 200
    task_id = created["task_id"]
    assert rl(headers)[1] == 1999
    task_url = f"{sim.modelscope_url}/tasks/{task_id}"
    task_headers = {"X-ModelScope-Task-Type": "image_generation"}
    async with http.get(task_url, headers={**auth("ms-bob"), **task_headers}) as resp:
        assert resp.status == 200
        task = await resp.json()
    assert task["task_status"] == "SUCCEED"
    assert task["output_images"] == ["http://127.0.0.1/fake.png"]
    async with http.get(task_url, headers={**auth("ms-alice"), **task_headers}) as resp:
        assert resp.status == 404
    async with http.get(task_url, headers=auth("ms-bob")) as resp:
        assert resp.status == 400
    assert sim.state.stats("modelscope")["by_token"]["bob"]["used"] == 1


# -- Bailian ------------------------------------------------------------------------------
def assert_bailian_error(body: Any, code: str) -> None:
    assert set(body) == {"error", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == code
    assert body["error"]["param"] is None
    assert body["error"]["message"]


async def test_bailian_success_and_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body, headers = await bl_chat(http, sim)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "sim reply from bailian/main for qwen3-32b"
    assert not any(h.lower().startswith("modelscope-") for h in headers)
    status, body, _ = await bl_chat(http, sim, secret="sk-wrong")
    assert status == 401
    assert_bailian_error(body, "invalid_api_key")
    status, body, _ = await bl_chat(http, sim, secret="sk-invalid")
    assert status == 401
    status, body, _ = await bl_chat(http, sim, secret="sk-arrears")
    assert status == 400
    assert_bailian_error(body, "Arrearage")
    status, body, _ = await bl_chat(http, sim, model="qwen9-max")
    assert status == 404
    assert_bailian_error(body, "model_not_found")
    status, body, _ = await bl_chat(http, sim, enable_thinking=True)
    assert status == 400
    assert (await bl_chat(http, sim))[0] == 200
    status, body, _ = await bl_chat(http, sim)
    assert status == 429
    assert_bailian_error(body, "Throttling.AllocationQuota")
    stats = sim.state.stats("bailian")
    assert stats["calls"] == 2
    assert stats["by_token"]["main"]["used"] == 2


async def test_bailian_free_tier_only(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    async with Simulator(make_config(bailian={"free_tier_only": True}), clock=clock) as sim:
        sim.state.bailian.set_usage("main", used=2)
        status, body, _ = await bl_chat(http, sim)
        assert status == 403
        assert_bailian_error(body, "AllocationQuota.FreeTierOnly")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("Throttling", 429),
        ("Throttling.RateQuota", 429),
        ("limit_requests", 429),
        ("Throttling.BurstRate", 429),
        ("limit_burst_rate", 429),
        ("Throttling.AllocationQuota", 429),
        ("insufficient_quota", 429),
        ("AllocationQuota.FreeTierOnly", 403),
        ("AccessDenied.Unpurchased", 403),
        ("Arrearage", 400),
        ("invalid_api_key", 401),
    ],
)
async def test_bailian_code_faults(
    sim: Simulator, http: aiohttp.ClientSession, code: str, status: int
) -> None:
    sim.faults.add(f"bailian_code:{code}")
    got, body, _ = await bl_chat(http, sim)
    assert got == status
    assert_bailian_error(body, code)
    assert sim.state.stats("bailian")["calls"] == 0
    assert (await bl_chat(http, sim))[0] == 200


# -- faults -------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_status_faults(sim: Simulator, http: aiohttp.ClientSession, status: int) -> None:
    sim.faults.add(f"status_{status}")
    got, body, headers = await ms_chat(http, sim)
    assert got == status
    assert body["errors"]["message"]
    assert not any(h in headers for h in MS_HEADERS)
    sim.faults.add(f"status_{status}", provider="bailian")
    got, body, _ = await bl_chat(http, sim)
    assert got == status
    assert body["error"]["code"]
    stats = sim.state.stats()
    assert stats["calls"] == 0
    assert stats["modelscope"]["faults_fired"] == {f"status_{status}": 1}
    assert stats["modelscope"]["rejected"] == {str(status): 1}


async def test_throttle_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("throttle")
    status, body, headers = await ms_chat(http, sim)
    assert status == 429
    assert body["errors"]["message"] == (
        f"We have to rate limit you for model {QWEN}. If you need higher limits, "
        "please consider other (commercial) API providers."
    )
    assert rl(headers) == (5, 5, 3, 3)  # not counted
    assert "Retry-After" not in headers
    sim.faults.add("throttle")
    status, body, _ = await bl_chat(http, sim)
    assert status == 429
    assert_bailian_error(body, "Throttling.RateQuota")


async def test_retry_after_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("retry_after:7")
    status, _, headers = await ms_chat(http, sim)
    assert status == 429
    assert headers["Retry-After"] == "7"
    sim.faults.add("retry_after:2", provider="bailian")
    status, body, headers = await bl_chat(http, sim)
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert_bailian_error(body, "Throttling.RateQuota")


async def test_reset_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("reset")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await ms_chat(http, sim)
    assert sim.state.stats("modelscope")["calls"] == 0
    assert (await ms_chat(http, sim))[0] == 200


async def test_hang_fault_ends_when_client_gives_up(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.faults.add("hang")
    with pytest.raises(asyncio.TimeoutError):
        await ms_chat(http, sim, client_timeout=aiohttp.ClientTimeout(total=0.2))
    await wait_until(lambda: sim.state.modelscope.inflight == 0)
    stats = sim.state.stats("modelscope")
    assert stats["calls"] == 0
    assert stats["max_inflight"] == 1
    assert stats["faults_fired"] == {"hang": 1}


async def test_hang_fault_ends_at_shutdown(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with Simulator(make_config(), clock=clock) as sim:
        sim.faults.add("hang")
        request = asyncio.create_task(ms_chat(http, sim))
        await wait_until(lambda: sim.state.modelscope.inflight == 1)
    with pytest.raises(aiohttp.ClientError):
        await request
    assert time.monotonic() - started < 5


async def test_slow_first_byte_and_latency(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("slow_first_byte:60")
    started = time.monotonic()
    status, _, _ = await ms_chat(http, sim)
    assert status == 200
    assert time.monotonic() - started >= 0.06
    assert sim.state.stats("modelscope")["calls"] == 0  # a fault that fired: not counted
    sim.faults.add("latency:60")
    started = time.monotonic()
    status, _, headers = await ms_chat(http, sim)
    assert status == 200
    assert time.monotonic() - started >= 0.06
    assert sim.state.stats("modelscope")["calls"] == 1  # latency is a real answer
    assert rl(headers)[1] == 4


async def test_mid_stream_cut(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("mid_stream_cut")
    url = f"{sim.modelscope_url}/chat/completions"
    received: list[bytes] = []

    async def read_stream() -> None:
        async with http.post(url, json=chat_body(stream=True), headers=auth("ms-alice")) as resp:
            assert resp.status == 200
            async for line in resp.content:
                received.append(line)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_stream()
    events = parse_sse(b"".join(received).decode())
    assert len(events) == 2
    assert "[DONE]" not in events
    sim.faults.add("mid_stream_cut")
    with pytest.raises(aiohttp.ClientPayloadError):
        await ms_chat(http, sim)
    assert sim.state.stats("modelscope")["calls"] == 2  # counted: real answers in progress


async def test_malformed_sse(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("malformed_sse")
    url = f"{sim.modelscope_url}/chat/completions"
    async with http.post(url, json=chat_body(stream=True), headers=auth("ms-alice")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
    assert "[DONE]" not in text
    with pytest.raises(ValueError):  # noqa: PT011
        parse_sse(text)
    assert sim.state.stats("modelscope")["calls"] == 0


async def test_html_and_non_json_faults(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("html_200")
    sim.faults.add("non_json_error")
    url = f"{sim.modelscope_url}/chat/completions"
    async with http.post(url, json=chat_body(), headers=auth("ms-alice")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "<html>" in await resp.text()
    async with http.post(url, json=chat_body(), headers=auth("ms-alice")) as resp:
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert not (await resp.text()).startswith("{")
    assert sim.state.stats("modelscope")["calls"] == 0


async def test_fault_filters_and_order(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.add("status_503", token="bob")  # by name
    sim.faults.add("status_500", token="ms-alice", model=DSV3)  # by secret and model
    sim.faults.add("status_502", count=2)
    # alice/QWEN skips the first two rules and takes the unfiltered one
    assert (await ms_chat(http, sim))[0] == 502
    assert (await ms_chat(http, sim, model=DSV3))[0] == 500
    assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 503
    assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 502
    assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 200
    # Bailian rules do not touch ModelScope requests
    sim.faults.add("status_500", provider="bailian")
    assert (await ms_chat(http, sim))[0] == 200
    assert (await bl_chat(http, sim))[0] == 500
    # count -1 stays until cleared
    sim.faults.add("throttle", count=-1, token="carol-or-nobody")
    sim.faults.add("status_503", count=-1, token="bob")
    for _ in range(3):
        assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 503
    assert sim.faults.clear() == 2
    assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 200


def test_fault_parsing() -> None:
    assert parse_rule("retry_after:5").number == 5
    assert parse_rule({"kind": "latency:20", "count": 3}).count == 3
    rule = parse_rule({"kind": "bailian_code:Throttling"}, "bailian")
    assert rule.arg == "Throttling"
    assert rule.provider == "bailian"
    for bad in (
        "nope",
        "latency",
        "latency:abc",
        "reset:1",
        {"kind": "reset", "count": 0},
        {"kind": "reset", "colour": "red"},
        {"kind": "reset", "provider": "openai"},
    ):
        with pytest.raises(ValueError):  # noqa: PT011
            parse_rule(bad)
    with pytest.raises(ValueError, match="serves"):
        parse_rule({"kind": "reset", "provider": "bailian"}, "modelscope")
    faults = Faults()
    faults.add("reset", provider="modelscope")
    faults.add("hang")
    faults.add("reset", provider="bailian")
    assert [r.spec for r in faults.pending("bailian")] == ["hang", "reset"]
    assert faults.clear("bailian") == 2
    assert len(faults) == 1


# -- concurrency --------------------------------------------------------------------------
async def test_inflight_and_throttle_concurrency(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    config = make_config(modelscope={"throttle_concurrency": 2})
    async with Simulator(config, clock=clock) as sim:
        sim.faults.add("hang", count=2, token="bob")
        hung = [asyncio.create_task(ms_chat(http, sim, secret="ms-bob")) for _ in range(2)]
        await wait_until(lambda: sim.state.modelscope.inflight == 2)
        status, body, _ = await ms_chat(http, sim, secret="ms-bob")
        assert status == 429
        assert body["errors"]["message"].startswith(f"We have to rate limit you for model {QWEN}")
        assert (await ms_chat(http, sim, secret="ms-alice"))[0] == 200  # other token fine
        stats = sim.state.stats("modelscope")
        assert stats["max_inflight"] == 3
        assert stats["inflight"] == 2
        for task in hung:
            task.cancel()
        results = await asyncio.gather(*hung, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        await wait_until(lambda: sim.state.modelscope.inflight == 0)
        assert (await ms_chat(http, sim, secret="ms-bob"))[0] == 200


# -- control API --------------------------------------------------------------------------
async def test_control_api(sim: Simulator, http: aiohttp.ClientSession) -> None:
    root = sim.modelscope_root
    async with http.post(f"{root}/_sim/faults", json={"kind": "status_503", "token": "alice"}) as r:
        assert r.status == 200
        assert (await r.json())["pending"] == 1
    rules = [{"kind": "throttle"}, {"kind": "retry_after:3", "count": 2}]
    async with http.post(f"{root}/_sim/faults", json=rules) as r:
        assert r.status == 200
    async with http.post(f"{root}/_sim/faults", json={"kind": "explode"}) as r:
        assert r.status == 400
        assert "unknown fault kind" in (await r.json())["error"]
    async with http.get(f"{root}/_sim/faults") as r:
        pending = (await r.json())["faults"]
    assert [f["kind"] for f in pending] == ["status_503", "throttle", "retry_after:3"]
    assert all(f["provider"] == "modelscope" for f in pending)
    assert (await bl_chat(http, sim))[0] == 200  # ModelScope faults only
    assert (await ms_chat(http, sim))[0] == 503
    async with http.delete(f"{root}/_sim/faults") as r:
        assert (await r.json())["cleared"] == 2
    assert (await ms_chat(http, sim))[0] == 200

    async with http.post(
        f"{root}/_sim/usage", json={"token": "alice", "used": 4, "model": QWEN, "model_used": 2}
    ) as r:
        assert r.status == 200
        assert (await r.json()) == {"used": 4, "models": {QWEN: 2}}
    status, _, headers = await ms_chat(http, sim)
    assert status == 200
    assert rl(headers) == (5, 0, 3, 0)
    async with http.post(f"{root}/_sim/usage", json={"token": "nobody", "used": 1}) as r:
        assert r.status == 400

    async with http.get(f"{root}/_sim/stats") as r:
        stats = await r.json()
    assert stats["calls"] == 2
    assert stats["by_token"]["alice"] == {"used": 5, "models": {QWEN: 3}}
    assert stats["by_token"]["bob"] == {"used": 0, "models": {}}
    assert stats["rejected"] == {"503": 1}
    assert stats["max_inflight"] == 1
    async with http.get(f"{sim.bailian_root}/_sim/stats") as r:
        assert (await r.json())["calls"] == 1

    await post(http, f"{root}/_sim/faults", None, {"kind": "reset"})
    async with http.post(f"{root}/_sim/reset") as r:
        assert r.status == 200
    assert len(sim.faults) == 0
    async with http.get(f"{root}/_sim/stats") as r:
        stats = await r.json()
    assert stats["calls"] == 0
    assert stats["by_token"]["alice"]["used"] == 0
    assert sim.state.stats("bailian")["calls"] == 1  # the other app is untouched


# -- config and entry points --------------------------------------------------------------
def test_default_config_is_a_small_demo() -> None:
    config = default_simulator_config()
    tokens = config.modelscope.tokens
    assert [t.secret for t in tokens] == ["ms-demo-alice", "ms-demo-bob", "ms-demo-carol"]
    assert [t.name for t in tokens] == ["alice", "bob", "carol"]
    assert all(t.daily_limit == 3 for t in tokens)
    assert config.bailian.keys[0].secret == "sk-demo-bailian"
    assert config.bailian.keys[0].daily_limit == 5
    for model in (QWEN, "Qwen/Qwen3-235B-A22B-Instruct-2507", DSV3, EMBED):
        assert model in config.modelscope.models
    assert "qwen3-32b" in config.bailian.models


def test_load_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        """
modelscope:
  tokens:
    - {secret: ms-a, name: a, daily_limit: 10, model_limits: {"Qwen/Qwen3-32B": 2}}
    - {secret: ms-b, status: unverified}
  models: [Qwen/Qwen3-32B]
  retired_models: []
bailian:
  keys: [{secret: sk-x, daily_limit: 1}]
  free_tier_only: true
latency_ms: 5
stream_chunks: 2
""",
        encoding="utf-8",
    )
    config = load_simulator_config(path)
    a, b = config.modelscope.tokens
    assert a.limit_for(QWEN) == 2
    assert a.limit_for(DSV3) == 500
    assert b.name == "token-1"
    assert b.daily_limit == 2000
    assert config.bailian.keys[0].name == "key-0"
    assert config.bailian.free_tier_only
    assert config.stream_chunks == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert load_simulator_config(empty).modelscope.tokens == []
    dup = tmp_path / "dup.yaml"
    dup.write_text("modelscope: {tokens: [{secret: a, name: x}, {secret: b, name: x}]}\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_simulator_config(dup)


async def test_configured_latency(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    async with Simulator(make_config(latency_ms=50), clock=clock) as sim:
        started = time.monotonic()
        assert (await ms_chat(http, sim))[0] == 200
        assert time.monotonic() - started >= 0.05


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_simulator_until_cancelled(http: aiohttp.ClientSession) -> None:
    ms_port, bl_port = free_port(), free_port()
    task = asyncio.create_task(
        run_simulator(default_simulator_config(), "127.0.0.1", ms_port, bl_port)
    )
    url = f"http://127.0.0.1:{ms_port}/v1/models"
    deadline = time.monotonic() + 5
    while True:
        try:
            async with http.get(url) as resp:
                assert resp.status == 200
                break
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    async with http.post(
        f"http://127.0.0.1:{bl_port}/compatible-mode/v1/chat/completions",
        json=chat_body("qwen3-32b"),
        headers=auth("sk-demo-bailian"),
    ) as resp:
        assert resp.status == 200
        assert "bailian/bailian" in (await resp.json())["choices"][0]["message"]["content"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- usage ----------------------------------------------------------------------------------
def anthropic_events(text: str) -> list[dict[str, Any]]:
    """The data of every event of an Anthropic stream."""
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_anthropic_usage_with_the_prompt_cache(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """The blocks up to the last cache_control are written to the cache the first time and read
    after; input_tokens is the rest of the prompt (Anthropic's convention)."""
    url = f"{sim.modelscope_root}/v1/messages"
    system = [{"type": "text", "text": "a b c d e f", "cache_control": {"type": "ephemeral"}}]
    body = {
        "model": QWEN,
        "max_tokens": 16,
        "system": system,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    first = (await post(http, url, "ms-bob", body))[1]["usage"]
    second = (await post(http, url, "ms-bob", body))[1]["usage"]
    other = (await post(http, url, "ms-alice", body))[1]["usage"]  # another account's cache
    plain = (await post(http, url, "ms-bob", {**body, "system": "a b c d e f"}))[1]["usage"]
    output = len(f"sim reply from modelscope/bob for {QWEN}".split())
    assert first == {
        "input_tokens": 2,
        "cache_creation_input_tokens": 6,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    }
    assert second == {**first, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 6}
    assert other["cache_creation_input_tokens"] == 6
    assert plain == {**first, "input_tokens": 8, "cache_creation_input_tokens": 0}
    async with http.post(url, json={**body, "stream": True}, headers=auth("ms-bob")) as resp:
        events = anthropic_events(await resp.text())
    start = events[0]["message"]["usage"]
    assert start == {**second, "output_tokens": 1}
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": output},
    }


@pytest.mark.parametrize("kind", ["no_usage", "bad_usage"])
async def test_usage_faults(sim: Simulator, http: aiohttp.ClientSession, kind: str) -> None:
    """no_usage: answers that report no usage, even a stream that asked for it; bad_usage:
    a usage object in which no field is a token count. Both are real, counted answers."""
    expected = None if kind == "no_usage" else BAD_USAGE
    url = f"{sim.modelscope_url}/chat/completions"
    sim.faults.add(kind, count=4)
    body = (await post(http, url, "ms-bob", chat_body()))[1]
    assert body.get("usage") == expected
    assert body["choices"][0]["message"]["content"]
    asked = chat_body(stream=True, stream_options={"include_usage": True})
    async with http.post(url, json=asked, headers=auth("ms-bob")) as resp:
        events = parse_sse(await resp.text())
    assert events[-1] == "[DONE]"
    usage_chunks = [e for e in events[:-1] if "usage" in e]
    assert [e["usage"] for e in usage_chunks] == ([] if expected is None else [expected])
    embedded = (
        await post(
            http, f"{sim.modelscope_url}/embeddings", "ms-bob", {"model": EMBED, "input": "x"}
        )
    )[1]
    assert embedded.get("usage") == expected
    messages = {"model": QWEN, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    answer = (await post(http, f"{sim.modelscope_root}/v1/messages", "ms-bob", messages))[1]
    assert answer.get("usage") == expected
    assert sim.state.stats("modelscope")["calls"] == 4
    assert sim.faults.pending() == []


async def test_ragged_sse(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """CRLF line ends, every event in two writes, and no blank line after the last one."""
    sim.faults.add("ragged_sse")
    url = f"{sim.modelscope_url}/chat/completions"
    pieces: list[bytes] = []
    async with http.post(url, json=chat_body(stream=True), headers=auth("ms-alice")) as resp:
        assert resp.status == 200
        async for piece in resp.content.iter_any():
            pieces.append(piece)
    text = b"".join(pieces)
    assert text.endswith(b"\r\n\r\ndata: [DONE]\r\n")
    assert b"\n" not in text.replace(b"\r\n", b"")
    assert len(pieces) > 1  # written in 16 halves, 5 ms apart (the reader may join some)
    events = parse_sse(text.replace(b"\r\n", b"\n").decode() + "\n")
    assert events[-1] == "[DONE]"
    assert len(events) == 8
    assert sim.state.stats("modelscope")["calls"] == 1
    halves = ragged([b"data: 1\n\n", b"data: [DONE]\n\n"])
    assert halves == [b"data:", b" 1\r\n\r\n", b"data: [", b"DONE]\r\n"]
