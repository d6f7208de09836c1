"""Bad client input end to end: refused in OpenAI's error shape, before any key is spent.

The gateway runs in this process on an injected, counting memory store; after each refusal
the simulator has seen no API call and the store was never asked to reserve a key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.quota.memory_store import MemoryStore
from router.quota.store import PROBE_PROVIDER
from router.quota.types import NoCapacity, Reservation, ReserveRequest, Settlement, SettleResult
from router.simulator import Simulator
from router.simulator.app import CTX
from router.state import LIVE
from tests.conftest import MODEL, GatewayClock
from tests.support import CLIENT_KEY
from tests.test_gateway import config_for

EMBEDDING_MODEL = "Qwen/Qwen3-Embedding-8B"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]


class CountingStore(MemoryStore):
    """A memory store that counts what the request path asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.reserves = 0
        self.settles = 0

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        self.reserves += req.provider != PROBE_PROVIDER  # /readyz's probe is not a call
        return await super().reserve(req)

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        self.settles += res.provider != PROBE_PROVIDER
        return await super().settle(res, settlement, now_ms)


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Env:
    url: str
    http: aiohttp.ClientSession
    sim: Simulator
    store: CountingStore
    app: web.Application

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = dict(AUTH if headers is None else headers)
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.url + path, data=body, headers=sent) as r:
            return Reply(r.status, r.headers, await r.read())

    async def post(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        return await self.send("POST", path, orjson.dumps(payload), headers)

    def untouched(self) -> None:
        """No upstream API call was made and no key was reserved."""
        stats = self.sim.state.stats()
        assert stats["calls"] == 0
        for provider in ("modelscope", "bailian"):
            assert stats[provider]["rejected"] == {}
            assert stats[provider]["faults_fired"] == {}
        assert self.store.reserves == 0
        assert self.store.settles == 0


@asynccontextmanager
async def environment(
    sim: Simulator, clock: GatewayClock, *, max_body_bytes: int | None = None, clients: bool = True
) -> AsyncIterator[Env]:
    config = config_for(sim, clients=clients)
    if max_body_bytes is not None:
        config["server"]["max_body_bytes"] = max_body_bytes
    store = CountingStore()
    app = create_app(
        Settings.model_validate(config), clock=clock, store=store, registry=CollectorRegistry()
    )
    async with running(app) as url, aiohttp.ClientSession() as http:
        yield Env(url, http, sim, store, app)


@pytest.fixture
async def env(sim: Simulator, gateway_clock: GatewayClock) -> AsyncIterator[Env]:
    async with environment(sim, gateway_clock) as made:
        yield made


def openai_error(
    reply: Reply,
    status: int,
    type_: str,
    code: str,
    param: str | None = None,
    *,
    request_id: bool = True,
) -> str:
    """Check OpenAI's error shape exactly; returns the message."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert isinstance(error["message"], str)
    assert error["message"]
    if request_id:
        assert reply.headers.get("x-request-id")
    assert "x-router-key" not in reply.headers
    assert "Traceback" not in error["message"]
    return str(error["message"])


# -- bodies ---------------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000

BAD_CHAT_BODIES: list[tuple[str, bytes, str, str | None]] = [
    ("not_json", b'{"model": "Qwen/Qwen3-32B", "messages": [', "invalid_json", None),
    ("empty_body", b"", "invalid_json", None),
    ("array", b'[{"model": "Qwen/Qwen3-32B"}]', "invalid_json", None),
    ("string", b'"hello"', "invalid_json", None),
    ("null", b"null", "invalid_json", None),
    ("no_model", orjson.dumps({"messages": MESSAGES}), "invalid_request", "model"),
    ("empty_model", orjson.dumps({"model": "", "messages": MESSAGES}), "invalid_request", "model"),
    (
        "blank_model",
        orjson.dumps({"model": "  ", "messages": MESSAGES}),
        "invalid_request",
        "model",
    ),
    ("number_model", orjson.dumps({"model": 42, "messages": MESSAGES}), "invalid_request", "model"),
    ("no_messages", orjson.dumps({"model": MODEL}), "invalid_request", "messages"),
    (
        "empty_messages",
        orjson.dumps({"model": MODEL, "messages": []}),
        "invalid_request",
        "messages",
    ),
    (
        "string_messages",
        orjson.dumps({"model": MODEL, "messages": "hi"}),
        "invalid_request",
        "messages",
    ),
    (
        "string_stream",
        orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": "true"}),
        "invalid_request",
        "stream",
    ),
    (
        "int_stream",
        orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": 1}),
        "invalid_request",
        "stream",
    ),
    (
        "null_stream",
        orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": None}),
        "invalid_request",
        "stream",
    ),
    ("invalid_utf8", b'{"model": "Qwen/\xff\xfeQwen3", "messages": []}', "invalid_json", None),
    ("lone_surrogate", b'{"model": "\\ud800", "messages": [1]}', "invalid_json", None),
    ("deep_lists", DEEP, "invalid_json", None),
    (
        "deep_messages",
        b'{"model": "Qwen/Qwen3-32B", "messages": ' + DEEP + b"}",
        "invalid_json",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [case[1:] for case in BAD_CHAT_BODIES],
    ids=[case[0] for case in BAD_CHAT_BODIES],
)
async def test_bad_chat_body_is_400_and_spends_nothing(
    env: Env, body: bytes, code: str, param: str | None
) -> None:
    reply = await env.send("POST", CHAT, body)
    openai_error(reply, 400, "invalid_request_error", code, param)
    env.untouched()


BAD_EMBEDDING_BODIES: list[tuple[str, bytes, str, str | None]] = [
    ("not_json", b"{input: [1]}", "invalid_json", None),
    ("no_input", orjson.dumps({"model": EMBEDDING_MODEL}), "invalid_request", "input"),
    (
        "null_input",
        orjson.dumps({"model": EMBEDDING_MODEL, "input": None}),
        "invalid_request",
        "input",
    ),
    (
        "number_input",
        orjson.dumps({"model": EMBEDDING_MODEL, "input": 7}),
        "invalid_request",
        "input",
    ),
    ("no_model", orjson.dumps({"input": "a"}), "invalid_request", "model"),
]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [case[1:] for case in BAD_EMBEDDING_BODIES],
    ids=[case[0] for case in BAD_EMBEDDING_BODIES],
)
async def test_bad_embeddings_body_is_400_and_spends_nothing(
    env: Env, body: bytes, code: str, param: str | None
) -> None:
    reply = await env.send("POST", EMBEDDINGS, body)
    openai_error(reply, 400, "invalid_request_error", code, param)
    env.untouched()


async def test_body_over_max_body_bytes_is_413(sim: Simulator, gateway_clock: GatewayClock) -> None:
    async with environment(sim, gateway_clock, max_body_bytes=1024) as env:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]}
        for path in (CHAT, EMBEDDINGS):
            reply = await env.post(path, payload, {**AUTH, "X-Request-Id": "big-body-1"})
            message = openai_error(reply, 413, "invalid_request_error", "request_too_large")
            assert "1024 bytes" in message
            assert reply.headers["x-request-id"] == "big-body-1"
        # just under the limit still goes through
        small = await env.post(CHAT, {"model": MODEL, "messages": MESSAGES})
        assert small.status == 200, small.body
        assert sim.state.stats()["calls"] == 1
        assert env.store.reserves == 1


async def test_unknown_model_is_404_without_an_upstream_call(env: Env) -> None:
    for path, payload in (
        (CHAT, {"model": "nobody/has-this-model", "messages": MESSAGES}),
        (CHAT, {"model": "nobody/has-this-model", "messages": MESSAGES, "stream": True}),
        (EMBEDDINGS, {"model": "nobody/has-this-embedding", "input": "a"}),
    ):
        reply = await env.post(path, payload)
        message = openai_error(reply, 404, "invalid_request_error", "model_not_found", "model")
        assert str(payload["model"]) in message
    env.untouched()


# -- keys -----------------------------------------------------------------------------------


async def test_missing_and_wrong_keys_are_401(env: Env) -> None:
    good = orjson.dumps({"model": MODEL, "messages": MESSAGES})
    for path in (CHAT, EMBEDDINGS):
        missing = await env.send("POST", path, good, headers={})
        openai_error(missing, 401, "authentication_error", "missing_api_key")
        for headers, code in (
            ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
            ({"X-Api-Key": "sk-wrong"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {CLIENT_KEY}x"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {CLIENT_KEY[:-1]}"}, "invalid_api_key"),
            ({"Authorization": f"Basic {CLIENT_KEY}"}, "missing_api_key"),  # not a bearer
            ({"Authorization": "Bearer sk-wrong", "X-Api-Key": CLIENT_KEY}, "invalid_api_key"),
        ):
            wrong = await env.send("POST", path, good, headers=headers)
            openai_error(wrong, 401, "authentication_error", code)
        # the key is checked before the body: a stranger learns nothing about it
        stranger = await env.send("POST", path, b"{not json", headers={"X-Api-Key": "nope"})
        openai_error(stranger, 401, "authentication_error", "invalid_api_key")
    env.untouched()


async def test_both_header_styles_are_accepted(env: Env) -> None:
    payload = {"model": MODEL, "messages": MESSAGES}
    bearer = await env.post(CHAT, payload, {"Authorization": f"Bearer {CLIENT_KEY}"})
    api_key = await env.post(CHAT, payload, {"X-Api-Key": CLIENT_KEY})
    both = await env.post(
        CHAT, payload, {"Authorization": f"bearer  {CLIENT_KEY}", "X-Api-Key": CLIENT_KEY}
    )
    for reply in (bearer, api_key, both):
        assert reply.status == 200, reply.body
        assert reply.headers["x-router-provider"] == "modelscope"
    assert env.sim.state.stats()["calls"] == 3


async def test_request_id_is_echoed_when_sane_and_made_up_otherwise(env: Env) -> None:
    bad_json = b"{"
    given = await env.send("POST", CHAT, bad_json, {**AUTH, "X-Request-Id": "req-42.a_b"})
    openai_error(given, 400, "invalid_request_error", "invalid_json")
    assert given.headers["x-request-id"] == "req-42.a_b"
    unsafe = await env.send("POST", CHAT, bad_json, {**AUTH, "X-Request-Id": "a b\tc"})
    openai_error(unsafe, 400, "invalid_request_error", "invalid_json")
    assert unsafe.headers["x-request-id"] != "a b\tc"
    unauthorized = await env.send("POST", CHAT, bad_json, {"X-Request-Id": "who-1"})
    openai_error(unauthorized, 401, "authentication_error", "missing_api_key")
    assert unauthorized.headers["x-request-id"] == "who-1"
    env.untouched()


# -- routes ---------------------------------------------------------------------------------


async def test_unknown_path_and_wrong_method_are_openai_errors(env: Env) -> None:
    for method, path in (
        ("GET", "/v1/nothing"),
        ("POST", "/v1/completions"),
        ("POST", "/v2/chat/completions"),
        ("GET", "/"),
    ):
        reply = await env.send(method, path, b"{}" if method == "POST" else None)
        openai_error(reply, 404, "invalid_request_error", "not_found", request_id=False)
    for method, path in (
        ("GET", CHAT),
        ("PUT", CHAT),
        ("DELETE", EMBEDDINGS),
        ("POST", "/v1/models"),
    ):
        reply = await env.send(method, path)
        message = openai_error(
            reply, 405, "invalid_request_error", "method_not_allowed", request_id=False
        )
        assert method in message
    env.untouched()


async def test_health_endpoints_need_no_key_but_models_does(env: Env) -> None:
    healthz = await env.send("GET", "/healthz", headers={})
    assert (healthz.status, healthz.json()) == (200, {"status": "ok"})
    readyz = await env.send("GET", "/readyz", headers={})
    assert (readyz.status, readyz.json()) == (200, {"status": "ready"})
    anonymous = await env.send("GET", "/v1/models", headers={})
    openai_error(anonymous, 401, "authentication_error", "missing_api_key", request_id=False)
    wrong = await env.send("GET", "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    openai_error(wrong, 401, "authentication_error", "invalid_api_key", request_id=False)
    listed = await env.send("GET", "/v1/models", headers={"X-Api-Key": CLIENT_KEY})
    assert listed.status == 200
    assert MODEL in [m["id"] for m in listed.json()["data"]]
    env.untouched()


async def test_open_gateway_serves_without_a_key(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with environment(sim, gateway_clock, clients=False) as env:
        chat = await env.post(CHAT, {"model": MODEL, "messages": MESSAGES}, headers={})
        assert chat.status == 200, chat.body
        assert chat.headers["x-router-provider"] == "modelscope"
        # any key at all is fine too: there is nobody to check it against
        anyone = await env.post(
            CHAT, {"model": MODEL, "messages": MESSAGES}, headers={"X-Api-Key": "whatever"}
        )
        assert anyone.status == 200, anyone.body
        models = await env.send("GET", "/v1/models", headers={})
        assert models.status == 200
        # still validated: a bad body is refused without spending
        bad = await env.send("POST", CHAT, b"[]", headers={})
        openai_error(bad, 400, "invalid_request_error", "invalid_json")
        assert sim.state.stats()["calls"] == 2
        assert env.store.reserves == 2


async def test_a_model_the_catalog_drops_is_no_longer_routed_there(env: Env) -> None:
    """The routes of a (client, endpoint, model) are worked out once and kept until a
    provider's model list changes: a list without the model takes its route away at once."""
    payload = {"model": MODEL, "messages": MESSAGES}
    before = await env.post(CHAT, payload)
    assert before.status == 200, before.body
    assert before.headers["x-router-provider"] == "modelscope"
    env.sim.modelscope_app[CTX].dialect.models.remove(MODEL)  # ModelScope retires it
    runtime = env.app[LIVE].runtime
    assert await runtime.catalog.refresh(runtime.upstreams, runtime.pool)
    calls = env.sim.state.stats()["calls"]
    after = await env.post(CHAT, payload)
    assert after.status == 200, after.body
    assert after.headers["x-router-provider"] == "bailian"  # the paid fallback serves it
    assert env.sim.state.stats()["calls"] == calls + 1
    assert env.sim.state.stats("modelscope")["rejected"] == {}  # no try at ModelScope first
