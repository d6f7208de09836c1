"""Which key serves the next call: a pure function, the reference for reserve.lua.

The memory and SQLite stores call ``select_key`` on every key. reserve.lua makes the same
choice from an index kept in Redis (see its header), so its cost does not grow with the pool:

- ``fill_first``: the first available key in config order;
- ``round_robin``: the first available key in config order from the cursor (wrapping round);
- ``most_remaining``: the available key with the most calls left for the model (its own and
  the key's, whichever is smaller; a key with no cap has 2**53 minus its calls), ties to the
  first in config order. Each call lowers the chosen key's figure, so equal keys take turns.

Available: not disabled, not exhausted, under both limits, not cooling and under its rpm.
Every strategy counts the same way and never passes a limit; they differ only in which key
goes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from router.quota.types import Strategy

INF = 2**53  # "no cap" in remaining comparisons; the same constant is in reserve.lua


@dataclass(frozen=True, slots=True)
class KeyView:
    """What selection needs to know about one key for one model today."""

    used: int = 0
    limit: int | None = None
    model_used: int = 0
    model_limit: int | None = None
    exhausted: bool = False  # `x|key` present
    model_exhausted: bool = False  # `x|key|model` present
    cooling_until_ms: int | None = None  # from `c|key`
    model_cooling_until_ms: int | None = None  # from `c|key|model`
    disabled: bool = False
    rpm_until_ms: int | None = None  # at its calls per minute until then (router.quota.rates)

    def is_exhausted(self) -> bool:
        return (
            self.exhausted
            or self.model_exhausted
            or (self.limit is not None and self.used >= self.limit)
            or (self.model_limit is not None and self.model_used >= self.model_limit)
        )

    def available_at(self, now_ms: int) -> int | None:
        """End of the active cooldowns (the later one), or None when not cooling. A key at its
        calls per minute cools until its window has room again."""
        active = [
            until
            for until in (self.cooling_until_ms, self.model_cooling_until_ms, self.rpm_until_ms)
            if until is not None and until > now_ms
        ]
        return max(active) if active else None

    def remaining(self) -> int:
        """Calls left for the model; with no cap at all, fewer for a key that served more."""
        key_left = INF - self.used if self.limit is None else self.limit - self.used
        model_left = INF if self.model_limit is None else self.model_limit - self.model_used
        return min(key_left, model_left)


class Selection(NamedTuple):
    chosen: int | None  # position in config order of the chosen key; None = no capacity
    cursor: int  # the round-robin cursor to store (only round_robin moves it)
    retry_at_ms: int | None  # with no pick: the earliest end of a cooldown, else None


def select_key(views: Sequence[KeyView], strategy: Strategy, cursor: int, now_ms: int) -> Selection:
    """Pick the key that serves the next call, or say when one may be free again."""
    n = len(views)
    start = cursor % n if strategy is Strategy.ROUND_ROBIN and n else 0
    best: int | None = None
    best_remaining = -1
    retry_at: int | None = None
    for j in range(n):
        i = (start + j) % n
        view = views[i]
        if view.disabled or view.is_exhausted():
            continue
        available_at = view.available_at(now_ms)
        if available_at is not None:
            retry_at = available_at if retry_at is None else min(retry_at, available_at)
            continue
        if strategy is not Strategy.MOST_REMAINING:
            best = i
            break
        # Config order, replacing only on strictly more: ties go to the first key.
        remaining = view.remaining()
        if remaining > best_remaining:
            best, best_remaining = i, remaining
    if best is None:
        return Selection(None, cursor, retry_at)
    new_cursor = best + 1 if strategy is Strategy.ROUND_ROBIN else cursor
    return Selection(best, new_cursor, None)
