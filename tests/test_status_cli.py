"""`modelscope-router status` and `keys`: from the store directly, or through the admin API."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.config import load_settings
from router.pool import KeyPool
from router.quota.days import quota_day, to_ms, utc_now
from router.quota.factory import open_store
from router.simulator import Simulator
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, GatewayProcess, gateway, gateway_app, recorded
from tests.test_admin import ADMIN, ADMIN_KEY, SECRETS, with_admin
from tests.test_gateway import TOKENS, ask, config_for, openai_client, sim_config


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m router ARGS`` in a clean environment; (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def get(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=ADMIN) as http, http.get(url) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        return document


async def traffic(url: str, calls: int) -> None:
    client = openai_client(url)
    try:
        for _ in range(calls):
            await ask(client)
    finally:
        await client.close()


def without_times(document: dict[str, Any]) -> dict[str, Any]:
    """The parts of a status document that do not move with the clock."""
    return {k: v for k, v in document.items() if k not in ("now", "next_reset")}


async def test_status_config_json_matches_the_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with Simulator(sim_config(2, 100)) as sim:  # real time: the CLI reads the clock
        config = with_admin(
            config_for(
                sim,
                bailian_limit=100,
                store_url=redis_server.url,
                prefix=f"t{uuid.uuid4().hex[:8]}",
            )
        )
        path = write_config(tmp_path / "router.yaml", config)
        async with gateway_app(config) as (url, app):
            await traffic(url, 8)  # 3 keys x 2, then two on Bailian
            await recorded(app)  # the answers' usage in the store, as the CLI will read it
            async with aiohttp.ClientSession(headers=ADMIN) as http:
                disable = f"{url}/admin/keys/bailian/main/disable"
                async with http.post(disable, json={"reason": "budget"}) as response:
                    assert response.status == 200
            quota = await get(url + "/admin/quota")
            clients = await get(url + "/admin/clients")
        code, out, err = await run_cli("status", "--config", str(path), "--json")
    assert code == 0, err
    document = orjson.loads(out)
    assert set(document) == {"quota", "clients"}
    # the same document as the admin API of a gateway on that store
    assert without_times(document["quota"]) == without_times(quota)
    assert without_times(document["clients"]) == without_times(clients)

    # and the same numbers as the store's own snapshot
    settings = load_settings(path)
    pool = KeyPool(settings)
    store = open_store(settings.store.url, prefix=settings.store.prefix)
    try:
        now = utc_now()
        day = quota_day(now, settings.quota.tz, settings.quota.reset_time)
        for provider, listed in zip(
            settings.providers, document["quota"]["providers"], strict=True
        ):
            usages = await store.snapshot(
                provider.name, pool.default_specs(provider), day, to_ms(now), provider.model_limits
            )
            assert [
                (k["name"], k["used"], k["limit"], k["state"], k["reason"]) for k in listed["keys"]
            ] == [(u.key, u.used, u.limit, u.state.value, u.reason) for u in usages]
            assert [[(m["model"], m["used"]) for m in k["models"]] for k in listed["keys"]] == [
                [(m.model, m.used) for m in u.models] for u in usages
            ]
        [team] = await store.client_usage(day, ["team"])
    finally:
        await store.aclose()
    assert document["clients"]["clients"][0]["today"]["used"] == team.used == 8
    bailian = document["quota"]["providers"][1]["keys"][0]
    assert (bailian["used"], bailian["state"], bailian["reason"]) == (2, "disabled", "budget")


async def test_status_table_prints_every_key_and_no_secret(tmp_path: Path) -> None:
    async with Simulator(sim_config(2, 2)) as sim:
        config = with_admin(config_for(sim, store_url=f"sqlite:///{tmp_path / 'q.db'}"))
        config["clients"].append({"name": "robots", "key": "sk-test-robots", "daily_limit": 9})
        path = write_config(tmp_path / "router.yaml", config)
        async with gateway(config) as url:
            await traffic(url, 3)
        code, out, err = await run_cli("status", "--config", str(path))
    assert code == 0, err
    for name in ("modelscope", "bailian", "main", "team", "robots", "Qwen/Qwen3-32B"):
        assert name in out
    for name, _ in TOKENS:
        assert name in out
    for secret in [*SECRETS, "sk-test-robots"]:
        assert secret not in out
        assert secret not in err
    assert "Quota day" in out
    assert "Clients on" in out


@pytest.mark.slow
async def test_status_and_keys_through_the_admin_api_of_a_process(tmp_path: Path) -> None:
    async with Simulator(sim_config(2, 100)) as sim:
        config = with_admin(config_for(sim, bailian_limit=100))
        process = GatewayProcess(config, tmp_path, "gw")
        try:
            await process.start()
            await traffic(process.url, 4)
            code, out, err = await run_cli("status", "--url", process.url, "--json")
            assert code == 2
            assert "ROUTER_ADMIN_KEY" in err
            code, out, err = await run_cli(
                "status", "--url", process.url, "--json", env={"ROUTER_ADMIN_KEY": ADMIN_KEY}
            )
            assert code == 0, err
            document = orjson.loads(out)
            assert without_times(document["quota"]) == without_times(
                await get(process.url + "/admin/quota")
            )
            assert document["clients"]["clients"][0]["today"]["used"] == 4
            code, _out, err = await run_cli(
                "status", "--url", process.url, "--admin-key", CLIENT_KEY
            )
            assert code == 1
            assert "403" in err

            base = ["--url", process.url, "--admin-key", ADMIN_KEY]
            code, out, err = await run_cli(
                "keys", "disable", "modelscope", "bob", *base, "--reason", "shared by mistake"
            )
            assert code == 0, err
            assert "modelscope/bob: disabled, now disabled (shared by mistake)" in out
            code, out, err = await run_cli("status", *base)
            assert code == 0, err
            assert "shared by mistake" in out
            for name, _ in TOKENS:
                assert name in out
            for secret in SECRETS:
                assert secret not in out
            code, out, err = await run_cli("keys", "reset", "modelscope", "alice", *base)
            assert (code, out.strip()) == (0, "modelscope/alice: reset, now available"), err
            code, out, err = await run_cli("keys", "enable", "modelscope", "bob", *base)
            assert code == 0, err
            code, out, err = await run_cli("keys", "enable", "modelscope", "zed", *base)
            assert code == 1
            assert "404" in err
            keys = {
                k["name"]: k
                for k in (await get(process.url + "/admin/quota"))["providers"][0]["keys"]
            }
            assert (keys["alice"]["used"], keys["alice"]["state"]) == (0, "available")
            assert keys["bob"]["state"] != "disabled"
        finally:
            process.stop()


@pytest.mark.slow
async def test_keys_add_edits_the_config_and_reloads(tmp_path: Path) -> None:
    config_tokens = sim_config(2, 2)
    async with Simulator(config_tokens) as sim:
        config = with_admin(config_for(sim))
        process = GatewayProcess(config, tmp_path, "gw")
        secret_file = tmp_path / "dave.secret"
        secret_file.write_text("ms-test-dave\n", encoding="utf-8")
        try:
            await process.start()
            original = process.config_path.read_text(encoding="utf-8")
            base = ["--config", str(process.config_path), "--url", process.url]
            admin_env = {"ROUTER_ADMIN_KEY": ADMIN_KEY}
            code, out, err = await run_cli(
                "keys",
                "add",
                "modelscope",
                "dave",
                "--secret-file",
                str(secret_file),
                "--daily-limit",
                "7",
                *base,
                env=admin_env,
            )
            assert code == 0, err
            assert "reloaded" in out
            backup = process.config_path.with_name(process.config_path.name + ".bak")
            assert backup.read_text(encoding="utf-8") == original
            edited = process.config_path.read_text(encoding="utf-8")
            lines = edited.splitlines(keepends=True)
            at = next(i for i, line in enumerate(lines) if line.strip() == "- name: dave")
            assert lines[at + 1].strip() == f"secret_file: {secret_file}"
            assert lines[at + 2].strip() == "daily_limit: 7"
            assert "".join(lines[:at] + lines[at + 3 :]) == original  # nothing else changed
            assert "ms-test-dave" not in edited  # the secret is referenced, not copied
            keys = {
                k["name"]: k
                for k in (await get(process.url + "/admin/quota"))["providers"][0]["keys"]
            }
            assert keys["dave"]["limit"] == 7

            # the gateway lacks the variable (only this shell has it): refused, file restored
            code, out, err = await run_cli(
                "keys",
                "add",
                "modelscope",
                "erin",
                "--secret-env",
                "MS_TEST_ONLY_IN_THIS_SHELL",
                *base,
                env={**admin_env, "MS_TEST_ONLY_IN_THIS_SHELL": "ms-test-erin"},
            )
            assert code == 1
            assert "MS_TEST_ONLY_IN_THIS_SHELL" in err
            assert "restored" in err
            assert process.config_path.read_text(encoding="utf-8") == edited
            code, out, err = await run_cli(
                "keys", "add", "nope", "erin", "--secret-env", "X", *base, env=admin_env
            )
            assert code == 1
            assert "no provider named 'nope'" in err
            code, out, err = await run_cli(
                "keys", "add", "modelscope", "dave", "--secret-env", "X", *base, env=admin_env
            )
            assert code == 1
            assert "duplicate key name 'dave'" in err
            assert process.config_path.read_text(encoding="utf-8") == edited
        finally:
            process.stop()
