"""`modelscope-router demo`: the simulator, the gateway on its embedded store, the openai client.

Everything runs on loopback in this process; nothing reaches a real ModelScope or Bailian host.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from rich.console import Console
from rich.table import Table

from router.app import create_app
from router.config import Settings
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


async def run_demo(console: Console | None = None) -> int:
    try:
        from openai import AsyncOpenAI, RateLimitError
    except ImportError:
        print("the demo needs the openai package: pip install 'modelscope-router[demo]'")
        return 1
    console = console or Console(highlight=False)
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{Path(tmp) / 'demo.sqlite3'}"
        async with Simulator(default_simulator_config()) as sim:
            settings = demo_settings(sim.modelscope_url, sim.bailian_url, store_url)
            async with running(create_app(settings)) as url:
                console.print(
                    f"[bold]Simulator[/bold]: ModelScope {sim.modelscope_url} (tokens alice, bob, "
                    f"carol: 3 calls a day each), Bailian {sim.bailian_url} (key main: 5 calls)"
                )
                console.print(f"[bold]Gateway[/bold]: {url}/v1 on the embedded store ({store_url})")
                client = AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
                try:
                    await _script(console, client, sim, RateLimitError)
                finally:
                    await client.close()
    return 0


async def _script(console: Console, client: Any, sim: Simulator, rate_limit_error: Any) -> None:
    table = Table(title=f"16 calls to {MODEL} through the gateway (openai client)")
    for column in ("#", "what happened upstream", "served by", "answer"):
        table.add_column(column)
    sim.faults.add("throttle", token="alice", count=1)
    for number in range(1, 17):
        note = "alice throttled (429) -> failed over" if number == 1 else ""
        stream = number == 2
        try:
            provider, key, text = await _ask(client, stream)
        except rate_limit_error as exc:
            retry_after = exc.response.headers.get("retry-after")
            table.add_row(
                str(number),
                "every key spent",
                "[red]429[/red]",
                f"{exc.message} (Retry-After {retry_after} s)",
            )
            continue
        if provider == "bailian" and not note:
            note = "ModelScope pool spent -> paid fallback"
        if stream:
            note = (note + "; " if note else "") + "streamed"
        table.add_row(str(number), note, f"{provider}/{key}", text)
    console.print(table)
    stats = sim.state.stats()
    console.print(
        f"Upstream successes counted by the simulator: {stats['calls']} (9 ModelScope + 5 Bailian)"
    )


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
