"""The header sync costs a round trip only for outside use, not for concurrency."""

from router.quota.types import Reservation, Settlement
from router.settling import LowestSeen, worth_settling


def reservation(remaining: int, model_remaining: int, day: str = "20261129") -> Reservation:
    return Reservation(
        provider="modelscope",
        key="alice",
        fingerprint="f",
        model="m",
        day=day,
        day_end_ms=0,
        daily_limit=100,
        model_limit=50,
        remaining=remaining,
        model_remaining=model_remaining,
    )


def test_concurrent_requests_do_not_look_like_outside_use() -> None:
    lowest = LowestSeen()
    first, second = reservation(90, 40), reservation(89, 39)
    lowest.record(first)
    lowest.record(second)  # in flight at once: upstream has counted both by the first answer
    header = Settlement(remaining=89, model_remaining=39)
    assert not worth_settling(header, *lowest.floors(first))
    # compared with its own reservation only, the first answer would have looked lower
    assert worth_settling(header, first.remaining, first.model_remaining)


def test_outside_use_is_still_seen() -> None:
    lowest = LowestSeen()
    res = reservation(90, 40)
    lowest.record(res)
    assert worth_settling(Settlement(remaining=80), *lowest.floors(res))
    assert worth_settling(Settlement(model_remaining=30), *lowest.floors(res))
    assert worth_settling(Settlement(release=True), *lowest.floors(res))


def test_a_new_day_forgets_the_floors() -> None:
    lowest = LowestSeen()
    lowest.record(reservation(3, 3))
    today = reservation(99, 49, day="20261130")
    assert lowest.floors(today) == (99, 49)
    lowest.record(today)
    assert not worth_settling(Settlement(remaining=99, model_remaining=49), *lowest.floors(today))
