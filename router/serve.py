"""Run the gateway: event loop (uvloop where available), signals, graceful shutdown, workers.

SIGTERM (or SIGINT): readiness turns false and new requests get 503 at once; the listeners
close; requests and streams in flight get ``server.shutdown_grace_seconds`` to finish; exit 0.
SIGHUP: reload the config file. ``server.workers: N`` runs N processes on one port
(SO_REUSEPORT), supervised by this one, which passes every signal on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiohttp import web

from router.app import create_app
from router.config import Settings
from router.logs import configure_logging
from router.quota.urls import mask_url
from router.state import CLOSE_TIMEOUT_SECONDS, INFLIGHT, LIFECYCLE

log = logging.getLogger("router.serve")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
KEEPALIVE_SECONDS = 75.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(settings: Settings, config_path: Path | None = None) -> int:
    """Serve until a stop signal; the exit code."""
    log.info(
        "modelscope-router on http://%s:%d (store %s, %d providers, %d worker%s)",
        settings.server.host,
        settings.server.port,
        mask_url(settings.store.url),
        len(settings.providers),
        settings.server.workers,
        "" if settings.server.workers == 1 else "s",
    )
    if settings.server.workers > 1:
        return _supervise(settings, config_path)
    return run_worker(settings, config_path, reuse_port=False)


def run_worker(settings: Settings, config_path: Path | None, *, reuse_port: bool) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve_until_stopped(settings, config_path, reuse_port))
    finally:
        loop.close()


async def _serve_until_stopped(
    settings: Settings, config_path: Path | None, reuse_port: bool
) -> int:
    grace = settings.server.shutdown_grace_seconds
    app = create_app(settings, config_path=config_path)
    # Handlers are waited for (and cut) by router.state.InFlight; aiohttp's own wait is only for
    # the last answers to be written. Never 0: aiohttp reads a shutdown_timeout of 0 as "no limit".
    # An idle keep-alive connection is closed after 75 s (aiohttp's own default is an hour).
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=CLOSE_TIMEOUT_SECONDS,
        keepalive_timeout=KEEPALIVE_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    app[LIFECYCLE].draining = True
    log.info("stopping: not ready, finishing requests in flight (up to %.0f s)", grace)
    # A load balancer sees /readyz fail before the listeners close.
    await asyncio.sleep(settings.server.drain_seconds)
    for listening in list(runner.sites):
        await listening.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after
    await app[INFLIGHT].finish(grace)
    # Closes the connections and then the app's resources (store, upstream sessions).
    await runner.cleanup()
    log.info("stopped")
    return 0


def _worker_main(settings: Settings, config_path: Path | None, log_level: str) -> None:
    configure_logging(log_level)
    raise SystemExit(run_worker(settings, config_path, reuse_port=True))


def _supervise(settings: Settings, config_path: Path | None) -> int:
    """Start the workers, pass signals on, wait for them all; 0 when every worker exited 0."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().level)
    workers: list[BaseProcess] = [
        context.Process(
            target=_worker_main,
            args=(settings, config_path, level),
            name=f"modelscope-router-worker-{i}",
        )
        for i in range(settings.server.workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    # Before the workers start: a SIGTERM in between killed this process and left them running.
    for sig in (*STOP_SIGNALS, signal.SIGHUP):
        signal.signal(sig, forward)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return 0 if all(w.exitcode == 0 for w in workers) else 1
