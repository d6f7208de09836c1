"""The JSON log: its line shape, the access line's fields (passed as ``extra``), and every line
written as it is logged (router/logs.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from router.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("INFO", out, json=True)
    try:
        yield out
    finally:
        logging.getLogger().handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_access_line_is_written_at_once_with_its_fields(stream: io.StringIO) -> None:
    access = logging.getLogger("router.access")
    access.info("%s first", 200, extra={"n": 1, "client": "team"})
    (first,) = lines(stream)
    assert first == {**first, "message": "200 first", "n": 1, "client": "team"}
    assert first["logger"] == "router.access"
    assert first["level"] == "INFO"
    stamp = datetime.strptime(str(first["time"]), "%Y-%m-%d %H:%M:%S,%f")
    assert abs(stamp - datetime.now()) < timedelta(minutes=5)  # local time, as logging's
    logging.getLogger("router.failover").warning("a warning")
    access.info("%s third", 429, extra={"n": 3})
    assert [line["message"] for line in lines(stream)] == ["200 first", "a warning", "429 third"]


def test_the_fields_arrive_as_the_records_extras(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.access")
    logging.getLogger("router.access").info("%s %s", 200, "team", extra={"client": "team"})
    (record,) = [r for r in caplog.records if r.name == "router.access"]
    assert record.getMessage() == "200 team"
    assert record.__dict__["client"] == "team"


def test_below_info_nothing_is_written(stream: io.StringIO) -> None:
    logging.getLogger("router.access").setLevel(logging.WARNING)
    try:
        logging.getLogger("router.access").info("quiet", extra={"n": 1})
        assert stream.getvalue() == ""
    finally:
        logging.getLogger("router.access").setLevel(logging.NOTSET)


def test_a_terminal_gets_plain_text() -> None:
    out = io.StringIO()
    configure_logging("INFO", out, json=False)
    try:
        logging.getLogger("router.access").info("%s team", 200, extra={"client": "team"})
    finally:
        logging.getLogger().handlers.clear()
    assert out.getvalue().rstrip().endswith("INFO router.access: 200 team")


def test_json_lines_carry_extras_and_tracebacks(stream: io.StringIO) -> None:
    log = logging.getLogger("router.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed %s", "here", extra={"odd": object(), "big": 2**70, "ok": 1})
    (line,) = lines(stream)
    assert line["message"] == "failed here"
    assert line["level"] == "ERROR"
    assert line["ok"] == 1
    assert line["big"] == 2**70  # past orjson's 64 bits: the stdlib encoder takes over
    assert str(line["odd"]).startswith("<object object")
    assert "ValueError: boom" in str(line["exc_info"])
