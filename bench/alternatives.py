"""Other gateways on the same upstream, each installed by the benchmark into a throwaway dir.

Never project dependencies: LiteLLM's proxy goes into its own venv, Portkey's gateway into its
own npm prefix, both under the run's temporary directory (or ``--alt-cache`` to reuse them).
An install that fails or takes longer than ``INSTALL_TIMEOUT_S`` is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.procs import Proc, free_port

INSTALL_TIMEOUT_S = 300
LITELLM_SPEC = "litellm[proxy]"
PORTKEY_SPEC = "@portkey-ai/gateway"
# With a newer @hono/node-server, Portkey's streaming answers fail on Node 20 with
# "TypeError: immutable" (Portkey-AI/gateway#1389, #1550): JSON works, every stream is a 500.
# 1.13.8 is the newest that streams here; pinned through npm "overrides".
HONO_NODE_SERVER = "1.13.8"


class NotInstallable(Exception):
    """The alternative cannot be installed or started here; ``str()`` says why."""


@dataclass
class Started:
    proc: Proc
    url: str  # the chat completions URL
    headers: dict[str, str]
    version: str


async def _run(
    args: list[str], log: Path, limit_s: float, env: dict[str, str] | None = None
) -> None:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), limit_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NotInstallable(f"install took longer than {limit_s:.0f} s") from None
    if rc != 0:
        tail = log.read_text(errors="replace")  # noqa: ASYNC240 - once, after the install.strip().splitlines()[-3:]
        raise NotInstallable(f"`{' '.join(args[:4])} ...` exited {rc}: {' | '.join(tail)}")


async def install_litellm(root: Path) -> Path:
    """A venv with litellm[proxy]; returns the ``litellm`` executable."""
    venv = root / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    log = root / "litellm-install.log"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INSTALL_TIMEOUT_S
    await _run([sys.executable, "-m", "venv", str(venv)], log, INSTALL_TIMEOUT_S)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    await _run([*pip, LITELLM_SPEC], log, max(1.0, deadline - loop.time()))
    if not exe.exists():
        raise NotInstallable("pip finished but no litellm executable was installed")
    return exe


async def start_litellm(
    root: Path, upstream_v1: str, upstream_key: str, model: str, client_key: str
) -> Started:
    exe = await install_litellm(root)
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream_v1,
                    "api_key": upstream_key,
                },
            }
        ],
        "general_settings": {"master_key": client_key},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    config_path = root / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start (loopback only)
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    args = [str(exe), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    proc = Proc("litellm", [*args, "--num_workers", "1"], root, env=env).start()
    try:
        await proc.wait_ready(f"http://127.0.0.1:{port}/health/liveliness", limit_s=180)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        raise NotInstallable(f"LiteLLM did not start: {str(exc)[:300]}") from exc
    version = _pip_version(exe.parent / "python", "litellm")
    return Started(
        proc,
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {"Authorization": f"Bearer {client_key}"},
        version,
    )


def _pip_version(python: Path, package: str) -> str:
    site = list(python.parent.parent.glob(f"lib/python*/site-packages/{package}-*.dist-info"))
    return site[0].name.removesuffix(".dist-info").split("-", 1)[1] if site else "?"


async def install_portkey(root: Path) -> Path:
    """``npm install`` into a throwaway prefix; returns the gateway's entry script."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise NotInstallable("node/npm are not on PATH (apt-get install nodejs npm)")
    prefix = root / "portkey-npm"
    entry = prefix / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if entry.exists():
        return entry
    prefix.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "bench-portkey",
        "private": True,
        "dependencies": {PORTKEY_SPEC: "*"},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER},
    }
    (prefix / "package.json").write_text(json.dumps(manifest), encoding="utf-8")
    args = ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
    await _run(args, root / "portkey-install.log", INSTALL_TIMEOUT_S)
    if not entry.exists():
        raise NotInstallable(f"npm finished but {entry.name} is missing")
    return entry


async def start_portkey(root: Path, upstream_v1: str, upstream_key: str) -> Started:
    entry = await install_portkey(root)
    port = free_port()
    # What `npx @portkey-ai/gateway` runs, without npx's own node process in between (RSS).
    proc = Proc("portkey", ["node", str(entry), f"--port={port}", "--headless"], root).start()
    try:
        await proc.wait_ready(f"http://127.0.0.1:{port}/", limit_s=60)
    except (RuntimeError, TimeoutError) as exc:
        proc.stop()
        raise NotInstallable(f"Portkey did not start: {str(exc)[:300]}") from exc
    package = entry.parent.parent / "package.json"
    version = yaml.safe_load(package.read_text(encoding="utf-8")).get("version", "?")
    return Started(
        proc,
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {
            "Authorization": f"Bearer {upstream_key}",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": upstream_v1,
        },
        str(version),
    )
