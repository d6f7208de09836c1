"""The app factory, ``create_app(settings)``: the route table, the middleware, the shared state
(router.state) and one cleanup_ctx per resource (quota store, live runtime, SIGHUP reload),
closed in reverse order. The handlers live in router.gateway, router.admin, router.probes and
router.ui (the web page).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from router import gateway, probes
from router.admin import add_admin_routes
from router.config import Settings
from router.ledger import Ledger
from router.logs import quiet_parser_errors
from router.metrics import Metrics
from router.middleware import error_middleware
from router.quota.days import utc_now
from router.quota.factory import open_store
from router.quota.store import QuotaStore
from router.runtime import Runtime
from router.state import (
    CONFIG_PATH,
    INFLIGHT,
    LEDGER,
    LIFECYCLE,
    LIVE,
    METRICS,
    SETTINGS,
    STORE,
    InFlight,
    Lifecycle,
    Live,
)
from router.ui import add_ui_routes

# STORE too: tests reach the app's quota store as router.app.STORE.
__all__ = ["STORE", "create_app"]

log = logging.getLogger("router.app")
LEDGER_FLUSH_SECONDS = 5.0  # at shutdown, for the usage the last answers left


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    store: QuotaStore | None = None,
    registry: CollectorRegistry | None = None,
    fetch_catalog: bool = True,
    config_path: Path | None = None,
) -> web.Application:
    """Build the gateway. ``store`` and ``clock`` are injectable for tests."""
    quiet_parser_errors()  # aiohttp would log a malformed request's raw header line (secrets)
    inflight = InFlight()
    app = web.Application(
        middlewares=[error_middleware(inflight)], client_max_size=settings.server.max_body_bytes
    )
    app[INFLIGHT] = inflight
    app[SETTINGS] = settings
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics(registry or CollectorRegistry())
    if config_path is not None:
        app[CONFIG_PATH] = config_path

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = (
            store
            if store is not None
            else open_store(
                settings.store.url, prefix=settings.store.prefix, on_error=settings.store.on_error
            )
        )
        yield
        if store is None:
            await app[STORE].aclose()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        runtime = Runtime(settings, app[STORE], app[METRICS], clock, ledger=app[LEDGER])
        await runtime.start(fetch_catalog=fetch_catalog)
        app[LIVE] = Live(app, runtime, fetch_catalog=fetch_catalog)
        yield
        await app[LIVE].aclose()

    app.cleanup_ctx.extend([store_ctx, _ledger_ctx, runtime_ctx, _sighup_ctx])
    _add_routes(app)
    _warn_if_open(settings)
    return app


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    app.router.add_get("/metrics", probes.metrics)
    app.router.add_post("/v1/chat/completions", gateway.chat_completions)
    app.router.add_post("/v1/embeddings", gateway.embeddings)
    app.router.add_get("/v1/models", gateway.list_models)
    app.router.add_post("/v1/images/generations", gateway.images)
    app.router.add_get("/v1/tasks/{task_id}", gateway.task)
    app.router.add_post("/v1/messages", gateway.messages)
    app.router.add_route("*", "/v1/{path:.+}", gateway.passthrough)  # allow-listed only
    add_admin_routes(app)
    add_ui_routes(app)  # the web page at /ui/


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The usage writer (router.ledger): it outlives reloads, and at shutdown it writes what
    the last answers left (after the runtime drained them, before the store closes)."""
    flush = app[SETTINGS].usage.flush_seconds
    ledger = app[LEDGER] = Ledger(app[STORE], flush_seconds=flush)
    writer = asyncio.create_task(ledger.run())
    yield
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await ledger.flush(LEDGER_FLUSH_SECONDS)


async def _sighup_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP reloads the config file (where signals can be handled: the main thread)."""
    loop = asyncio.get_running_loop()
    live = app[LIVE]
    pending: set[asyncio.Task[None]] = set()

    def on_signal() -> None:
        task = loop.create_task(live.on_sighup())
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_signal)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / Windows
        yield
        return
    yield
    loop.remove_signal_handler(signal.SIGHUP)


def _warn_if_open(settings: Settings) -> None:
    if settings.clients:
        return
    try:
        loopback = ipaddress.ip_address(settings.server.host).is_loopback
    except ValueError:
        loopback = settings.server.host == "localhost"
    if not loopback:
        log.warning(
            "no clients are configured and the gateway listens on %s: anyone who can reach it "
            "can spend the pool; add 'clients:' to the config",
            settings.server.host,
        )
