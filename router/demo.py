"""`modelscope-router demo`: the simulator, the gateway on its embedded store, the openai client.

Everything runs on loopback in this process; nothing reaches a real ModelScope or Bailian host.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from rich.console import Console
from rich.table import Table

from router.app import create_app
from router.config import Settings
from router.quota.days import next_reset
from router.simulator import Simulator, default_simulator_config

CLIENT_KEY = "sk-router-demo"
MODEL = "Qwen/Qwen3-32B"


def demo_settings(modelscope_url: str, bailian_url: str, store_url: str) -> Settings:
    """The gateway's config for the demo: the simulator's three tokens and its Bailian key."""
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"url": store_url},
            "providers": [
                {
                    "name": "modelscope",
                    "type": "modelscope",
                    "base_url": modelscope_url,
                    "daily_limit": 3,
                    "model_daily_limit": 3,
                    "keys": [
                        {"name": name, "secret": f"ms-demo-{name}"}
                        for name in ("alice", "bob", "carol")
                    ],
                },
                {
                    "name": "bailian",
                    "type": "bailian",
                    "base_url": bailian_url,
                    "daily_limit": 5,
                    "keys": [{"name": "main", "secret": "sk-demo-bailian"}],
                },
            ],
            "clients": [{"name": "demo", "key": CLIENT_KEY}],
        }
    )


@asynccontextmanager
async def running(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve an app on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class DemoClock:
    """Real time plus a fast-forward offset, shared by the gateway and the simulator."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def seconds(self) -> float:
        return self().timestamp()


async def run_demo(console: Console | None = None) -> int:
    try:
        from openai import AsyncOpenAI, RateLimitError
    except ImportError:
        print("the demo needs the openai package: pip install 'modelscope-router[demo]'")
        return 1
    console = console or Console(highlight=False, width=120)
    for noisy in ("httpx", "httpx2", "openai"):  # the openai client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    clock = DemoClock()
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{Path(tmp) / 'demo.sqlite3'}"
        async with Simulator(default_simulator_config(), clock=clock.seconds) as sim:
            settings = demo_settings(sim.modelscope_url, sim.bailian_url, store_url)
            async with running(create_app(settings, clock=clock)) as url:
                console.print(
                    f"[bold]Simulator[/bold]: ModelScope {sim.modelscope_url} (tokens alice, bob, "
                    f"carol: 3 calls a day each), Bailian {sim.bailian_url} (key main: 5 calls)"
                )
                console.print(f"[bold]Gateway[/bold]: {url}/v1 on the embedded store ({store_url})")
                client = AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
                try:
                    await Script(console, client, RateLimitError).run(sim, clock)
                finally:
                    await client.close()
                stats = sim.state.stats()
                met = sum(stats[p]["rejected"].get("429", 0) for p in ("modelscope", "bailian"))
                console.print(
                    f"Upstream successes counted by the simulator: {stats['calls']}. "
                    f"Upstream 429s met by the gateway: {met}, each answered by a failover; "
                    "every 429 above is the gateway's own, sent only when no key could serve."
                )
    return 0


class Script:
    """The demo's story, one openai call a row."""

    def __init__(self, console: Console, client: Any, rate_limit_error: Any) -> None:
        self.console = console
        self.client = client
        self.rate_limit_error = rate_limit_error
        self.number = 0
        self.table = Table(title=f"Calls to {MODEL} through the gateway (official openai client)")
        for column in ("#", "what happened", "served by", "answer"):
            self.table.add_column(column)

    async def run(self, sim: Simulator, clock: DemoClock) -> None:
        sim.faults.add("retry_after:30", token="alice", count=1)
        await self.call("alice answered 429 (throttled, Retry-After 30): failed over at once")
        await self.call("streamed", stream=True)
        await self.until_429("ModelScope keys in turn, then the paid fallback")
        clock.offset += timedelta(seconds=30)
        self.table.add_row("", "[bold]30 s later[/bold]: alice's cooldown is over", "", "")
        await self.until_429("alice serves again")
        now = clock()
        tomorrow = next_reset(now, ZoneInfo("Asia/Shanghai"), time(0, 0))
        clock.offset += tomorrow - now
        self.table.add_row("", "[bold]00:00 Asia/Shanghai[/bold]: a new quota day", "", "")
        await self.call("the free pool is back: traffic returns to ModelScope")
        self.console.print(self.table)

    async def until_429(self, note: str) -> None:
        for _ in range(20):
            if not await self.call(note):
                return
            note = ""

    async def call(self, note: str, stream: bool = False) -> bool:
        self.number += 1
        try:
            provider, key, text = await _ask(self.client, stream)
        except self.rate_limit_error as exc:
            retry_after = exc.response.headers.get("retry-after")
            message = exc.body.get("message", "") if isinstance(exc.body, dict) else str(exc)
            self.table.add_row(
                str(self.number),
                "no key can serve",
                "[red]429[/red]",
                f"{message} [Retry-After: {retry_after} s]",
            )
            return False
        if provider == "bailian" and not note:
            note = "paid fallback"
        self.table.add_row(str(self.number), note, f"{provider}/{key}", text)
        return True


async def _ask(client: Any, stream: bool) -> tuple[str, str, str]:
    messages = [{"role": "user", "content": "Say hello"}]
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=stream
    )
    provider, key = raw.headers.get("x-router-provider"), raw.headers.get("x-router-key")
    if not stream:
        return provider, key, raw.parse().choices[0].message.content
    parts = []
    async for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return provider, key, "".join(parts)
