"""Logging: one JSON object a line for machines, plain text in a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, json: bool | None = None
) -> None:
    """JSON lines unless ``stream`` is a terminal (or ``json`` says otherwise)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if json:
        formatter = JsonFormatter(
            JSON_FIELDS,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    else:
        formatter = logging.Formatter(PLAIN_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates router.access, which knows the client, key and attempts.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
