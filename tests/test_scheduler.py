import asyncio
import logging
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from router.scheduler import MAX_NAP_SECONDS, watch_day_rollover
from tests.conftest import GatewayClock


async def test_rollover_is_noticed_at_shanghai_midnight(caplog: pytest.LogCaptureFixture) -> None:
    clock = GatewayClock(datetime(2026, 11, 29, 15, 58, tzinfo=UTC))  # 23:58 in Shanghai
    naps: list[float] = []
    rollovers: list[tuple[str, str]] = []
    seen_at: list[datetime] = []

    async def fake_sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.advance(seconds=seconds)
        if len(rollovers) == 1:
            raise asyncio.CancelledError

    with (
        caplog.at_level(logging.INFO, logger="router.scheduler"),
        pytest.raises(asyncio.CancelledError),
    ):
        await watch_day_rollover(
            clock,
            ZoneInfo("Asia/Shanghai"),
            time(0, 0),
            on_rollover=lambda old, new: seen_at.append(clock.now) or rollovers.append((old, new)),
            sleep=fake_sleep,
        )
    assert rollovers == [("20261129", "20261130")]
    assert naps[:2] == [MAX_NAP_SECONDS, MAX_NAP_SECONDS]  # never a blind long sleep
    assert seen_at == [datetime(2026, 11, 29, 16, 0, tzinfo=UTC)]  # not UTC midnight
    assert "quota day rolled over: 20261129 -> 20261130" in caplog.text
