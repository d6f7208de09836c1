"""The day-rollover task: on every replica, idempotent; counters of a new day start from zero
by themselves (they are keyed by day), so this only notices and says so."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, time
from zoneinfo import ZoneInfo

from router.quota.days import next_reset, quota_day

log = logging.getLogger("router.scheduler")

MAX_NAP_SECONDS = 60.0  # wake at least this often, so an injected or jumping clock is noticed


async def watch_day_rollover(
    clock: Callable[[], datetime],
    tz: ZoneInfo,
    reset_time: time,
    on_rollover: Callable[[str, str], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Log (and report to ``on_rollover``) each change of quota day, forever."""
    day = quota_day(clock(), tz, reset_time)
    while True:
        now = clock()
        wait = (next_reset(now, tz, reset_time) - now).total_seconds()
        await sleep(min(max(wait, 0.01), MAX_NAP_SECONDS))
        today = quota_day(clock(), tz, reset_time)
        if today != day:
            log.info(
                "quota day rolled over: %s -> %s; exhausted and cooling states ended", day, today
            )
            if on_rollover is not None:
                on_rollover(day, today)
            day = today
