"""Security end to end (issue #11): the gateway in this process over loopback HTTP against the
simulator. A client may only reach the models its list allows, under any spelling; only the
client that made an image task may poll it; an upstream answer is read with a size bound; a
body names one model.

Every refusal spends nothing: the counting store was not asked to reserve or settle and the
simulator saw no API call.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.quota.days import QuotaCalendar
from router.simulator import Simulator
from tests.conftest import MODEL, GatewayClock
from tests.support import CLIENT_KEY
from tests.test_admin import ADMIN, ADMIN_KEY
from tests.test_bad_input import CountingStore, Reply, openai_error
from tests.test_gateway import config_for
from tests.test_reload import reloadable, write

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
IMAGE_MODEL = "Qwen/Qwen-Image"
MESSAGES = [{"role": "user", "content": "hi"}]
QWEN_KEY = "sk-test-qwen-only"  # a client with models: ["Qwen/*"]
BARE_KEY = "sk-test-bare-name"  # a client with models: ["deepseek-r1"] (Bailian's own name)
OTHER_KEY = "sk-test-other-team"  # a second client, no model list


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Env:
    url: str
    http: aiohttp.ClientSession
    sim: Simulator
    store: CountingStore

    async def send(
        self, method: str, path: str, body: bytes | None = None, key: str = CLIENT_KEY
    ) -> Reply:
        headers = bearer(key)
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(method, self.url + path, data=body, headers=headers) as r:
            return Reply(r.status, r.headers, await r.read())

    async def chat(self, model: str, key: str = CLIENT_KEY, **extra: Any) -> Reply:
        body = orjson.dumps({"model": model, "messages": MESSAGES, **extra})
        return await self.send("POST", CHAT, body, key)

    def spent(self) -> tuple[int, int, int]:
        """(reserves, settles, upstream API calls) so far: a refusal moves none of them."""
        return self.store.reserves, self.store.settles, self.sim.state.stats()["calls"]


def with_clients(config: dict[str, Any]) -> dict[str, Any]:
    config["clients"] = [
        {"name": "team", "key": CLIENT_KEY},
        {"name": "qwen", "key": QWEN_KEY, "models": ["Qwen/*"]},
        {"name": "bare", "key": BARE_KEY, "models": ["deepseek-r1"]},
        {"name": "other", "key": OTHER_KEY},
    ]
    config["fair_share"] = {"below": 0}  # these tests are about other rules: no share-out
    return config


@asynccontextmanager
async def environment(
    sim: Simulator, clock: GatewayClock, config: dict[str, Any]
) -> AsyncIterator[Env]:
    store = CountingStore()
    app = create_app(
        Settings.model_validate(config), clock=clock, store=store, registry=CollectorRegistry()
    )
    async with running(app) as url, aiohttp.ClientSession() as http:
        yield Env(url, http, sim, store)


# -- 1. the allow-list judges the model really called ---------------------------------------


@pytest.mark.parametrize(
    "model", ["Qwen/deepseek-r1", "Qwen/DeepSeek-R1", "Qwen/deepseek-ai/deepseek-v3.1"]
)
async def test_allow_list_is_not_bypassed_by_the_bailian_renaming(
    sim: Simulator, gateway_clock: GatewayClock, model: str
) -> None:
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        spent = env.spent()
        refused = await env.chat(model, QWEN_KEY)
        message = openai_error(refused, 403, "permission_error", "model_not_allowed", "model")
        assert "qwen" in message
        assert model in message
        assert env.spent() == spent  # nothing reserved, settled or called

        # The same spelling for a client without a list still reaches Bailian's model.
        other = await env.chat(model, OTHER_KEY)
        assert other.status == 200, other.body
        assert other.headers["x-router-provider"] == "bailian"


async def test_allow_list_keeps_the_real_counterparts_of_allowed_models(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        # Qwen/Qwen3-32B: ModelScope first ...
        served = await env.chat(MODEL, QWEN_KEY)
        assert served.status == 200, served.body
        assert served.headers["x-router-provider"] == "modelscope"
        # ... and Bailian's qwen3-32b, its counterpart, once the free pool is spent
        for _ in range(5):
            assert (await env.chat(MODEL, OTHER_KEY)).status == 200
        fallback = await env.chat(MODEL, QWEN_KEY)
        assert fallback.status == 200, fallback.body
        assert fallback.headers["x-router-provider"] == "bailian"
        assert b"qwen3-32b" in fallback.body
        # Bailian's own name is allowed when the list names it, as it is sent
        bare = await env.chat("deepseek-r1", BARE_KEY)
        assert bare.status == 200, bare.body
        assert bare.headers["x-router-provider"] == "bailian"
        # ... but not a spelling that the list does not name, even for the same model
        spent = env.spent()
        refused = await env.chat("Qwen/deepseek-r1", BARE_KEY)
        openai_error(refused, 403, "permission_error", "model_not_allowed", "model")
        assert env.spent() == spent


async def test_models_lists_only_what_the_client_may_call(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    """GET /v1/models for a client with ``models: ["Qwen/*"]`` lists the Qwen ids only; a
    client with no list sees every id."""
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        listed = {}
        for key in (QWEN_KEY, OTHER_KEY):
            reply = await env.send("GET", "/v1/models", key=key)
            assert reply.status == 200, reply.body
            listed[key] = [m["id"] for m in orjson.loads(reply.body)["data"]]
        assert listed[QWEN_KEY], listed
        assert all(m.startswith("Qwen/") for m in listed[QWEN_KEY]), listed[QWEN_KEY]
        assert set(listed[QWEN_KEY]) < set(listed[OTHER_KEY])
        assert listed[QWEN_KEY] == [m for m in listed[OTHER_KEY] if m.startswith("Qwen/")]


# -- 2. tasks belong to their client --------------------------------------------------------


async def make_image(env: Env, key: str) -> Reply:
    body = orjson.dumps({"model": IMAGE_MODEL, "prompt": "a cat"})
    headers = {
        **bearer(key),
        "Content-Type": "application/json",
        "X-ModelScope-Async-Mode": "true",
    }
    async with env.http.post(env.url + IMAGES, data=body, headers=headers) as r:
        return Reply(r.status, r.headers, await r.read())


async def poll(http: aiohttp.ClientSession, url: str, task_id: str, key: str) -> Reply:
    headers = {**bearer(key), "X-ModelScope-Task-Type": "image_generation"}
    async with http.get(f"{url}/v1/tasks/{task_id}", headers=headers) as r:
        return Reply(r.status, r.headers, await r.read())


async def test_only_the_client_that_made_a_task_may_poll_it(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        created = await make_image(env, CLIENT_KEY)
        assert created.status == 200, created.body
        task_id = created.json()["task_id"]

        stranger = await poll(env.http, env.url, task_id, OTHER_KEY)
        message = openai_error(
            stranger, 404, "invalid_request_error", "task_not_found", request_id=False
        )
        assert task_id not in message
        assert b"fake.png" not in stranger.body
        # the same answer as for an id that does not exist: nothing to probe
        unknown = await poll(env.http, env.url, "no-such-task", OTHER_KEY)
        assert unknown.json() == stranger.json()

        owner = await poll(env.http, env.url, task_id, CLIENT_KEY)
        assert owner.status == 200, owner.body
        assert owner.json()["task_status"] == "SUCCEED"
        assert owner.headers["x-router-key"] == created.headers["x-router-key"]


async def test_a_task_whose_key_a_reload_removed_is_a_clear_404(
    sim: Simulator, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    config = with_clients(config_for(sim))
    config["admin"] = {"key": ADMIN_KEY}
    path = tmp_path / "router.yaml"
    write(path, config)
    async with reloadable(path, gateway_clock) as (_app, url), aiohttp.ClientSession() as http:
        env = Env(url, http, sim, CountingStore())
        created = await make_image(env, CLIENT_KEY)
        assert created.status == 200, created.body
        task_id, maker = created.json()["task_id"], created.headers["x-router-key"]

        changed = copy.deepcopy(config)
        keys = changed["providers"][0]["keys"]
        changed["providers"][0]["keys"] = [k for k in keys if k["name"] != maker]
        write(path, changed)
        async with http.post(f"{url}/admin/reload", headers=ADMIN) as r:
            assert r.status == 200, await r.text()

        gone = await poll(http, url, task_id, CLIENT_KEY)
        message = openai_error(
            gone, 404, "invalid_request_error", "task_key_removed", request_id=False
        )
        assert maker in message
        assert "no longer configured" in message
        # to another client the task still does not exist at all
        stranger = await poll(http, url, task_id, OTHER_KEY)
        openai_error(stranger, 404, "invalid_request_error", "task_not_found", request_id=False)


# -- 3. upstream answers are read with a bound ----------------------------------------------


@pytest.mark.parametrize("kind", ["big_body", "big_body_chunked"])
async def test_an_upstream_answer_over_the_bound_is_a_502_and_stays_counted(
    sim: Simulator, gateway_clock: GatewayClock, kind: str
) -> None:
    config = with_clients(config_for(sim))
    config["server"]["max_upstream_body_bytes"] = 4096
    config["providers"][0]["keys"] = config["providers"][0]["keys"][:1]  # alice alone
    async with environment(sim, gateway_clock, config) as env:
        sim.faults.add(f"{kind}:200000", token="alice")
        reply = await env.chat(MODEL)
        message = openai_error(reply, 502, "upstream_error", "upstream_body_too_large")
        assert "4096 bytes" in message
        assert "max_upstream_body_bytes" in message
        # the call was made and stays counted, and no other key or provider was tried
        assert sim.state.stats("modelscope")["by_token"]["alice"]["used"] == 1
        assert sim.state.stats()["calls"] == 1
        assert env.store.settles == 0
        day, _ = QuotaCalendar(ZoneInfo("Asia/Shanghai"), time(0, 0)).window(gateway_clock())
        usage = await env.store.client_usage(day, ["team"])
        assert usage[0].used == 1
        # the key is not blamed: the next call is served by it at once
        again = await env.chat(MODEL)
        assert again.status == 200, again.body
        assert (again.headers["x-router-provider"], again.headers["x-router-key"]) == (
            "modelscope",
            "alice",
        )


# -- 4. one model per body ------------------------------------------------------------------

TWICE: list[tuple[str, bytes]] = [
    (
        "plain",
        b'{"model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "hi"}],'
        b' "model": "deepseek-ai/DeepSeek-V3.1"}',
    ),
    (
        "same_value",
        b'{"model": "Qwen/Qwen3-32B", "model": "Qwen/Qwen3-32B",'
        b' "messages": [{"role": "user", "content": "hi"}]}',
    ),
    (
        "escaped_key",
        b'{"model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "hi"}],'
        b' "mod\\u0065l": "deepseek-ai/DeepSeek-V3.1"}',
    ),
    ("empty_messages", b'{"model": "a", "messages": [], "model": "b"}'),
]


@pytest.mark.parametrize("body", [b for _, b in TWICE], ids=[name for name, _ in TWICE])
async def test_a_body_with_model_twice_is_400_and_spends_nothing(
    sim: Simulator, gateway_clock: GatewayClock, body: bytes
) -> None:
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        # the check comes before the allow-list: the client allowed one of the two learns
        # nothing else, and the one allowed neither is refused the same way
        for key in (CLIENT_KEY, QWEN_KEY):
            reply = await env.send("POST", CHAT, body, key)
            openai_error(reply, 400, "invalid_request_error", "duplicate_model", "model")
        assert env.spent() == (0, 0, 0)


async def test_model_once_with_lookalikes_elsewhere_is_served(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": 'say "model" in \u4e2d\u6587'}],
            "metadata": {"model": "nested keys are not the body's model"},
            "user": "model",
        }
    ).replace("中文".encode(), b"\\u4e2d\\u6587")
    async with environment(sim, gateway_clock, with_clients(config_for(sim))) as env:
        reply = await env.send("POST", CHAT, body)
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == MODEL
