"""The README's client examples work as written against the shipped simulated config.

The README tells a newcomer to run `modelscope-router simulate` and
`modelscope-router serve --config config/simulated.yaml`, then shows SDK and curl calls. This
runs the README's own Python snippets (only the base URL and key swapped for this test's) against
that config file, and requires the free provider to serve them while its pool has room.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import yaml

from router.simulator import Simulator
from tests.support import gateway

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "sk-router-demo"  # config/simulated.yaml's client key when ROUTER_CLIENT_KEY is unset


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def simulated_config(sim: Simulator) -> dict[str, Any]:
    """config/simulated.yaml as shipped, with the simulator's ports and an in-memory store."""
    raw = (ROOT / "config" / "simulated.yaml").read_text(encoding="utf-8")
    config: dict[str, Any] = yaml.safe_load(
        raw.replace("${ROUTER_CLIENT_KEY:-sk-router-demo}", DEMO_KEY)
    )
    urls = {"modelscope": sim.modelscope_url, "bailian": sim.bailian_url}
    for provider in config["providers"]:
        provider["base_url"] = urls[provider["type"]]
    config["server"]["port"] = 0
    config["store"] = {"url": "memory://"}
    return config


async def test_the_readme_sdk_example_is_served_by_the_free_pool() -> None:
    blocks = [b for b in readme_python_blocks() if "from openai import OpenAI" in b]
    assert blocks, "the README has no openai SDK example"
    async with Simulator() as sim, gateway(simulated_config(sim)) as url:
        for block in blocks:
            code = re.sub(r'base_url="[^"]*"', f'base_url="{url}/v1"', block)
            code = re.sub(r'api_key="[^"]*"', f'api_key="{DEMO_KEY}"', code)
            await asyncio.to_thread(exec, code, {})
        served = {
            provider: sum(t["used"] for t in sim.state.stats(provider)["by_token"].values())  # type: ignore[attr-defined]
            for provider in ("modelscope", "bailian")
        }
    assert served == {"modelscope": len(blocks), "bailian": 0}
