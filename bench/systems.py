"""The systems under test, one process each on loopback, all in front of the same simulator."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.procs import Proc, free_port

MODEL = "Qwen/Qwen3-32B"
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
TOKENS = [("alice", "ms-bench-alice"), ("bob", "ms-bench-bob"), ("carol", "ms-bench-carol")]
HUGE = 10**9  # daily limits no benchmark run can reach


def pool_tokens(n: int) -> list[tuple[str, str]]:
    """``n`` tokens for the pool-size axis (gateway-redis-k<n>): names k0000, k0001, ..."""
    return [(f"k{i:04d}", f"ms-bench-k{i:04d}") for i in range(n)]


CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Variant:
    """One upstream behaviour of the simulator."""

    name: str
    latency_ms: int
    stream_chunks: int
    stream_chunk_delay_ms: int

    def describe(self) -> str:
        if not self.latency_ms and not self.stream_chunk_delay_ms:
            return f"no latency, {self.stream_chunks} SSE chunks back to back"
        return (
            f"{self.latency_ms} ms before the answer, {self.stream_chunks} SSE chunks "
            f"{self.stream_chunk_delay_ms} ms apart"
        )


FAST = Variant("fast", 0, 10, 0)
REALISTIC = Variant("realistic", 50, 10, 5)
#: --slow-streams: the first chunk after 200 ms, then 9 more 400 ms apart (a stream open ~3.8 s)
SLOW = Variant("slow", 200, 10, 400)


def chat_body(stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the benefits of connection pooling."},
        ],
    }


class Simulator:
    """`python -m router simulate` as its own process."""

    def __init__(
        self,
        workdir: Path,
        variant: Variant,
        token_limit: int = HUGE,
        name: str = "sim",
        pool_size: int = 0,
    ):
        self.variant = variant
        self.port = free_port()
        self.bailian_port = free_port()
        config = {
            "modelscope": {
                "tokens": [
                    {
                        "secret": s,
                        "name": n,
                        "daily_limit": token_limit,
                        "model_daily_limit": token_limit,
                    }
                    for n, s in [*TOKENS, *pool_tokens(pool_size)]
                ]
            },
            "bailian": {"keys": [{"secret": "sk-bench-bailian", "name": "main"}]},
            "latency_ms": variant.latency_ms,
            "stream_chunks": variant.stream_chunks,
            "stream_chunk_delay_ms": variant.stream_chunk_delay_ms,
        }
        path = workdir / f"{name}-{variant.name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        args = [sys.executable, "-m", "router", "--log-level", "WARNING", "simulate"]
        args += ["--config", str(path), "--modelscope-port", str(self.port)]
        args += ["--bailian-port", str(self.bailian_port)]
        self.proc = Proc(f"{name}-{variant.name}", args, workdir)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.root + "/v1"

    @property
    def bailian_v1(self) -> str:
        return f"http://127.0.0.1:{self.bailian_port}/compatible-mode/v1"

    async def start(self) -> Simulator:
        self.proc.start()
        await self.proc.wait_ready(self.root + "/_sim/stats")
        return self

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.root + "/_sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class Endpoint:
    """A running system: where wrk sends, with which headers, and whose RSS counts."""

    url: str
    headers: dict[str, str]
    proc: Proc
    version: str = ""
    notes: list[str] = field(default_factory=list)


def gateway_settings(
    sim: Simulator,
    store_url: str,
    *,
    port: int,
    prefix: str = "bench",
    token_limit: int = HUGE,
    bailian: bool = True,
    workers: int | None = None,
    tokens: list[tuple[str, str]] = TOKENS,
) -> dict[str, Any]:
    """A production-shaped config: pooled tokens (three by default), Bailian fallback, one
    client key."""
    providers: list[dict[str, Any]] = [
        {
            "name": "modelscope",
            "type": "modelscope",
            "base_url": sim.v1,
            "daily_limit": token_limit,
            "model_daily_limit": token_limit,
            "keys": [{"name": n, "secret": s} for n, s in tokens],
        }
    ]
    if bailian:
        providers.append(
            {
                "name": "bailian",
                "type": "bailian",
                "base_url": sim.bailian_v1,
                "keys": [{"name": "main", "secret": "sk-bench-bailian"}],
            }
        )
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if workers is not None:
        server["workers"] = workers
    return {
        "server": server,
        "store": {"url": store_url, "prefix": prefix},
        "providers": providers,
        "clients": [{"name": "bench", "key": CLIENT_KEY}],
    }


async def start_gateway(
    workdir: Path,
    name: str,
    settings: dict[str, Any],
    ready_timeout: float = 60,
    log_level: str = "INFO",
) -> Endpoint:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    port = settings["server"]["port"]
    args = [sys.executable, "-m", "router", "--log-level", log_level, "serve"]
    args += ["--config", str(path)]
    # ROUTER_* variables would override the file (ROUTER_STORE__URL...): not in a benchmark
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    proc = Proc(name, args, workdir, env=env).start()
    try:
        await proc.wait_ready(f"http://127.0.0.1:{port}/readyz", limit_s=ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return Endpoint(
        f"http://127.0.0.1:{port}{CHAT}", {"Authorization": f"Bearer {CLIENT_KEY}"}, proc
    )


async def start_passthrough(workdir: Path, sim: Simulator) -> Endpoint:
    port = free_port()
    args = [sys.executable, "-m", "bench.passthrough", "--upstream", sim.root, "--port", str(port)]
    proc = Proc("passthrough", args, workdir).start()
    try:
        await proc.wait_ready(f"http://127.0.0.1:{port}/healthz")
    except BaseException:
        proc.stop()
        raise
    return Endpoint(
        f"http://127.0.0.1:{port}{CHAT}", {"Authorization": f"Bearer {TOKENS[0][1]}"}, proc
    )


def direct(sim: Simulator) -> Endpoint:
    return Endpoint(sim.root + CHAT, {"Authorization": f"Bearer {TOKENS[0][1]}"}, sim.proc)


def workers_supported() -> bool:
    """Whether this checkout's gateway has ``server.workers`` (being added by #5's lead)."""
    from router.config import ServerSettings

    return "workers" in ServerSettings.model_fields
