"""Everything built from one configuration, swapped whole on reload. A request holds the Runtime it
started with until it ends, so a reload never drops an in-flight request or stream; the old
Runtime closes its upstream sessions once drained. The quota store and the metrics registry
outlive runtimes: today's counts are never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Container
from datetime import datetime

from router.auth import ClientAuth
from router.catalog import Catalog
from router.config import Settings
from router.failover import Failover
from router.ledger import Ledger
from router.metrics import Metrics
from router.pool import KeyPool
from router.pricing import Prices
from router.quota.resilient_store import ResilientStore
from router.quota.store import QuotaStore
from router.quota_metrics import QuotaReporter
from router.routing import RouteTable
from router.scheduler import watch_day_rollover
from router.upstream import Upstreams

log = logging.getLogger("router.runtime")

CATALOG_FIRST_LOOK_SECONDS = 5.0


class Runtime:
    """One configuration's client keys, routes, key pool, model catalog, upstream sessions,
    failover engine and quota reporter, and the requests running on them."""

    def __init__(
        self,
        settings: Settings,
        store: QuotaStore,
        metrics: Metrics,
        clock: Callable[[], datetime],
        *,
        ledger: Ledger,
        previous: Runtime | None = None,
    ) -> None:
        self.settings = settings
        self.store = store  # the app's: outlives this runtime
        self.metrics = metrics  # the app's too
        self.clock = clock
        self.ledger = ledger  # the app's: its writer outlives this runtime
        self.prices = Prices(settings)
        self.auth = ClientAuth(settings.clients)
        self.routes = RouteTable(settings)
        self.pool = KeyPool(settings)
        self.catalog = Catalog(settings)
        if previous is not None:
            self.catalog.inherit(previous.catalog)
        self.upstreams = Upstreams(settings.providers)
        self.failover = Failover(
            settings,
            store,
            self.upstreams,
            self.pool,
            self.catalog,
            self.routes,
            metrics,
            clock,
            self.ledger,
        )
        self.reporter = QuotaReporter(
            settings, self.store, self.pool, metrics, clock, self.known_models
        )
        self._routed = {route.model for alias in settings.models for route in alias.routes}
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def known_models(self) -> Container[str]:
        """Models that may be metric labels: listed by a provider or named by an alias route."""
        return self.catalog.known | self._routed

    def model_ids(self, client: str | None = None) -> list[str]:
        """What ``GET /v1/models`` lists: the aliases, then every model a provider lists;
        for a client, only those its ``models`` patterns allow."""
        ids = dict.fromkeys([*self.routes.aliases, *self.catalog.all_models()])
        if client is None:
            return list(ids)
        return [i for i in ids if self.failover.policy.allows_model(client, i)]

    async def start(self, *, fetch_catalog: bool) -> None:
        await self.upstreams.open()
        if fetch_catalog:
            # One bounded first look, so unknown models are refused from the first request on.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.catalog.refresh(self.upstreams, self.pool), CATALOG_FIRST_LOOK_SECONDS
                )
            self._spawn(self.catalog.run(self.upstreams, self.pool))
        quota = self.settings.quota
        self._spawn(watch_day_rollover(self.clock, quota.tz, quota.reset_time))
        self._spawn(_every(self.settings.metrics.refresh_seconds, self.reporter.refresh))
        if isinstance(self.store, ResilientStore):  # store.on_error: fail_open
            self._spawn(self.store.heartbeat_forever())

    def _spawn(self, job: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(job))

    # -- requests hold their runtime ---------------------------------------------------------

    def enter(self) -> None:
        self._inflight += 1
        self._drained.clear()

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def stop(self, grace_seconds: float) -> None:
        """Stop background work, wait (bounded) for in-flight requests, close upstream sessions."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._inflight:
            try:
                await asyncio.wait_for(self._drained.wait(), grace_seconds)
            except TimeoutError:
                log.warning("%d requests still running on the old configuration", self._inflight)
        await self.upstreams.aclose()


async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await job()
        await asyncio.sleep(seconds)
