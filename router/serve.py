"""Run the gateway process: event loop (uvloop where available), signals, the app."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from router.app import create_app
from router.config import Settings
from router.report import mask_url as _mask

log = logging.getLogger("router.serve")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(settings: Settings, config_path: Path | None = None) -> None:
    app = create_app(settings, config_path=config_path)
    loop = new_event_loop()
    log.info(
        "modelscope-router on http://%s:%d (store %s, %d providers)",
        settings.server.host,
        settings.server.port,
        _mask(settings.store.url),
        len(settings.providers),
    )
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,
        print=None,
        loop=loop,
    )
