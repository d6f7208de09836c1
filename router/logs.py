"""Logging: one JSON object a line for machines, plain text in a terminal."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the record's ``extra`` fields
    (and ``exc_info`` / ``stack_info`` as text when present). The access log (router.gateway)
    passes its fields as ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return _dumps(entry)


def _dumps(entry: dict[str, Any]) -> str:
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # what orjson refuses even with default= (an int past 64 bits)
        return json.dumps(entry, default=str)


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
    handler.setFormatter(JsonLines() if json else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates router.access, which knows the client, key and attempts.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_parser_errors()
