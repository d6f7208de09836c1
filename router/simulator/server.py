"""Running the two simulated upstreams on loopback: ``Simulator`` and ``run_simulator``."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiohttp import web

from router.simulator.app import (
    BAILIAN_BASE,
    CTX,
    MODELSCOPE_BASE,
    create_bailian_app,
    create_modelscope_app,
)
from router.simulator.config import SimulatorConfig, default_simulator_config
from router.simulator.faults import Faults
from router.simulator.state import Clock, SimState

log = logging.getLogger("router.simulator")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Simulator:
    """Both simulated upstreams over real HTTP.

    ``async with Simulator(config, clock=...) as sim:`` binds free loopback ports (unless
    ports are given); ``sim.modelscope_url`` / ``sim.bailian_url`` are the OpenAI base URLs,
    ``sim.modelscope_root`` / ``sim.bailian_root`` the roots of the /_sim/ control APIs,
    ``sim.state`` and ``sim.faults`` can be used directly.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Clock | None = None,
        host: str = "127.0.0.1",
        modelscope_port: int = 0,
        bailian_port: int = 0,
    ) -> None:
        self.config = config if config is not None else default_simulator_config()
        self.state = SimState(self.config, clock)
        self.faults = Faults()
        self.host = host
        self.modelscope_port = modelscope_port
        self.bailian_port = bailian_port
        self.modelscope_app = create_modelscope_app(self.state, self.faults)
        self.bailian_app = create_bailian_app(self.state, self.faults)
        self._runners: list[web.AppRunner] = []

    @property
    def modelscope_root(self) -> str:
        return _url(self.host, self.modelscope_port)

    @property
    def bailian_root(self) -> str:
        return _url(self.host, self.bailian_port)

    @property
    def modelscope_url(self) -> str:
        return self.modelscope_root + MODELSCOPE_BASE

    @property
    def bailian_url(self) -> str:
        return self.bailian_root + BAILIAN_BASE

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        bound = runner.addresses[0]
        return int(bound[1])

    async def start(self) -> None:
        if self._runners:
            raise RuntimeError("simulator already started")
        try:
            self.modelscope_port = await self._serve(self.modelscope_app, self.modelscope_port)
            self.bailian_port = await self._serve(self.bailian_app, self.bailian_port)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for app in (self.modelscope_app, self.bailian_app):
            app[CTX].closing.set()  # ends hanging requests
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_simulator(
    config: SimulatorConfig, host: str, modelscope_port: int, bailian_port: int
) -> None:
    """Serve both simulated upstreams until cancelled."""
    sim = Simulator(config, host=host, modelscope_port=modelscope_port, bailian_port=bailian_port)
    await sim.start()
    try:
        log.info("ModelScope simulator at %s", sim.modelscope_url)
        log.info("Bailian simulator at %s", sim.bailian_url)
        await asyncio.Event().wait()
    finally:
        await sim.stop()
