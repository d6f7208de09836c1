"""The admin API: its key, its numbers, key actions seen by every replica, its OpenAPI."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.admin import MAX_REASON_CHARS, openapi_document
from router.app import create_app
from router.config import Settings
from router.simulator import Simulator
from tests.conftest import MODEL, TOKENS, GatewayClock, sim_config
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, GatewayProcess, gateway
from tests.test_gateway import ask, config_for, openai_client

ADMIN_KEY = "sk-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRETS = [s for _, s in TOKENS] + ["sk-test-bailian", CLIENT_KEY, ADMIN_KEY]


def with_admin(config: dict[str, Any], admin: dict[str, str] | None = None) -> dict[str, Any]:
    return {**config, "admin": admin if admin is not None else {"key": ADMIN_KEY}}


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=body) as response:
        return response.status, await response.json()


def assert_error(answer: tuple[int, Any], status: int, code: str | None = None) -> None:
    got, body = answer
    assert got == status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code


# -- who may call ------------------------------------------------------------------------------


async def test_without_an_admin_key_every_admin_route_is_404(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    async with gateway(config_for(sim), gateway_clock) as url, aiohttp.ClientSession() as http:
        for method, path in [
            ("GET", "/admin/quota"),
            ("GET", "/admin/clients"),
            ("GET", "/admin/usage"),
            ("GET", "/admin/openapi.json"),
            ("POST", "/admin/reload"),
            ("POST", "/admin/keys/modelscope/alice/disable"),
            ("POST", "/admin/keys/modelscope/alice/enable"),
            ("POST", "/admin/keys/modelscope/alice/reset"),
            ("GET", "/admin/nothing-here"),
        ]:
            for headers in (None, ADMIN, {"Authorization": f"Bearer {CLIENT_KEY}"}):
                assert_error(await call(http, method, url + path, headers), 404)
        # the rest of the gateway is unaffected
        status, _ = await call(http, "GET", url + "/healthz")
        assert status == 200


@pytest.mark.parametrize("form", ["key", "key_sha256"])
async def test_admin_key_matrix(sim: Simulator, gateway_clock: GatewayClock, form: str) -> None:
    admin = (
        {"key": ADMIN_KEY}
        if form == "key"
        else {"key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}
    )
    config = with_admin(config_for(sim), admin)
    async with gateway(config, gateway_clock) as url, aiohttp.ClientSession() as http:
        quota = url + "/admin/quota"
        assert_error(await call(http, "GET", quota), 401, "missing_api_key")
        assert_error(await call(http, "GET", quota, {"Authorization": "Bearer "}), 401)
        client = {"Authorization": f"Bearer {CLIENT_KEY}"}
        assert_error(await call(http, "GET", quota, client), 403, "admin_key_required")
        assert_error(await call(http, "GET", quota, {"X-Api-Key": CLIENT_KEY}), 403)
        wrong = {"Authorization": f"Bearer {ADMIN_KEY}x"}
        assert_error(await call(http, "GET", quota, wrong), 401, "invalid_api_key")
        assert_error(
            await call(http, "POST", url + "/admin/keys/modelscope/alice/disable", wrong), 401
        )
        status, body = await call(http, "GET", quota, ADMIN)
        assert status == 200
        assert body["providers"][0]["name"] == "modelscope"
        status, _ = await call(http, "GET", quota, {"X-Api-Key": ADMIN_KEY})
        assert status == 200
        # the admin key is no client key
        status, _ = await call(
            http,
            "POST",
            url + "/v1/chat/completions",
            ADMIN,
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 401


# -- what it reports ---------------------------------------------------------------------------


async def test_quota_and_clients_equal_what_was_served(gateway_clock: GatewayClock) -> None:
    served: list[tuple[str, str]] = []
    # The simulator's per-model limit equals the gateway's (its remaining headers agree).
    config = sim_config(2, 2)
    for token in config.modelscope.tokens:
        token.model_daily_limit = 100_000
    async with (
        Simulator(config, clock=gateway_clock.seconds) as sim,
        gateway(with_admin(config_for(sim)), gateway_clock) as url,
    ):
        client = openai_client(url)
        try:
            for _ in range(7):  # 3 keys x 2, then one call on Bailian
                provider, key, _text = await ask(client)
                served.append((provider, key))
        finally:
            await client.close()
        async with aiohttp.ClientSession(headers=ADMIN) as http:
            status, quota = await call(http, "GET", url + "/admin/quota")
            assert status == 200
            status, clients = await call(http, "GET", url + "/admin/clients")
            assert status == 200

    assert quota["day"] == "2026-11-29"
    assert quota["timezone"] == "Asia/Shanghai"
    # 06:00 UTC is 14:00 in Shanghai: ten hours to the reset
    assert quota["next_reset"]["in_seconds"] == 10 * 3600
    assert quota["next_reset"]["iso"] == "2026-11-30T00:00:00+08:00"
    assert quota["next_reset"]["unix"] == gateway_clock.now.timestamp() + 10 * 3600
    modelscope, bailian = quota["providers"]
    by_token = sim.state.stats("modelscope")["by_token"]
    assert [k["name"] for k in modelscope["keys"]] == [name for name, _ in TOKENS]
    for key in modelscope["keys"]:
        assert key["used"] == by_token[key["name"]]["used"] == 2
        assert (key["limit"], key["remaining"], key["state"]) == (2, 0, "exhausted")
        assert key["reason"]
        assert key["until"] is None
        [model] = key["models"]
        assert model == {
            "model": MODEL,
            "used": 2,
            "limit": 100_000,
            "remaining": 99_998,
            "state": "available",
            "until": None,
        }
    assert (modelscope["used"], modelscope["limit"], modelscope["remaining"]) == (6, 6, 0)
    assert modelscope["paid"] is False
    [main] = bailian["keys"]
    assert main["used"] == sim.state.stats("bailian")["by_token"]["main"]["used"] == 1
    assert (main["limit"], main["remaining"], main["state"]) == (2, 1, "available")
    assert main["models"][0]["model"] == "qwen3-32b"  # Bailian's own name for the model
    assert bailian["paid"] is True
    assert served.count(("bailian", "main")) == 1

    assert clients["day"] == "2026-11-29"
    assert clients["yesterday"] == "2026-11-28"
    assert clients["open"] is False
    [team] = clients["clients"]
    assert team["name"] == "team"
    assert team["today"]["used"] == 7
    assert team["today"]["fair_share"] == []  # one client has nobody to share with
    assert team["yesterday"]["used"] == 0
    assert (team["daily_limit"], team["today"]["remaining"]) == (None, None)
    assert (team["share"], team["models"], team["fallback"]) == (1.0, None, True)


async def test_clients_show_limits_and_fair_shares(
    sim: Simulator, gateway_clock: GatewayClock, tmp_path: Path
) -> None:
    config = with_admin(config_for(sim, store_url=f"sqlite:///{tmp_path / 'q.db'}"))
    config["clients"] = [
        {"name": "team", "key": CLIENT_KEY, "daily_limit": 10, "share": 2},
        {"name": "bots", "key": "sk-test-bots", "models": ["qwen*"], "fallback": False},
    ]
    config["fair_share"] = {"below": 0.5}
    async with gateway(config, gateway_clock) as url:
        client = openai_client(url)
        try:
            for _ in range(5):
                await ask(client)
        finally:
            await client.close()
        async with aiohttp.ClientSession(headers=ADMIN) as http:
            status, clients = await call(http, "GET", url + "/admin/clients")
    assert status == 200
    team, bots = clients["clients"]
    assert (team["name"], team["daily_limit"], team["share"]) == ("team", 10, 2)
    assert (team["today"]["used"], team["today"]["remaining"]) == (5, 5)
    assert team["today"]["free_used"] == 5
    [share] = team["today"]["fair_share"]  # the free pool of 6 was shared out below 3 left
    assert share["provider"] == "modelscope"
    assert share["remaining"] == max(0, share["share"] - share["used"])
    assert share["used"] >= 1
    assert (bots["name"], bots["models"], bots["fallback"]) == ("bots", ["qwen*"], False)
    assert (bots["today"]["used"], bots["daily_limit"], bots["today"]["remaining"]) == (
        0,
        None,
        None,
    )
    assert clients["fair_share"] == {
        "below": 0.5,
        "count": "configured",
        "active_window_seconds": 3600,
    }


async def test_a_throttled_key_shows_cooling_until(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    sim.faults.add("throttle", token="alice", count=1)
    config = with_admin(config_for(sim))
    config["providers"][0]["strategy"] = "fill_first"
    async with gateway(config, gateway_clock) as url:
        client = openai_client(url)
        try:
            assert (await ask(client))[:2] == ("modelscope", "bob")
        finally:
            await client.close()
        async with aiohttp.ClientSession(headers=ADMIN) as http:
            _, quota = await call(http, "GET", url + "/admin/quota")
    alice = quota["providers"][0]["keys"][0]
    cooling = [alice, *alice["models"]]
    until = [item["until"] for item in cooling if item["state"] == "cooling"]
    assert until, alice
    assert until[0]["unix"] > gateway_clock.now.timestamp()
    assert until[0]["iso"].startswith("2026-11-29T14:00:")  # Shanghai time, seconds away
    assert alice["used"] == 0  # a throttled call is given back


async def test_key_actions_in_one_gateway(sim: Simulator, gateway_clock: GatewayClock) -> None:
    config = with_admin(config_for(sim))
    config["providers"][0]["strategy"] = "fill_first"
    async with gateway(config, gateway_clock) as url, aiohttp.ClientSession(headers=ADMIN) as http:
        keys = url + "/admin/keys"
        assert_error(
            await call(http, "POST", keys + "/nope/alice/disable"), 404, "provider_not_found"
        )
        assert_error(await call(http, "POST", keys + "/modelscope/zed/reset"), 404, "key_not_found")
        assert_error(await call(http, "POST", keys + "/modelscope/alice/drop"), 404)
        assert_error(await call(http, "GET", keys + "/modelscope/alice/disable"), 405)
        assert_error(await call(http, "POST", keys + "/modelscope/alice/disable", body=[1]), 400)
        assert_error(
            await call(http, "POST", keys + "/modelscope/alice/disable", body={"reason": 3}), 400
        )
        async with http.post(keys + "/modelscope/alice/disable", data=b"{") as response:
            assert response.status == 400
        status, answer = await call(
            http, "POST", keys + "/modelscope/alice/disable", body={"reason": "leaked"}
        )
        assert status == 200
        assert answer["status"] == "disabled"
        assert answer["changed"] is True
        assert (answer["key"]["state"], answer["key"]["reason"]) == ("disabled", "leaked")
        _, again = await call(http, "POST", keys + "/modelscope/alice/disable")
        assert again["changed"] is False
        client = openai_client(url)
        try:
            assert (await ask(client))[:2] == ("modelscope", "bob")
            _, enabled = await call(http, "POST", keys + "/modelscope/alice/enable")
            assert (enabled["status"], enabled["key"]["state"]) == ("enabled", "available")
            assert (await ask(client))[:2] == ("modelscope", "alice")
            assert (await ask(client))[:2] == ("modelscope", "alice")
            assert (await ask(client))[:2] == ("modelscope", "bob")  # alice is spent
            _, reset = await call(http, "POST", keys + "/modelscope/alice/reset")
            assert reset["status"] == "reset"
            assert (reset["key"]["used"], reset["key"]["state"]) == (0, "available")
            assert reset["key"]["models"] == []
        finally:
            await client.close()
        # the simulator counts alice's calls of the day too: only the gateway's counts reset
        _, quota = await call(http, "GET", url + "/admin/quota")
        assert [k["used"] for k in quota["providers"][0]["keys"]] == [0, 2, 0]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_key_actions_reach_a_second_replica_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Disable through gateway A: gateway B never uses the key; enable and reset likewise."""
    async with Simulator(sim_config(100, 100)) as sim:  # real time: real processes
        config = with_admin(
            config_for(
                sim,
                limit=2,
                bailian_limit=100,
                store_url=redis_server.url,
                prefix=f"t{uuid.uuid4().hex[:8]}",
            )
        )
        config["providers"][0]["strategy"] = "fill_first"
        a = GatewayProcess(config, tmp_path, "a")
        b = GatewayProcess(config, tmp_path, "b")
        try:
            await asyncio.gather(a.start(), b.start())
            via_a, via_b = openai_client(a.url), openai_client(b.url)
            async with aiohttp.ClientSession(headers=ADMIN) as http:
                try:
                    assert (await ask(via_b))[:2] == ("modelscope", "alice")
                    status, answer = await call(
                        http,
                        "POST",
                        a.url + "/admin/keys/modelscope/alice/disable",
                        body={"reason": "rotating"},
                    )
                    assert (status, answer["key"]["state"]) == (200, "disabled")
                    served = [(await ask(via_b))[1] for _ in range(3)]
                    assert served == ["bob", "bob", "carol"]
                    assert sim.state.stats("modelscope")["by_token"]["alice"]["used"] == 1
                    _, quota = await call(http, "GET", b.url + "/admin/quota")
                    alice = quota["providers"][0]["keys"][0]
                    assert (alice["state"], alice["reason"]) == ("disabled", "rotating")

                    status, _ = await call(
                        http, "POST", b.url + "/admin/keys/modelscope/alice/enable"
                    )
                    assert status == 200
                    assert (await ask(via_a))[1] == "alice"  # her second and last call
                    assert (await ask(via_b))[1] == "carol"
                    _, quota = await call(http, "GET", a.url + "/admin/quota")
                    alice = quota["providers"][0]["keys"][0]
                    assert (alice["used"], alice["state"]) == (2, "exhausted")

                    status, _ = await call(
                        http, "POST", a.url + "/admin/keys/modelscope/alice/reset"
                    )
                    assert status == 200
                    assert (await ask(via_b))[1] == "alice"  # a spent key serves again
                    _, quota = await call(http, "GET", b.url + "/admin/quota")
                    alice = quota["providers"][0]["keys"][0]
                    assert (alice["used"], alice["remaining"], alice["state"]) == (
                        1,
                        1,
                        "available",
                    )
                finally:
                    await via_a.close()
                    await via_b.close()
        finally:
            a.stop()
            b.stop()
        assert sim.state.stats("modelscope")["by_token"]["alice"]["used"] == 3


# -- the OpenAPI document ----------------------------------------------------------------------


def registered_admin_routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings, fetch_catalog=False)
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path == "/admin" or path.startswith("/admin/"):
            routes.add((path, route.method.lower()))
    return routes


def refs(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        found = [tree["$ref"]] if isinstance(tree.get("$ref"), str) else []
        return found + [r for v in tree.values() for r in refs(v)]
    if isinstance(tree, list):
        return [r for v in tree for r in refs(v)]
    return []


async def test_openapi_document_matches_the_routes(
    sim: Simulator, gateway_clock: GatewayClock
) -> None:
    config = with_admin(config_for(sim))
    registered = registered_admin_routes(Settings.model_validate(config))
    async with (
        gateway(config, gateway_clock) as url,
        aiohttp.ClientSession(headers=ADMIN) as http,
        http.get(url + "/admin/openapi.json") as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document == openapi_document()
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert registered == documented
    assert len(documented) == 8
    assert document["openapi"].startswith("3.1")
    schemes = document["components"]["securitySchemes"]
    assert schemes["adminKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <admin.key>",
    }
    assert schemes["adminApiKey"]["in"] == "header"
    assert {name for item in document["security"] for name in item} <= set(schemes)
    for path, operations in document["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for operation in operations.values():
            assert {"200", "401", "403", "404"} <= set(operation["responses"])
            parameters = operation.get("parameters", [])
            assert {p["name"] for p in parameters if p["in"] == "path"} == names
            assert {p["in"] for p in parameters} <= {"path", "query"}
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"]


def test_the_openapi_data_states_the_disable_reason_limit_the_handler_applies() -> None:
    operation = openapi_document()["paths"]["/admin/keys/{provider}/{key}/disable"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["reason"]["maxLength"] == MAX_REASON_CHARS


# -- secrets -----------------------------------------------------------------------------------


async def test_no_secret_in_any_admin_answer(sim: Simulator, gateway_clock: GatewayClock) -> None:
    answers: list[str] = []
    async with gateway(with_admin(config_for(sim)), gateway_clock) as url:
        client = openai_client(url)
        try:
            for _ in range(3):
                await ask(client)
        finally:
            await client.close()
        async with aiohttp.ClientSession() as http:
            for path, operations in openapi_document()["paths"].items():
                concrete = path.replace("{provider}", "modelscope").replace("{key}", "alice")
                for method in operations:
                    for headers in (ADMIN, {"Authorization": f"Bearer {CLIENT_KEY}"}, None):
                        async with http.request(method, url + concrete, headers=headers) as r:
                            assert r.status != 405
                            if headers is ADMIN and not path.endswith("/reload"):
                                assert r.status == 200, concrete
                            answers.append(str(r.status) + str(dict(r.headers)) + await r.text())
    # in-process gateways have no config file: reload says so (and stays the same)
    assert any('"invalid_config"' in a for a in answers)
    assert len(answers) == 24
    for answer in answers:
        for secret in SECRETS:
            assert secret not in answer
        assert hashlib.sha256(ADMIN_KEY.encode()).hexdigest() not in answer
