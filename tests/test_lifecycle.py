"""Process-level faults: SIGTERM with streams in flight, SIGKILL of one replica, workers.

The gateway runs as real processes (``python -m router serve``); the simulator runs in this
process on the real clock, with slow streams so that a stream is surely in flight when the
signal lands. Every wait is a bounded poll, never a sleep used as synchronisation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.config import Settings
from router.pool import KeyPool
from router.quota.days import quota_day, to_ms, utc_now
from router.quota.factory import open_store
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, GatewayProcess, free_port, gateway_config, wait_ready
from tests.test_gateway import MODEL, TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHUNK_DELAY_MS = 100


def events_in(chunks: int) -> int:
    """Data events of a whole simulated stream: role, ``chunks`` pieces, stop, [DONE]."""
    return chunks + 3


def slow_sim(chunks: int) -> Simulator:
    """Roomy tokens; each stream is ``chunks`` events, 100 ms apart."""
    return Simulator(
        SimulatorConfig(
            modelscope=ModelScopeConfig(
                tokens=[
                    ModelScopeToken(secret=s, name=n, daily_limit=1000, model_daily_limit=1000)
                    for n, s in TOKENS
                ]
            ),
            bailian=BailianConfig(keys=[BailianKey(secret="sk-test-bailian", name="main")]),
            stream_chunks=chunks,
            stream_chunk_delay_ms=CHUNK_DELAY_MS,
        )
    )


def config_for(sim: Simulator, **server: Any) -> dict[str, Any]:
    config = gateway_config(
        sim.modelscope_url, sim.bailian_url, tokens=[(n, s, 1000) for n, s in TOKENS]
    )
    config["server"].update(server)
    return config


def body(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


class Stream:
    """One streamed chat completion, read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.data = b""

    @property
    def events(self) -> list[str]:
        text = self.data.decode("utf-8", errors="replace")
        return [line[6:] for line in text.splitlines() if line.startswith("data: ")]

    async def first_event(self) -> None:
        """Read until the first whole event has arrived (bytes reached the client)."""
        while b"\n\n" not in self.data:
            chunk = await self.response.content.readany()
            assert chunk, "the stream ended before its first event"
            self.data += chunk

    async def rest(self) -> bool:
        """Read to the end; False when the connection broke before a clean end."""
        try:
            async for chunk in self.response.content.iter_any():
                self.data += chunk
        except aiohttp.ClientPayloadError:
            return False
        return True


@asynccontextmanager
async def open_stream(http: aiohttp.ClientSession, url: str) -> AsyncIterator[Stream]:
    async with http.post(f"{url}/v1/chat/completions", json=body(True), headers=AUTH) as response:
        assert response.status == 200, await response.read()
        stream = Stream(response)
        await stream.first_event()
        yield stream


async def fresh_get(url: str) -> tuple[int, Any] | None:
    """GET on a new connection; None when the connection is refused or dropped."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
            http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status, orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError):
        return None


async def fresh_chat(url: str) -> tuple[int, Any] | None:
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
            http.post(
                f"{url}/v1/chat/completions",
                json=body(False),
                headers=AUTH,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response,
        ):
            return response.status, orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError):
        return None


async def poll_until(
    probe: Any, done: Any, timeout: float, interval: float = 0.02
) -> tuple[Any, float]:
    """Call ``probe()`` until ``done(result)``; (the result, seconds it took)."""
    started = time.monotonic()
    while True:
        result = await probe()
        if done(result):
            return result, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"still {result!r} after {timeout} s")
        await asyncio.sleep(interval)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The exit code, polled (bounded) without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {proc.pid} still running after {timeout} s")
        await asyncio.sleep(0.02)
    return proc.returncode


def refused(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


# -- SIGTERM --------------------------------------------------------------------------------


async def test_sigterm_drains_then_finishes_the_stream_in_flight_and_exits_0(
    tmp_path: Path,
) -> None:
    drain, grace = 1.0, 10.0
    async with slow_sim(chunks=20) as sim:
        gw = GatewayProcess(
            config_for(sim, drain_seconds=drain, shutdown_grace_seconds=grace), tmp_path
        )
        try:
            await gw.start()
            assert gw.proc is not None
            async with aiohttp.ClientSession() as http, open_stream(http, gw.url) as stream:
                assert sim.state.stats("modelscope")["inflight"] == 1
                gw.proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                # Not ready at once, while the listeners are still open (fresh connections).
                ready, took = await poll_until(
                    lambda: fresh_get(gw.url + "/readyz"),
                    lambda r: r is not None and r[0] == 503,
                    timeout=drain,
                )
                assert ready[1]["error"]["code"] == "shutting_down"
                # A new request during the drain is refused with 503, not served.
                refusal = await fresh_chat(gw.url)
                assert refusal is not None, "the listener closed before the drain ended"
                status, answer = refusal
                assert (status, answer["error"]["code"]) == (503, "shutting_down")
                assert time.monotonic() - sent < drain
                # The stream in flight runs to its clean end.
                assert await stream.rest()
                assert stream.events[-1] == "[DONE]"
                assert len(stream.events) == events_in(20)
                streamed = time.monotonic() - sent
            code = await wait_exit(gw.proc, drain + grace + 5)
            exited = time.monotonic() - sent
        finally:
            gw.stop()
    assert code == 0, gw.log()
    assert exited < drain + grace, exited
    assert refused(gw.port)
    assert sim.state.stats("modelscope")["calls"] == 1  # the refused request never went out
    assert "stopped" in gw.log()
    print(
        f"\nSIGTERM: readyz 503 after {took:.3f} s; stream done {streamed:.2f} s "
        f"after the signal; exit {code} after {exited:.2f} s"
    )


@pytest.mark.parametrize("grace", [2.0, 0.0])
async def test_sigterm_cuts_a_stream_longer_than_the_grace_and_still_exits_0(
    tmp_path: Path, grace: float
) -> None:
    # aiohttp alone cut at twice the grace, and read a grace of 0 as "wait forever"
    drain = 0.5
    async with slow_sim(chunks=200) as sim:  # 20 s of stream
        gw = GatewayProcess(
            config_for(sim, drain_seconds=drain, shutdown_grace_seconds=grace), tmp_path
        )
        try:
            await gw.start()
            assert gw.proc is not None
            async with aiohttp.ClientSession() as http, open_stream(http, gw.url) as stream:
                gw.proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                clean = await stream.rest()
                cut = time.monotonic() - sent
            code = await wait_exit(gw.proc, drain + 2 * grace + 5)
            exited = time.monotonic() - sent
            # The simulator's handler ended too: the upstream request was closed.
            await poll_until(lambda: _inflight(sim), lambda n: n == 0, timeout=5)
        finally:
            gw.stop()
    assert code == 0, gw.log()
    # never a clean [DONE]: the last event says why the stream ended (README: broken streams)
    assert "[DONE]" not in stream.events
    assert clean  # the error event, then the end of the chunked body: no bare TCP cut
    error = orjson.loads(stream.events[-1])["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "shutting_down")
    assert 0 < len(stream.events) - 1 < events_in(200) - 1
    assert '"500 ' not in gw.log()  # the cut stream is logged as the 200 it was
    # cut at the grace (after the drain), not earlier and not much later
    assert drain + grace - 0.3 < cut < drain + grace + 0.75, cut
    assert exited < drain + grace + 2, exited
    print(
        f"\nlong stream, grace {grace} s: cut {cut:.2f} s after SIGTERM, "
        f"exit {code} after {exited:.2f} s"
    )


async def _inflight(sim: Simulator) -> int:
    count: int = sim.state.stats("modelscope")["inflight"]  # type: ignore[assignment]
    return count


# -- SIGKILL of one replica -----------------------------------------------------------------


def settings_of(config_path: Path) -> Settings:
    return Settings.model_validate(yaml.safe_load(config_path.read_text(encoding="utf-8")))


async def store_counts(settings: Settings) -> dict[str, dict[str, int]]:
    """provider -> key -> used today, read from the shared store by a fresh client."""
    pool = KeyPool(settings)
    store = open_store(settings.store.url, prefix=settings.store.prefix)
    try:
        now = utc_now()
        day = quota_day(now, settings.quota.tz, settings.quota.reset_time)
        counts = {}
        for provider in settings.providers:
            usages = await store.snapshot(
                provider.name, pool.default_specs(provider), day, to_ms(now)
            )
            counts[provider.name] = {u.key: u.used for u in usages}
        return counts
    finally:
        await store.aclose()


def sim_counts(sim: Simulator) -> dict[str, dict[str, int]]:
    return {
        provider: {name: t["used"] for name, t in stats["by_token"].items()}
        for provider in ("modelscope", "bailian")
        for stats in [sim.state.stats(provider)]
    }


async def test_sigkill_of_one_replica_leaves_the_other_serving_and_the_counts_exact(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    per_replica = 4
    async with slow_sim(chunks=20) as sim:
        config = config_for(sim)
        config["store"] = {"url": redis_server.url, "prefix": f"t{uuid.uuid4().hex[:8]}"}
        victim = GatewayProcess(config, tmp_path, "victim")
        survivor = GatewayProcess(config, tmp_path, "survivor")
        try:
            await asyncio.gather(victim.start(), survivor.start())
            assert victim.proc is not None
            async with aiohttp.ClientSession() as http:
                streams: dict[str, list[Stream]] = {"victim": [], "survivor": []}
                contexts = []
                for name, gw in (("victim", victim), ("survivor", survivor)):
                    for _ in range(per_replica):
                        ctx = open_stream(http, gw.url)
                        streams[name].append(await ctx.__aenter__())
                        contexts.append(ctx)
                try:
                    assert await _inflight(sim) == 2 * per_replica
                    victim.proc.send_signal(signal.SIGKILL)
                    assert await wait_exit(victim.proc, 10) == -signal.SIGKILL
                    survived = await asyncio.gather(*(s.rest() for s in streams["survivor"]))
                    killed = await asyncio.gather(*(s.rest() for s in streams["victim"]))
                finally:
                    for ctx in contexts:
                        await ctx.__aexit__(None, None, None)
                assert all(survived)
                for stream in streams["survivor"]:
                    assert stream.events[-1] == "[DONE]"
                    assert len(stream.events) == events_in(20)
                for stream in streams["victim"]:  # cut: never a clean end
                    assert "[DONE]" not in stream.events
                assert not any(killed)
                # The survivor serves new requests, streamed and not.
                for stream_it in (False, True, False):
                    async with http.post(
                        f"{survivor.url}/v1/chat/completions", json=body(stream_it), headers=AUTH
                    ) as response:
                        assert response.status == 200
                        assert response.headers["x-router-provider"] == "modelscope"
                        text = await response.read()
                        if stream_it:
                            assert text.rstrip().endswith(b"data: [DONE]")
            # the victim's upstream calls were closed by the kernel, the simulator saw it
            await poll_until(lambda: _inflight(sim), lambda n: n == 0, timeout=5)
        finally:
            victim.stop()
            survivor.stop()
        stored = await store_counts(settings_of(survivor.config_path))
        simulated = sim_counts(sim)
    # Every call served is counted once: nothing is counted ahead of a real call, so the store
    # equals what the upstream saw, even for the replica killed mid-stream.
    assert stored == simulated, (stored, simulated)
    assert sum(simulated["modelscope"].values()) == 2 * per_replica + 3
    assert sum(stored["bailian"].values()) == 0
    print(f"\nSIGKILL: store {stored} == simulator {simulated}")


# -- server.workers -------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        return [int(p) for p in children.read_text().split()]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_two_workers_serve_and_sigterm_stops_both(tmp_path: Path) -> None:
    async with slow_sim(chunks=3) as sim:
        port = free_port()
        config = config_for(sim, port=port, workers=2, drain_seconds=0.2)
        config["store"] = {"url": f"sqlite:///{tmp_path / 'quota.db'}"}
        config_path = tmp_path / "workers.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = tmp_path / "workers.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
        with log_path.open("ab") as log:
            proc = subprocess.Popen(  # noqa: ASYNC220 - waited on by polling below
                [sys.executable, "-m", "router", "serve", "--config", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url + "/readyz", 30, proc)
            # both workers listen on the port (SO_REUSEPORT), the parent does not
            workers, _ = await poll_until(
                lambda: _listeners(proc.pid, port), lambda w: len(w) == 2, timeout=20
            )
            assert proc.pid not in workers
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:
                statuses = []
                for i in range(12):
                    async with http.post(
                        f"{url}/v1/chat/completions", json=body(i % 2 == 0), headers=AUTH
                    ) as response:
                        statuses.append(response.status)
                        await response.read()
            assert statuses == [200] * 12
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = await wait_exit(proc, 20)
            exited = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        log = log_path.read_text(encoding="utf-8", errors="replace")
    assert code == 0, log
    assert not any(alive(pid) for pid in workers), log
    assert refused(port)
    assert sim.state.stats("modelscope")["calls"] == 12
    assert log.count("stopped") >= 2, log  # each worker drained and stopped by itself
    print(f"\nworkers: pids {workers}; SIGTERM -> parent exit {code} after {exited:.2f} s")


async def _listeners(parent: int, port: int) -> list[int]:
    return listeners(parent, port)


def listeners(parent: int, port: int) -> list[int]:
    """The children of ``parent`` that hold a socket listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    found = []
    for pid in child_pids(parent):
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        if links & inodes:
            found.append(pid)
    return found
