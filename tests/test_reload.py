"""Live reload: POST /admin/reload and SIGHUP swap the configuration without dropping anything."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import load_settings
from router.demo import running
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from router.state import LIVE
from tests.conftest import GatewayClock
from tests.support import CLIENT_KEY, GatewayProcess, gateway_config
from tests.test_admin import ADMIN, ADMIN_KEY

MODEL = "Qwen/Qwen3-32B"
TOKENS = [("alice", "ms-test-alice"), ("bob", "ms-test-bob"), ("carol", "ms-test-carol")]
DAVE = ("dave", "ms-test-dave")  # known upstream, added to the gateway by a reload
NEW_CLIENT_KEY = "sk-test-newbie"
CHUNKS = 20
CHUNK_DELAY_MS = 50


def simulator_config() -> SimulatorConfig:
    return SimulatorConfig(
        modelscope=ModelScopeConfig(
            tokens=[
                ModelScopeToken(secret=s, name=n, daily_limit=100, model_daily_limit=100)
                for n, s in [*TOKENS, DAVE]
            ]
        ),
        bailian=BailianConfig(keys=[BailianKey(secret="sk-test-bailian", name="main")]),
        stream_chunks=CHUNKS,
        stream_chunk_delay_ms=CHUNK_DELAY_MS,
    )


def first_config(sim: Simulator, **kw: Any) -> dict[str, Any]:
    config = gateway_config(
        sim.modelscope_url,
        sim.bailian_url,
        tokens=[(n, s, 5) for n, s in TOKENS],
        **kw,
    )
    config["admin"] = {"key": ADMIN_KEY}
    return config


def second_config(config: dict[str, Any]) -> dict[str, Any]:
    """A key added, a limit changed, a client added."""
    config = copy.deepcopy(config)
    keys = config["providers"][0]["keys"]
    keys[0]["daily_limit"] = 1  # alice: 5 -> 1
    keys.append({"name": DAVE[0], "secret": DAVE[1], "daily_limit": 5})
    config["clients"].append({"name": "newbie", "key": NEW_CLIENT_KEY})
    return config


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


@asynccontextmanager
async def reloadable(path: Path, clock: GatewayClock) -> AsyncIterator[tuple[web.Application, str]]:
    """The gateway in this process, started from a config file (so it can reload it)."""
    app = create_app(
        load_settings(path), clock=clock, registry=CollectorRegistry(), config_path=path
    )
    async with running(app) as url:
        yield app, url


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def ask(http: aiohttp.ClientSession, url: str, key: str = CLIENT_KEY) -> tuple[int, str]:
    async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=bearer(key)) as r:
        await r.read()
        return r.status, r.headers.get("x-router-key", "")


async def admin(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, headers=ADMIN) as response:
        return response.status, await response.json()


def keys_of(quota: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in quota["providers"][0]["keys"]}


async def test_reload_keeps_streams_and_counts_and_takes_new_keys_limits_and_clients(
    tmp_path: Path,
) -> None:
    clock = GatewayClock()
    path = tmp_path / "router.yaml"
    async with Simulator(simulator_config(), clock=clock.seconds) as sim:
        config = first_config(sim)
        write(path, config)
        async with reloadable(path, clock) as (app, url), aiohttp.ClientSession() as http:
            for _ in range(3):  # most_remaining takes turns: one call on each key
                assert (await ask(http, url))[0] == 200
            status, _ = await ask(http, url, NEW_CLIENT_KEY)
            assert status == 401  # not a client yet

            async with http.post(
                f"{url}/v1/chat/completions", json=chat(stream=True), headers=bearer(CLIENT_KEY)
            ) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                old = app[LIVE].runtime
                write(path, second_config(config))
                status, answer = await admin(http, "POST", f"{url}/admin/reload")
                assert (status, answer) == (
                    200,
                    {"status": "reloaded", "providers": 2, "keys": 5, "clients": 2},
                )
                assert app[LIVE].runtime is not old
                # the stream is still running on the old configuration (a second to go)
                assert old.inflight == 1
                rest = await stream.read()
            events = [
                line[6:]
                for line in (first + rest).decode().splitlines()
                if line.startswith("data: ")
            ]
            assert events[-1] == "[DONE]"
            content = [orjson.loads(e)["choices"] for e in events[:-1]]
            assert len([c for c in content if c and c[0]["delta"].get("content")]) >= CHUNKS - 1
            assert old.inflight == 0

            status, quota = await admin(http, "GET", f"{url}/admin/quota")
            assert status == 200
            keys = keys_of(quota)
            assert list(keys) == ["alice", "bob", "carol", "dave"]
            # today's counts survived the reload
            assert sum(k["used"] for k in keys.values()) == 4
            by_token = sim.state.stats("modelscope")["by_token"]
            for name, key in keys.items():
                assert key["used"] == by_token[name]["used"]
            assert keys["alice"]["used"] >= 1
            assert (keys["alice"]["limit"], keys["alice"]["state"]) == (1, "exhausted")
            assert (keys["dave"]["used"], keys["dave"]["limit"]) == (0, 5)

            # the new client works, and the new key (most remaining) serves it
            assert await ask(http, url, NEW_CLIENT_KEY) == (200, "dave")
            assert by_token["dave"]["used"] == 0  # the snapshot above; the simulator moved on
            assert sim.state.stats("modelscope")["by_token"]["dave"]["used"] == 1
            _, clients = await admin(http, "GET", f"{url}/admin/clients")
            assert {c["name"]: c["today"]["used"] for c in clients["clients"]} == {
                "team": 4,
                "newbie": 1,
            }

            # an invalid config is refused with its reason; the running one stays
            broken = second_config(config)
            broken["providers"][0]["keys"][3]["secret"] = "${ROUTER_TEST_UNSET_VARIABLE}"
            write(path, broken)
            current = app[LIVE].runtime
            status, error = await admin(http, "POST", f"{url}/admin/reload")
            assert status == 400
            assert error["error"]["code"] == "invalid_config"
            message = error["error"]["message"]
            assert "providers[0].keys[3].secret" in message
            assert "ROUTER_TEST_UNSET_VARIABLE" in message
            assert app[LIVE].runtime is current
            path.write_text("providers: [", encoding="utf-8")
            status, error = await admin(http, "POST", f"{url}/admin/reload")
            assert status == 400
            assert "not valid YAML" in error["error"]["message"]
            assert (await ask(http, url, NEW_CLIENT_KEY))[0] == 200
            _, quota = await admin(http, "GET", f"{url}/admin/quota")
            keys = keys_of(quota)
            assert (keys["alice"]["limit"], keys["dave"]["limit"]) == (1, 5)
            assert sum(k["used"] for k in keys.values()) == 6


async def test_reload_can_change_the_admin_key(tmp_path: Path) -> None:
    clock = GatewayClock()
    path = tmp_path / "router.yaml"
    async with Simulator(simulator_config(), clock=clock.seconds) as sim:
        config = first_config(sim)
        write(path, config)
        async with reloadable(path, clock) as (_app, url), aiohttp.ClientSession() as http:
            write(path, {**config, "admin": {"key": "sk-test-admin-two"}})
            status, _ = await admin(http, "POST", f"{url}/admin/reload")
            assert status == 200
            status, _ = await admin(http, "GET", f"{url}/admin/quota")
            assert status == 401  # the old admin key no longer works
            async with http.get(f"{url}/admin/quota", headers=bearer("sk-test-admin-two")) as r:
                assert r.status == 200
            write(path, {k: v for k, v in config.items() if k != "admin"})
            async with http.post(f"{url}/admin/reload", headers=bearer("sk-test-admin-two")) as r:
                assert r.status == 200
            async with http.get(f"{url}/admin/quota", headers=bearer("sk-test-admin-two")) as r:
                assert r.status == 404  # admin API switched off


async def poll(condition: Any, timeout: float = 15) -> None:
    """Wait (bounded) until ``await condition()`` is true: a real process acts on its own time."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_sighup_reloads_a_real_process(tmp_path: Path) -> None:
    async with Simulator(simulator_config()) as sim:  # real time: a real process
        config = first_config(sim)
        process = GatewayProcess(config, tmp_path, "gw")
        try:
            await process.start()
            assert process.proc is not None
            async with aiohttp.ClientSession() as http:
                assert (await ask(http, process.url))[0] == 200
                config = {**second_config(config), "server": {**config["server"]}}
                config["server"]["port"] = process.port
                write(process.config_path, config)
                process.proc.send_signal(signal.SIGHUP)

                async def has_dave() -> bool:
                    _, quota = await admin(http, "GET", f"{process.url}/admin/quota")
                    return "dave" in keys_of(quota)

                await poll(has_dave)
                assert (await ask(http, process.url, NEW_CLIENT_KEY))[0] == 200
                _, quota = await admin(http, "GET", f"{process.url}/admin/quota")
                keys = keys_of(quota)
                assert sum(k["used"] for k in keys.values()) == 2
                assert (keys["alice"]["limit"], keys["dave"]["limit"]) == (1, 5)

                # a broken file on SIGHUP: refused, logged, the running config stays
                process.config_path.write_text("providers: [", encoding="utf-8")
                process.proc.send_signal(signal.SIGHUP)

                async def refused() -> bool:
                    return "reload refused" in process.log()

                await poll(refused)
                assert (await ask(http, process.url, NEW_CLIENT_KEY))[0] == 200
        finally:
            process.stop()
