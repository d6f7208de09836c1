from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.quota.days import (
    QuotaCalendar,
    next_reset,
    parse_day,
    previous_day,
    quota_day,
    to_ms,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
MIDNIGHT = time(0, 0)


def test_shanghai_midnight_is_16_utc() -> None:
    before = datetime(2026, 11, 29, 15, 59, 59, 999000, tzinfo=UTC)
    after = datetime(2026, 11, 29, 16, 0, 0, tzinfo=UTC)
    assert quota_day(before, SHANGHAI, MIDNIGHT) == "20261129"
    assert quota_day(after, SHANGHAI, MIDNIGHT) == "20261130"


def test_utc_midnight_is_not_a_boundary() -> None:
    before = datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC)
    after = datetime(2026, 11, 30, 0, 0, 1, tzinfo=UTC)
    assert quota_day(before, SHANGHAI, MIDNIGHT) == quota_day(after, SHANGHAI, MIDNIGHT)


def test_custom_reset_time() -> None:
    tz = ZoneInfo("Asia/Shanghai")
    at_0759 = datetime(2026, 11, 30, 7, 59, tzinfo=tz)
    at_0800 = datetime(2026, 11, 30, 8, 0, tzinfo=tz)
    assert quota_day(at_0759, tz, time(8, 0)) == "20261129"
    assert quota_day(at_0800, tz, time(8, 0)) == "20261130"
    assert next_reset(at_0759, tz, time(8, 0)) == at_0800
    assert next_reset(at_0800, tz, time(8, 0)) == at_0800 + timedelta(days=1)


def test_next_reset_in_shanghai() -> None:
    now = datetime(2026, 11, 29, 14, 0, tzinfo=UTC)
    reset = next_reset(now, SHANGHAI, MIDNIGHT)
    assert reset == datetime(2026, 11, 29, 16, 0, tzinfo=UTC)
    assert to_ms(reset) - to_ms(now) == 2 * 3600 * 1000


def test_naive_datetime_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        quota_day(datetime(2026, 1, 1), SHANGHAI, MIDNIGHT)


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from(["Asia/Shanghai", "UTC", "America/New_York", "Europe/Berlin"]),
    st.times(),
)
def test_day_changes_exactly_at_next_reset(now: datetime, zone: str, reset: time) -> None:
    tz = ZoneInfo(zone)
    boundary = next_reset(now, tz, reset)
    assert boundary > now
    day = quota_day(now, tz, reset)
    assert quota_day(boundary - timedelta(microseconds=1), tz, reset) == day
    assert quota_day(boundary, tz, reset) != day


@given(
    st.lists(
        st.datetimes(
            min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["Asia/Shanghai", "UTC", "Europe/Berlin"]),
    st.times(),
)
def test_calendar_cache_agrees_with_the_pure_functions(
    moments: list[datetime], zone: str, reset: time
) -> None:
    tz = ZoneInfo(zone)
    calendar = QuotaCalendar(tz, reset)
    for now in moments:  # in any order: the cache must notice a clock that jumps back
        assert calendar.window(now) == (
            quota_day(now, tz, reset),
            to_ms(next_reset(now, tz, reset)),
        )


def test_a_quota_day_name_is_parsed_strictly() -> None:
    assert parse_day("20261129") == date(2026, 11, 29)
    for bad in ("2026112", "202611290", "2026-11-29", "20261131", "２０２６１１２９", " 2026112"):
        assert parse_day(bad) is None, bad
    assert previous_day("20260301") == "20260228"
    assert previous_day("20270101") == "20261231"
    assert previous_day("nonsense") is None
