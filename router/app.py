"""The app factory: typed AppKeys, one cleanup_ctx per resource, closed in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from yarl import URL

from router.admin import add_admin_routes
from router.auth import matches, presented_key
from router.config import ConfigError, Settings, load_settings, secret_digest
from router.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    RouterError,
    ShuttingDown,
    StoreUnavailable,
    Unauthorized,
)
from router.logs import flush_logs, quiet_parser_errors
from router.metrics import Metrics
from router.proxy import request_id_of
from router.quota.days import next_reset, quota_day, to_ms, utc_now
from router.quota.factory import open_store
from router.quota.store import QuotaStore, StoreError, probe_reservation
from router.runtime import Runtime

log = logging.getLogger("router.app")

SETTINGS = web.AppKey("settings", Settings)  # as started: server and store settings
STORE = web.AppKey("store", QuotaStore)
METRICS = web.AppKey("metrics", Metrics)
CONFIG_PATH = web.AppKey("config_path", Path)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RELOAD_GRACE_SECONDS = 600.0


class InFlight:
    """The handlers running now: waited for at shutdown, up to the grace, then cancelled.

    aiohttp's own shutdown waits for a handler twice (then cancels the request, waits again,
    and only then cancels the handler), each up to ``shutdown_timeout``, and reads 0 as "no
    limit": a stream got twice the grace, and a grace of 0 waited forever (router.serve).
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, task: asyncio.Task[object]) -> None:
        self.tasks.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self._idle.set()

    async def finish(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for every handler; cancel those still running."""
        if not self.tasks:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "grace of %.1f s over: cutting %d requests still in flight", grace, len(self.tasks)
            )
            for task in list(self.tasks):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_TIMEOUT_SECONDS)


INFLIGHT = web.AppKey("inflight", InFlight)
#: After the grace: how long the last answers (and cancelled handlers) get to be written.
CLOSE_TIMEOUT_SECONDS = 1.0


def error_middleware(inflight: InFlight) -> Middleware:
    """Every error leaves as OpenAI's error shape (Anthropic's on its API); nothing leaves as a
    stack trace; every answer carries ``x-request-id``. A path mangled by a client's base URL
    is served as the path it meant (``mended_path``). The handler is also tracked in
    ``inflight`` for the shutdown: one middleware, not several, since each layer costs every
    request a coroutine and a frame on every resume."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()  # the handler's (request.task is the connection's)
        assert task is not None  # aiohttp runs every handler in a task
        inflight.enter(task)
        error: RouterError
        try:
            if _maybe_mangled(request.rel_url.raw_path):
                request, handler = await _mended(request, handler)
            response = await handler(request)
            if "x-request-id" not in response.headers and not response.prepared:
                response.headers["x-request-id"] = request_id_of(request)
            return response
        except RouterError as exc:
            error = exc
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[SETTINGS].server.max_body_bytes
            error = BodyTooLarge(f"The request body is larger than {limit} bytes.")
        except web.HTTPNotFound:
            error = NotFound(f"No route for {request.method} {request.path}.")
        except web.HTTPMethodNotAllowed:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}.")
        except web.HTTPException as exc:
            if "x-request-id" not in exc.headers:
                exc.headers["x-request-id"] = request_id_of(request)
            raise
        except ConnectionResetError:  # the client left mid-body (an admin POST): not our fault
            error = BadRequest(
                "The connection closed before the whole request body arrived.",
                code="incomplete_body",
            )
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            error = RouterError("Internal error in the gateway.")
        finally:
            inflight.leave(task)
        return _error_response(request, error)

    return middleware


def _error_response(request: web.Request, error: RouterError) -> web.Response:
    """``error`` in its API's shape, with the request's id (the proxy's, when it named one)."""
    if _is_anthropic(request.path):  # every answer on Anthropic's paths, a 405 included
        error.anthropic = True
    if "x-request-id" in error.headers:
        return error.to_response()
    return error.to_response({"x-request-id": request_id_of(request)})


def _is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# -- paths as clients mangle them ----------------------------------------------------------------
# A base URL with /v1 where the client appends /v1 itself (the anthropic SDK: /v1/v1/messages),
# doubled slashes (a base URL ending in one: //v1//chat/completions), a trailing slash
# (/v1/models/): each is served as the path it meant. Not a redirect: a client sends a POST
# body again only on a 307/308, and many follow no redirect at all. The path is rewritten
# before routing and never decoded: a dot segment or any percent-escape (an encoded slash or
# dot) leaves the path as it came, refused as before (404, or the passthrough's own check in
# router.proxy).


def _maybe_mangled(raw_path: str) -> bool:
    """A cheap first look, on every request: could ``mended_path`` change this path?"""
    return "//" in raw_path or raw_path.startswith("/v1/v1") or raw_path[-1:] == "/"


def mended_path(raw_path: str) -> str | None:
    """The path a mangled raw path meant; None when there is nothing (safe) to mend."""
    if not raw_path.startswith("/"):
        return None
    segments = [segment for segment in raw_path.split("/") if segment]
    if any(segment in (".", "..") or "%" in segment or "\\" in segment for segment in segments):
        return None
    while segments[:2] == ["v1", "v1"]:
        del segments[0]
    mended = "/" + "/".join(segments)
    return None if mended == raw_path else mended


async def _mended(request: web.Request, handler: Handler) -> tuple[web.Request, Handler]:
    """The request on its mended path, routed again, and that route's handler (the same
    request and handler when there is nothing to mend). The body is not read yet: it goes on
    with the new request."""
    url = request.rel_url
    path = mended_path(url.raw_path)
    if path is None:
        return request, handler
    mended = request.clone(
        rel_url=URL.build(
            path=path, query_string=url.raw_query_string, fragment=url.raw_fragment, encoded=True
        )
    )
    match_info = await request.app.router.resolve(mended)
    match_info.add_app(request.app)
    match_info.freeze()
    mended._match_info = match_info
    # The route's own handler: this is the app's only middleware, so nothing is skipped.
    return mended, match_info.handler


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Lifecycle:
    """Set when the process is stopping: not ready, and new requests are refused."""

    draining = False


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return ShuttingDown("The gateway is shutting down.").to_response()
    runtime = request.app[LIVE].runtime
    quota = runtime.settings.quota
    now = runtime.clock()
    day = quota_day(now, quota.tz, quota.reset_time)
    day_end_ms = to_ms(next_reset(now, quota.tz, quota.reset_time))
    try:
        # Ready means a reservation can be made, not merely that the store answers a ping: a
        # read-only or full Redis answers PING and refuses every reservation.
        await probe_reservation(request.app[STORE], day, to_ms(now), day_end_ms)
    except StoreError:
        return StoreUnavailable("The quota store cannot make a reservation.").to_response()
    return web.json_response({"status": "ready"})


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text format; quota gauges are read from the store first."""
    runtime = request.app[LIVE].runtime
    token = runtime.settings.metrics.token
    if token is not None:
        presented = presented_key(request.headers) or ""
        # Compared as digests, like client and admin keys (an invalid UTF-8 header made the
        # plain compare raise and /metrics answer 500: tests/test_fuzz.py).
        if not matches(presented, secret_digest(token.get_secret_value())):
            raise Unauthorized(
                "The metrics endpoint needs its token.", code="invalid_metrics_token"
            )
    await runtime.reporter.refresh()
    response = web.Response(body=generate_latest(request.app[METRICS].registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def proxied(name: str) -> Handler:
    """A handler of the current runtime's Proxy; the request keeps that runtime to its end."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.app[LIFECYCLE].draining:
            raise ShuttingDown("The gateway is shutting down; retry on another replica.")
        runtime = request.app[LIVE].runtime
        runtime.enter()
        try:
            method: Handler = getattr(runtime.proxy, name)
            return await method(request)
        finally:
            runtime.leave()

    return handler


class Live:
    """The current Runtime, and the reload that swaps it without dropping requests or counts."""

    def __init__(self, app: web.Application, runtime: Runtime, *, fetch_catalog: bool) -> None:
        self.app = app
        self.runtime = runtime
        self.fetch_catalog = fetch_catalog
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self, settings: Settings | None = None) -> Settings:
        """Load the config file again (or use ``settings``); raise ConfigError and keep the old."""
        async with self._lock:
            if settings is None:
                path = self.app.get(CONFIG_PATH)
                if path is None:
                    raise ConfigError("this gateway was not started from a config file")
                settings = load_settings(path)
            _warn_about_restart_only_changes(self.app[SETTINGS], settings)
            old = self.runtime
            new = Runtime(settings, self.app[STORE], self.app[METRICS], old.clock, previous=old)
            await new.start(fetch_catalog=self.fetch_catalog)
            self.runtime = new
            task = asyncio.create_task(old.stop(RELOAD_GRACE_SECONDS))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info(
                "configuration reloaded: %d providers, %d keys, %d clients",
                len(settings.providers),
                sum(len(p.keys) for p in settings.providers),
                len(settings.clients),
            )
            return settings

    async def on_sighup(self) -> None:
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, the old configuration stays: %s", exc)

    async def aclose(self) -> None:
        for task in list(self._retiring):
            await task
        await self.runtime.stop(0)


LIVE = web.AppKey("live", Live)


def _warn_about_restart_only_changes(running: Settings, new: Settings) -> None:
    for section in ("server", "store"):
        if getattr(running, section) != getattr(new, section):
            log.warning("'%s' changed: it takes effect at the next restart", section)


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
        runtime = Runtime(settings, app[STORE], app[METRICS], clock)
        await runtime.start(fetch_catalog=fetch_catalog)
        app[LIVE] = Live(app, runtime, fetch_catalog=fetch_catalog)
        yield
        await app[LIVE].aclose()
        flush_logs()  # the last access lines (the log handler flushes them within 0.1 s)

    async def sighup_ctx(app: web.Application) -> AsyncIterator[None]:
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

    app.cleanup_ctx.extend([store_ctx, runtime_ctx, sighup_ctx])

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/v1/chat/completions", proxied("chat_completions"))
    app.router.add_post("/v1/embeddings", proxied("embeddings"))
    app.router.add_get("/v1/models", proxied("list_models"))
    app.router.add_post("/v1/images/generations", proxied("images"))
    app.router.add_get("/v1/tasks/{task_id}", proxied("task"))
    app.router.add_post("/v1/messages", proxied("messages"))
    app.router.add_route("*", "/v1/{path:.+}", proxied("passthrough"))  # allow-listed only
    add_admin_routes(app)
    _warn_if_open(settings)
    return app


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
