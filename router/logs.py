"""Logging: one JSON object a line for machines, plain text in a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The access log's lines reach the stream at most this late (one write for all of them).
FLUSH_DELAY_S = 0.1
PENDING_MAX = 256

#: Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the record's ``extra`` fields
    (and ``exc_info`` / ``stack_info`` as text when present)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a record
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._second_text},{int((created - second) * 1000):03d}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields)

    def line(
        self, created: float, level: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """The JSON line of a record, or of a ``FieldLog`` event (no record built)."""
        entry = {"time": self.stamp(created), "level": level, "logger": name, "message": message}
        entry.update(fields)
        return _dumps(entry)


def _dumps(entry: dict[str, Any]) -> str:
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # what orjson refuses even with default= (an int past 64 bits)
        return json.dumps(entry, default=str)


class JsonLinesHandler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs for JSON: a StreamHandler with ``JsonLines``,
    to which ``FieldLog`` also hands whole lines (the same line, without a LogRecord).

    Those lines are held, in order, and written together within FLUSH_DELAY_S (or once
    PENDING_MAX of them wait): one write for many, where a write a line cost more than the
    line (stderr is line-buffered, so each line was a syscall; bench/). A record logged the
    usual way (a warning, an error) writes what is held first, then itself, at once.
    """

    formatter: JsonLines

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonLines())
        self._pending: list[str] = []
        # The loop whose timer will flush what is held (None: no timer set). A timer of a loop
        # that has closed since (tests run many) will never fire: one is set on the new loop.
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def write_line(self, name: str, level: str, message: str, fields: dict[str, Any]) -> None:
        line = self.formatter.line(time.time(), level, name, message, fields) + self.terminator
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            pending = self._pending
            pending.append(line)
            if len(pending) >= PENDING_MAX:
                self.flush()
            elif self._timer_loop is None or self._timer_loop.is_closed():
                self._flush_later()

    def _flush_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop (another thread): at once
            self.flush()
            return
        self._timer_loop = loop
        loop.call_later(FLUSH_DELAY_S, self._flush_now)

    def _flush_now(self) -> None:
        self._timer_loop = None
        self.flush()

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            # the stream may be closed (a test's, at its end): the lines have nowhere to go
            with contextlib.suppress(ValueError, OSError):
                self.stream.write(text)

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock:  # type: ignore[union-attr]  # (Handler.handle holds it already)
            self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            with contextlib.suppress(ValueError, OSError):
                super().flush()


def flush_logs() -> None:
    """Write out what the root handlers hold (at shutdown: the last access lines)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


class FieldLog:
    """A logger for one line with named fields per event (the access log: one per request).

    Through ``logging`` as usual (caplog, plain text, any handler someone adds), except when the
    only place the line can go is the ``JsonLinesHandler`` of ``configure_logging``: then the
    same JSON line is written without building a LogRecord and running the handler chain. That
    took 25 µs of the gateway's CPU per request, a tenth of its budget (bench/ profile).
    """

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def info(self, msg: str, *args: object, fields: dict[str, Any]) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._sole_json_handler()
        if handler is None:
            logger.info(msg, *args, extra=fields)
        else:
            handler.write_line(logger.name, "INFO", msg % args, fields)

    def _sole_json_handler(self) -> JsonLinesHandler | None:
        node: logging.Logger | None = self.logger
        while node is not None:
            if node.filters:
                return None
            if node.parent is None:  # the root
                handlers = node.handlers
                if len(handlers) != 1:
                    return None
                handler = handlers[0]
                if type(handler) is not JsonLinesHandler or handler.filters:
                    return None
                return handler if handler.level <= logging.INFO else None
            if node.handlers or not node.propagate:
                return None
            node = node.parent
        return None  # pragma: no cover - every chain ends at the root


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
    handler: logging.Handler
    if json:
        handler = JsonLinesHandler(stream)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    # Neither format shows the thread or the process: not looking them up saves three calls a
    # record (the logging docs' "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates router.access, which knows the client, key and attempts.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_parser_errors()
