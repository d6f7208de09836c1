"""The app's shared state, under typed ``web.AppKey``s: the settings it started with, the quota
store, the metrics, the live Runtime (and the reload that swaps it), the handlers in flight and
whether the process is draining. The handlers (router.gateway, router.admin, router.probes,
router.middleware) import this module; it imports none of them, so there is no import circle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from router.config import ConfigError, Settings, load_settings
from router.ledger import Ledger
from router.metrics import Metrics
from router.quota.store import QuotaStore
from router.runtime import Runtime

log = logging.getLogger("router.state")

#: A reload lets the old configuration's requests run this long before it closes them.
RELOAD_GRACE_SECONDS = 600.0
#: After the shutdown grace: how long the last answers (and cancelled handlers) get to be written.
CLOSE_TIMEOUT_SECONDS = 1.0


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

    async def idle(self) -> None:
        """Wait until no handler runs (tests: every request's last step, usage included)."""
        await self._idle.wait()

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


class Lifecycle:
    """Set when the process is stopping: not ready, and new requests are refused."""

    draining = False


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
            new = Runtime(
                settings,
                self.app[STORE],
                self.app[METRICS],
                old.clock,
                ledger=self.app[LEDGER],
                previous=old,
            )
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


def _warn_about_restart_only_changes(running: Settings, new: Settings) -> None:
    for section in ("server", "store"):
        if getattr(running, section) != getattr(new, section):
            log.warning("'%s' changed: it takes effect at the next restart", section)
    if running.usage.flush_seconds != new.usage.flush_seconds:
        log.warning("'usage.flush_seconds' changed: it takes effect at the next restart")


SETTINGS = web.AppKey("settings", Settings)  # as started: server and store settings
STORE = web.AppKey("store", QuotaStore)
LEDGER = web.AppKey("ledger", Ledger)
METRICS = web.AppKey("metrics", Metrics)
CONFIG_PATH = web.AppKey("config_path", Path)
INFLIGHT = web.AppKey("inflight", InFlight)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
LIVE = web.AppKey("live", Live)
