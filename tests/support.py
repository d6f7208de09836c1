"""Helpers for end-to-end tests: the gateway in this process or as real processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.quota.store import QuotaStore
from router.state import INFLIGHT, LEDGER
from tests.conftest import GatewayClock

#: The gateway tests' clock under its former name (tests/test_store_faults.py imports it).
FakeClock = GatewayClock

CLIENT_KEY = "sk-test-client-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_config(
    modelscope_url: str,
    bailian_url: str,
    *,
    tokens: list[tuple[str, str, int]],
    bailian: tuple[str, str, int | None] | None = ("main", "sk-test-bailian", None),
    model_daily_limit: int | None = None,
    store_url: str = "memory://",
    prefix: str = "modelscope-router",
    port: int = 0,
    max_attempts: int = 4,
    clients: bool = True,
) -> dict[str, Any]:
    providers: list[dict[str, Any]] = [
        {
            "name": "modelscope",
            "type": "modelscope",
            "base_url": modelscope_url,
            "model_daily_limit": model_daily_limit if model_daily_limit is not None else 100_000,
            "keys": [{"name": n, "secret": s, "daily_limit": lim} for n, s, lim in tokens],
        }
    ]
    if bailian is not None:
        name, secret, limit = bailian
        providers.append(
            {
                "name": "bailian",
                "type": "bailian",
                "base_url": bailian_url,
                "daily_limit": limit,
                "keys": [{"name": name, "secret": secret}],
            }
        )
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"url": store_url, "prefix": prefix},
        "providers": providers,
        "clients": [{"name": "team", "key": CLIENT_KEY}] if clients else [],
        "retry": {"max_attempts": max_attempts, "deadline_seconds": 30},
    }


@asynccontextmanager
async def gateway(
    config: dict[str, Any], clock: Callable[[], datetime] | None = None
) -> AsyncIterator[str]:
    """The gateway in this process on a free port; yields the base URL (without /v1)."""
    async with gateway_app(config, clock) as (url, _):
        yield url


@asynccontextmanager
async def gateway_app(
    config: dict[str, Any],
    clock: Callable[[], datetime] | None = None,
    store: QuotaStore | None = None,
) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway in this process on a free port (on ``store`` when given, left open); yields
    the base URL (without /v1) and the app."""
    settings = Settings.model_validate(config)
    kwargs: dict[str, Any] = {"registry": CollectorRegistry(), "store": store}
    if clock is not None:
        kwargs["clock"] = clock
    app = create_app(settings, **kwargs)
    async with running(app) as url:
        yield url, app


async def recorded(app: web.Application) -> None:
    """Wait until every request has ended and its usage is in the store (router.ledger): a
    stream's client has its last byte before its handler records the usage."""
    await app[INFLIGHT].idle()
    await app[LEDGER].caught_up()


class GatewayProcess:
    """`python -m router serve` as a real process, for multi-replica and signal tests."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str = "gw") -> None:
        self.port = config["server"]["port"] or free_port()
        config = {**config, "server": {**config["server"], "port": self.port}}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on below
                [sys.executable, "-m", "router", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        await wait_ready(self.url + "/readyz", timeout, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


async def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll a readiness URL until it answers 200 (bounded)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")
