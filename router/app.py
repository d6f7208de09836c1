"""The app factory: typed AppKeys, one cleanup_ctx per resource, closed in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from datetime import datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.auth import presented_key
from router.catalog import Catalog
from router.config import Settings
from router.errors import (
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    RouterError,
    StoreUnavailable,
    Unauthorized,
)
from router.metrics import Metrics
from router.pool import KeyPool
from router.proxy import Proxy
from router.quota.days import utc_now
from router.quota.factory import open_store
from router.quota.store import QuotaStore, StoreError
from router.quota_metrics import QuotaReporter
from router.scheduler import watch_day_rollover
from router.upstream import Upstreams

log = logging.getLogger("router.app")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", QuotaStore)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
CATALOG = web.AppKey("catalog", Catalog)
POOL = web.AppKey("pool", KeyPool)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)
REPORTER = web.AppKey("reporter", QuotaReporter)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI's error shape; nothing leaves as a stack trace."""
    try:
        return await handler(request)
    except RouterError as exc:
        return exc.to_response()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        return BodyTooLarge(f"The request body is larger than {limit} bytes.").to_response()
    except web.HTTPNotFound:
        return NotFound(f"No route for {request.method} {request.path}.").to_response()
    except web.HTTPMethodNotAllowed:
        return MethodNotAllowed(f"{request.method} is not allowed on {request.path}.").to_response()
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return RouterError("Internal error in the gateway.").to_response()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text format; quota gauges are read from the store first."""
    token = request.app[SETTINGS].metrics.token
    if token is not None:
        presented = presented_key(request.headers) or ""
        if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
            raise Unauthorized(
                "The metrics endpoint needs its token.", code="invalid_metrics_token"
            )
    await request.app[REPORTER].refresh()
    registry = request.app[METRICS].registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].ping()
    except StoreError:
        return StoreUnavailable("The quota store is unreachable.").to_response()
    return web.json_response({"status": "ready"})


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    store: QuotaStore | None = None,
    registry: CollectorRegistry | None = None,
    fetch_catalog: bool = True,
) -> web.Application:
    """Build the gateway. ``store`` and ``clock`` are injectable for tests."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(registry or CollectorRegistry())
    app[POOL] = KeyPool(settings)
    app[CATALOG] = Catalog(settings)
    app[UPSTREAMS] = Upstreams(settings.providers)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = (
            store
            if store is not None
            else open_store(settings.store.url, prefix=settings.store.prefix)
        )
        yield
        if store is None:
            await app[STORE].aclose()

    async def upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[UPSTREAMS].open()
        yield
        await app[UPSTREAMS].aclose()

    async def proxy_ctx(app: web.Application) -> AsyncIterator[None]:
        app[PROXY] = Proxy(
            settings, app[STORE], app[UPSTREAMS], app[POOL], app[CATALOG], app[METRICS], clock
        )
        app[REPORTER] = QuotaReporter(
            settings, app[STORE], app[POOL], app[METRICS], clock, known_models(app)
        )
        yield

    async def background_ctx(app: web.Application) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(
                watch_day_rollover(clock, settings.quota.tz, settings.quota.reset_time)
            ),
            asyncio.create_task(_every(settings.metrics.refresh_seconds, app[REPORTER].refresh)),
        ]
        if fetch_catalog:
            # One bounded first look, so unknown models are refused from the first request on.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app[CATALOG].refresh(app[UPSTREAMS], app[POOL]), 5)
            tasks.append(asyncio.create_task(app[CATALOG].run(app[UPSTREAMS], app[POOL])))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.extend([store_ctx, upstreams_ctx, proxy_ctx, background_ctx])

    def proxied(name: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            method: Handler = getattr(request.app[PROXY], name)
            return await method(request)

        return handler

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/v1/chat/completions", proxied("chat_completions"))
    app.router.add_post("/v1/embeddings", proxied("embeddings"))
    app.router.add_get("/v1/models", proxied("list_models"))
    _warn_if_open(settings)
    return app


def known_models(app: web.Application) -> Callable[[], Container[str]]:
    """Models that may be metric labels: listed by a provider or named by an alias route."""
    routed = {route.model for alias in app[SETTINGS].models for route in alias.routes}

    def known() -> Container[str]:
        return app[CATALOG].known | routed

    return known


async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await job()
        await asyncio.sleep(seconds)


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
