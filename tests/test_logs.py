"""The JSON log: its line shape, and the access lines that skip LogRecords and are written in
batches (router/logs.py). No sleeps: a held line is released by the handler's own flush."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from router.logs import PENDING_MAX, FieldLog, JsonLinesHandler, configure_logging, flush_logs


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


def handler() -> JsonLinesHandler:
    (only,) = logging.getLogger().handlers
    assert isinstance(only, JsonLinesHandler)
    return only


def alone() -> None:
    """Leave the JSON handler the root's only one, first thing in a test: pytest adds its own
    capture handler to the root for each test call, and with two handlers FieldLog goes
    through ``logging`` (tested below). pytest removes its handler itself afterwards."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if isinstance(h, JsonLinesHandler)]


async def test_access_lines_are_held_then_written_together_in_order(stream: io.StringIO) -> None:
    alone()
    access = FieldLog("router.access")
    access.info("%s first", 200, fields={"n": 1})
    access.info("%s second", 200, fields={"n": 2})
    assert stream.getvalue() == ""  # held: one write for both, within FLUSH_DELAY_S
    logging.getLogger("router.proxy").warning("a warning is written at once")
    access.info("%s third", 429, fields={"n": 3})
    written = lines(stream)
    assert [line["message"] for line in written] == [
        "200 first",
        "200 second",
        "a warning is written at once",
    ]
    handler()._flush_now()  # what the timer set by the third line does
    third = lines(stream)[-1]
    assert third == {**third, "message": "429 third", "n": 3, "logger": "router.access"}
    assert third["level"] == "INFO"
    stamp = datetime.strptime(str(third["time"]), "%Y-%m-%d %H:%M:%S,%f")
    assert abs(stamp - datetime.now()) < timedelta(minutes=5)  # local time, as logging's


def test_off_an_event_loop_a_line_is_written_at_once(stream: io.StringIO) -> None:
    alone()
    FieldLog("router.access").info("no loop", fields={"status": 200})
    assert lines(stream)[0]["status"] == 200


def test_a_timer_of_a_closed_loop_does_not_strand_lines(stream: io.StringIO) -> None:
    alone()
    access = FieldLog("router.access")

    async def one(n: int) -> None:
        access.info("line %d", n, fields={"n": n})

    asyncio.run(one(1))  # its loop closes with the flush timer still pending
    asyncio.run(one(2))
    assert lines(stream) == []
    flush_logs()  # the app's cleanup does this
    assert [line["n"] for line in lines(stream)] == [1, 2]


async def test_a_burst_is_written_once_it_reaches_the_cap(stream: io.StringIO) -> None:
    alone()
    access = FieldLog("router.access")
    for n in range(PENDING_MAX - 1):
        access.info("line", fields={"n": n})
    assert stream.getvalue() == ""
    access.info("line", fields={"n": PENDING_MAX - 1})
    assert [line["n"] for line in lines(stream)] == list(range(PENDING_MAX))


def test_with_another_handler_the_line_goes_through_logging(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.access")
    FieldLog("router.access").info("%s %s", 200, "team", fields={"client": "team"})
    (record,) = [r for r in caplog.records if r.name == "router.access"]
    assert record.getMessage() == "200 team"
    assert record.__dict__["client"] == "team"  # the fields arrive as the record's extras


def test_below_info_nothing_is_written(stream: io.StringIO) -> None:
    alone()
    logging.getLogger("router.access").setLevel(logging.WARNING)
    try:
        FieldLog("router.access").info("quiet", fields={"n": 1})
        flush_logs()
        assert stream.getvalue() == ""
    finally:
        logging.getLogger("router.access").setLevel(logging.NOTSET)


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
