"""Logging: one JSON object a line for machines, plain text in a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError
from pythonjsonlogger.orjson import OrjsonFormatter as JsonFormatter  # orjson: the fast one

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _QuoteFreeParserErrors(logging.Filter):
    """aiohttp logs a malformed request with its parser error, which quotes the raw bytes of
    the offending line: a client key in an Authorization header with a stray control byte
    ended up in the log (tests/test_canary.py). Keep who, what and the status; drop the quote.
    A client that leaves before its ``100 Continue`` is written got a traceback at ERROR
    (tests/test_fuzz.py). Both are the client's doing: one WARNING line, no traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | ConnectionResetError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            if isinstance(exc, HttpProcessingError):
                record.msg = "refused a malformed HTTP request from %s: %s (%s)"
                record.args = (remote, type(exc).__name__, exc.code)
            else:
                record.msg = "client %s went away before its answer: %s"
                record.args = (remote, type(exc).__name__)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


_PARSER_ERRORS = _QuoteFreeParserErrors()


def quiet_parser_errors() -> None:
    """Install the filter above on aiohttp's server logger (idempotent)."""
    logging.getLogger("aiohttp.server").addFilter(_PARSER_ERRORS)


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
    quiet_parser_errors()
