"""Per-minute windows (rpm, tpm): counts per second over the last minute, in one short text. Pure.

A window is stored as ``"second:count,second:count,..."`` (Unix seconds, oldest first), at most
61 entries whatever the limit: a field of a hash in Redis (``lua/reserve.lua`` and
``lua/usage.lua`` read and write the same text), a row in SQLite, a dict entry in memory.

The window at ``now`` counts the seconds ``floor(now) - 60 .. floor(now)``: 61 whole seconds,
which cover every 60-second span ending at ``now``. So a limit checked against it holds in *any*
minute, not only in fixed clock minutes (a fixed window lets 2 x rpm through across its edge);
the price is that a call may be refused up to one second early.
"""

from __future__ import annotations

from collections.abc import Sequence

WINDOW_S = 60
Buckets = list[tuple[int, int]]  # (Unix second, count), oldest first


def parse(raw: str | None) -> Buckets:
    if not raw:
        return []
    buckets = []
    for part in raw.split(","):
        second, _, count = part.partition(":")
        buckets.append((int(second), int(count)))
    return buckets


def window(raw: str | None, now_ms: int) -> tuple[Buckets, int]:
    """The buckets still in the window at ``now_ms``, and their total."""
    since = now_ms // 1000 - WINDOW_S
    kept = [(s, n) for s, n in parse(raw) if s >= since]
    return kept, sum(n for _, n in kept)


def add(kept: Sequence[tuple[int, int]], now_ms: int, amount: int) -> str:
    """The window's text after adding ``amount`` at ``now_ms`` to ``kept`` (from ``window``)."""
    second = now_ms // 1000
    out = list(kept)
    if out and out[-1][0] == second:
        out[-1] = (second, out[-1][1] + amount)
    else:
        # A bucket from a replica whose clock is ahead stays where it is: order is not needed
        # for the sums, only for retry_at, which takes the oldest seconds first.
        out.append((second, amount))
    return ",".join(f"{s}:{n}" for s, n in out)


def retry_at(kept: Sequence[tuple[int, int]], total: int, limit: int) -> int | None:
    """When the window (``kept``, of ``total``) next holds less than ``limit`` (Unix ms); None
    when it already does. The oldest seconds leave first: second s leaves at s + 61."""
    if total < limit:
        return None
    left = total
    for second, count in sorted(kept):
        left -= count
        if left < limit:
            return (second + WINDOW_S + 1) * 1000
    return None  # not reached: a limit above 0 drops below once every bucket has left


def blocked_until(raw: str | None, limit: int | None, now_ms: int) -> int | None:
    """For a key's rpm: until when it may not serve (Unix ms), None when it may."""
    if limit is None:
        return None
    kept, total = window(raw, now_ms)
    return retry_at(kept, total, limit) if total >= limit else None
