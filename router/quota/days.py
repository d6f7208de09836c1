"""Quota-day arithmetic: which calendar day a moment counts against, and when it ends. Pure."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from time import time_ns
from zoneinfo import ZoneInfo

DAY_FORMAT = "%Y%m%d"  # a quota day's name, as every store keys it


def parse_day(day: str) -> date | None:
    """The date a quota day's name ("YYYYMMDD") stands for; None for anything else."""
    if len(day) != 8 or not day.isascii() or not day.isdigit():
        return None
    try:
        return datetime.strptime(day, DAY_FORMAT).date()
    except ValueError:
        return None


def previous_day(day: str) -> str | None:
    """The quota day before ``day``; None when ``day`` is not one."""
    parsed = parse_day(day)
    return None if parsed is None else (parsed - timedelta(days=1)).strftime(DAY_FORMAT)


def quota_day(now: datetime, tz: ZoneInfo, reset_time: time) -> str:
    """The quota day ``now`` counts against, as "YYYYMMDD" in the quota's time zone.

    A day starts at ``reset_time`` local time: with a 00:00 reset in Asia/Shanghai,
    2026-11-29T15:59:59.999Z is day 20261129 and 2026-11-29T16:00:00Z is day 20261130.
    """
    local = _aware(now).astimezone(tz)
    day = local.date()
    if local.timetz().replace(tzinfo=None) < reset_time:
        day -= timedelta(days=1)
    return day.strftime(DAY_FORMAT)


def next_reset(now: datetime, tz: ZoneInfo, reset_time: time) -> datetime:
    """The first reset strictly after ``now`` (an aware datetime in ``tz``)."""
    local = _aware(now).astimezone(tz)
    # Build wall-clock times and let zoneinfo resolve them: right across DST where a zone has it.
    candidate = datetime.combine(local.date(), reset_time, tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), reset_time, tzinfo=tz)
    return candidate


def to_ms(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime."""
    return int(_aware(moment).timestamp() * 1000)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("quota arithmetic needs an aware datetime")
    return moment


def utc_now() -> datetime:
    return datetime.now(UTC)


def wall_clock_ms() -> int:
    """Unix milliseconds now: the default clock of the stores (task expiry)."""
    return time_ns() // 1_000_000


class QuotaCalendar:
    """``quota_day`` and the next reset, worked out once a day (the request path asks often)."""

    def __init__(self, tz: ZoneInfo, reset_time: time) -> None:
        self.tz = tz
        self.reset_time = reset_time
        self._start_ms = 0
        self._end_ms = 0
        self._day = ""

    def window(self, now: datetime) -> tuple[str, int]:
        """(quota day, next reset in Unix ms) for ``now``."""
        now_ms = to_ms(now)
        if not self._start_ms <= now_ms < self._end_ms:
            end = next_reset(now, self.tz, self.reset_time)
            self._day = quota_day(now, self.tz, self.reset_time)
            self._end_ms = to_ms(end)
            # The reset before ``end``: this day began there (or now, should a zone say otherwise).
            start = to_ms(next_reset(end - timedelta(days=2), self.tz, self.reset_time))
            self._start_ms = min(start, now_ms)
        return self._day, self._end_ms
