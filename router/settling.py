"""Header sync: whether an upstream answer is worth a second round trip to the quota store.
Every reservation already counted the call; an answer changes the store only when it releases
the call, spends or cools the key, disables it, or its remaining header shows outside use. The
rule: settle only when the upstream's remaining is lower than the count (``worth_settling``),
compared with the lowest remaining this process has reserved down to (``LowestSeen``). Pure.
"""

from __future__ import annotations

from router.quota.types import Reservation, Settlement


class LowestSeen:
    """The lowest remaining this process has reserved down to, per key and per (key, model).

    An upstream's remaining header also counts the other requests in flight on the key, so it
    is compared with this floor, not with the answer's own reservation: otherwise concurrency
    alone would look like outside use and cost a second round trip per request.
    """

    def __init__(self) -> None:
        self._day = ""
        self._floors: dict[tuple[str, ...], int] = {}

    def record(self, res: Reservation) -> None:
        if res.day != self._day:  # a new quota day: yesterday's floors say nothing
            self._day, self._floors = res.day, {}
        for scope, remaining in self._scopes(res):
            if remaining is not None:
                known = self._floors.get(scope)
                self._floors[scope] = remaining if known is None else min(known, remaining)

    def floors(self, res: Reservation) -> tuple[int | None, int | None]:
        (key_scope, key_left), (model_scope, model_left) = self._scopes(res)
        if res.day != self._day:
            return key_left, model_left
        return self._floors.get(key_scope, key_left), self._floors.get(model_scope, model_left)

    @staticmethod
    def _scopes(res: Reservation) -> tuple[tuple[tuple[str, ...], int | None], ...]:
        return (
            ((res.provider, res.key), res.remaining),
            ((res.provider, res.key, res.model), res.model_remaining),
        )


def worth_settling(settlement: Settlement, key_floor: int | None, model_floor: int | None) -> bool:
    """Whether an answer changes the store: the steady state costs no second round trip."""
    if settlement.release or settlement.exhaust or settlement.cooldown or settlement.disable_reason:
        return True
    return _lower(settlement.remaining, key_floor) or _lower(
        settlement.model_remaining, model_floor
    )


def _lower(header: int | None, ours: int | None) -> bool:
    if header is None:
        return False
    return header <= 0 if ours is None else header < ours
