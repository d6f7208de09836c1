"""select_key: the pure selection rules every store (and reserve.lua) follows."""

from __future__ import annotations

import pytest

from router.quota.selection import INF, KeyView, Selection, select_key
from router.quota.types import Strategy

NOW = 1_000_000
MR, RR, FF = Strategy.MOST_REMAINING, Strategy.ROUND_ROBIN, Strategy.FILL_FIRST


def free(used: int = 0, limit: int | None = 10) -> KeyView:
    return KeyView(used=used, limit=limit)


def test_no_keys() -> None:
    assert select_key([], MR, 3, NOW) == Selection(None, 3, None)


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (KeyView(exhausted=True), "x|key"),
        (KeyView(model_exhausted=True), "x|key|model"),
        (KeyView(used=10, limit=10), "key limit"),
        (KeyView(used=11, limit=10), "over the key limit"),
        (KeyView(model_used=3, model_limit=3), "model limit"),
        (KeyView(limit=0), "zero limit"),
        (KeyView(disabled=True), "disabled"),
    ],
)
def test_keys_that_cannot_serve_are_skipped_without_retry_at(view: KeyView, why: str) -> None:
    for strategy in Strategy:
        assert select_key([view], strategy, 0, NOW) == Selection(None, 0, None), why
        assert select_key([view, free()], strategy, 0, NOW).chosen == 1, why


def test_exhausted_and_cooling_is_exhausted() -> None:
    view = KeyView(exhausted=True, cooling_until_ms=NOW + 5)
    assert select_key([view], MR, 0, NOW) == Selection(None, 0, None)


def test_disabled_and_cooling_does_not_give_retry_at() -> None:
    view = KeyView(disabled=True, cooling_until_ms=NOW + 5)
    assert select_key([view], MR, 0, NOW).retry_at_ms is None


def test_retry_at_is_the_earliest_available_at() -> None:
    views = [
        KeyView(cooling_until_ms=NOW + 500, model_cooling_until_ms=NOW + 900),  # free at +900
        KeyView(model_cooling_until_ms=NOW + 700),
        KeyView(cooling_until_ms=NOW + 100, exhausted=True),  # exhausted: never counts
    ]
    for strategy in Strategy:
        assert select_key(views, strategy, 0, NOW) == Selection(None, 0, NOW + 700)


def test_cooldown_that_ended_does_not_block() -> None:
    views = [KeyView(cooling_until_ms=NOW, model_cooling_until_ms=NOW - 1)]
    assert select_key(views, MR, 0, NOW) == Selection(0, 0, None)


def test_most_remaining_takes_the_most_left_of_key_and_model() -> None:
    views = [
        KeyView(used=0, limit=100, model_used=9, model_limit=10),  # 1 left for the model
        KeyView(used=5, limit=10),  # 5 left
        KeyView(used=0, limit=4),  # 4 left
    ]
    assert select_key(views, MR, 0, NOW) == Selection(1, 0, None)


def test_most_remaining_no_cap_beats_any_cap() -> None:
    views = [free(0, 10**9), KeyView()]
    assert KeyView().remaining() == INF
    assert select_key(views, MR, 0, NOW).chosen == 1


def test_with_no_cap_the_key_that_served_less_has_more_left() -> None:
    assert KeyView(used=3).remaining() == INF - 3
    views = [KeyView(used=2), KeyView(used=1), KeyView(used=2)]
    assert select_key(views, MR, 0, NOW).chosen == 1


@pytest.mark.parametrize("cursor", [0, 1, 2, 5, -1])
def test_most_remaining_ties_go_to_the_first_key_whatever_the_cursor(cursor: int) -> None:
    views = [free(), free(), free()]
    assert select_key(views, MR, cursor, NOW) == Selection(0, cursor, None)


def test_most_remaining_equal_keys_take_turns() -> None:
    """Each call lowers the chosen key's calls left, so equal keys serve in turn."""
    used = [0, 0, 0]
    chosen = []
    for _ in range(6):
        views = [free(u) for u in used]
        pick = select_key(views, MR, 0, NOW).chosen
        assert pick is not None
        chosen.append(pick)
        used[pick] += 1
    assert chosen == [0, 1, 2, 0, 1, 2]


def test_most_remaining_tie_skips_a_key_with_less() -> None:
    views = [free(3), free(0), free(0)]
    assert select_key(views, MR, 0, NOW).chosen == 1


@pytest.mark.parametrize(("cursor", "chosen"), [(0, 0), (1, 2), (2, 2), (3, 0), (4, 2)])
def test_round_robin_first_eligible_from_the_cursor(cursor: int, chosen: int) -> None:
    views = [free(9), KeyView(exhausted=True), free(0)]
    assert select_key(views, RR, cursor, NOW) == Selection(chosen, chosen + 1, None)


def test_fill_first_ignores_and_keeps_the_cursor() -> None:
    views = [KeyView(cooling_until_ms=NOW + 1), free(9), free(0)]
    assert select_key(views, FF, 2, NOW) == Selection(1, 2, None)


def test_remaining_of_a_view() -> None:
    assert KeyView(used=3, limit=10, model_used=1, model_limit=5).remaining() == 4
    assert KeyView(used=3, limit=10).remaining() == 7
    assert KeyView(model_used=2, model_limit=5).remaining() == 3
