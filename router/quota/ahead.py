"""Reserve ahead: the next call's reservation is made while this one is being served.

A request waits for its reservation before it can call the upstream, so the store's round
trip sits on every request's critical path (about 0.15 ms with Redis on loopback, a
millisecond or more with Redis across a network). ``ReserveAhead`` wraps a QuotaStore and
keeps, per route (provider, model, keys, strategy, client quota), one reservation made in
advance: a request that finds it ready takes it at once and starts the next one in the
background, to finish while the upstream answers. Every reservation is still the store's
own atomic ``reserve``, made once per call: one round trip per request in the steady
state, and no key is ever counted past its limit.

What a held reservation changes, and the bounds:
- It is counted in the store before its call is made: a key's count is ahead of the calls
  really made by at most one per route and client on each gateway process. A held
  reservation is given back (``settle`` with release) when the process stops or reloads its
  configuration, when it is older than ``max_age_ms`` or of another quota day, and when its
  key is cooled down, exhausted, disabled or reset on this process. Only a process killed
  without its shutdown keeps one call per route and client counted for the day.
- When the store refuses a request while a reservation for the same route is being made,
  the request waits for that one instead: a call held in advance never sends a request to
  a paid fallback or to "pool spent".
- A key cooled down by another replica after the reservation was made is tried once more
  (the upstream answers 429 again, which ModelScope does not count, and the request fails
  over as usual): the same as a reservation made just before the other replica's 429.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from router.quota.store import ForwardingStore, QuotaStore
from router.quota.types import (
    NoCapacity,
    Reservation,
    ReserveRequest,
    RouteIdent,
    Settlement,
    SettleResult,
)

log = logging.getLogger("router.quota.ahead")

MAX_AGE_MS = 30_000
# Held only while this many calls remain on the key and on (key, model): near the end of a
# pool every call is reserved when it is made, so a call held for one route never stands in
# the way of another's.
MIN_REMAINING = 100
RELEASE = Settlement(release=True)


@dataclass(slots=True)
class _Slot:
    req: ReserveRequest  # the request that started it: keys, client quota, now_ms
    task: asyncio.Task[Reservation | NoCapacity] | None = None  # None until launched
    unwanted: set[str] | None = None  # keys dropped while it was being made

    def ready(self) -> Reservation | NoCapacity | None:
        """What it holds once made (a failed or cancelled reserve holds nothing)."""
        task = self.task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()


class ReserveAhead(ForwardingStore):
    """A QuotaStore that holds one reservation in advance per route (see the module)."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        max_age_ms: int = MAX_AGE_MS,
        min_remaining: int = MIN_REMAINING,
    ) -> None:
        super().__init__(store)
        self.max_age_ms = max_age_ms
        self.min_remaining = min_remaining
        self._slots: dict[RouteIdent, _Slot] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._closed = False  # after release_all: a request still running holds nothing more

    def __repr__(self) -> str:
        return f"ReserveAhead({self.inner!r})"

    def held(self) -> Counter[tuple[str, str]]:
        """Reservations held now, per (provider, key): counted in the store, not yet used."""
        return Counter(
            (r.provider, r.key)
            for s in self._slots.values()
            if isinstance(r := s.ready(), Reservation)
        )

    async def settled(self) -> None:
        """Wait until every slot being made is made, and every give-back is done."""
        for ident, slot in list(self._slots.items()):
            await self._made(ident, slot)
        while self._releasing:
            await asyncio.wait(list(self._releasing))

    async def reserve(self, req: ReserveRequest) -> Reservation | NoCapacity:
        ident = req.route()
        slot = self._slots.get(ident)
        if slot is not None and not slot.req.same_route(req):
            slot = None  # an id reused by another object: never this route's
        if slot is not None and slot.task is not None and slot.task.done():
            del self._slots[ident]
            ready = self._usable(slot, req)
            if ready is not None:
                if self._worth_holding(req, ready):
                    self._start(ident, req)
                return ready
            slot = None
        got = await self.inner.reserve(req)
        if isinstance(got, Reservation):
            if ident not in self._slots and self._worth_holding(req, got):
                self._start(ident, req)
            return got
        # Refused: a reservation being made for this route is this request's, not a refusal.
        pending = self._slots.get(ident)
        if pending is None or not pending.req.same_route(req):
            return got
        await self._made(ident, pending)
        if self._slots.get(ident) is not pending:
            return got  # taken by another request, or dropped, meanwhile
        del self._slots[ident]
        ready = self._usable(pending, req)
        return got if ready is None else ready

    def _worth_holding(self, req: ReserveRequest, res: Reservation) -> bool:
        """Whether a reservation is made ahead after ``res``: not for a client with a daily
        limit, nor once a free pool is shared out (a call held for one of its models would
        count against the client's limit or share while it asks for another), nor when fewer
        than ``min_remaining`` calls remain on the key or on (key, model)."""
        if res.fair_counted or (req.client is not None and req.client.daily_limit is not None):
            return False
        least = self.min_remaining
        return (res.remaining is None or res.remaining >= least) and (
            res.model_remaining is None or res.model_remaining >= least
        )

    def _start(self, ident: RouteIdent, req: ReserveRequest) -> None:
        if self._closed:
            return
        slot = _Slot(req)
        self._slots[ident] = slot
        # Launched on the loop's next turn: after this request's own upstream call has gone
        # out (aiohttp writes a body from a task of its own), not in front of it.
        asyncio.get_running_loop().call_soon(self._launch, ident, slot)

    def _launch(
        self, ident: RouteIdent, slot: _Slot
    ) -> asyncio.Task[Reservation | NoCapacity] | None:
        # A slot given up before its turn came (release_all) is never made.
        if slot.task is None and self._slots.get(ident) is slot:
            slot.task = asyncio.ensure_future(self.inner.reserve(slot.req))
            slot.task.add_done_callback(lambda _: self._landed(ident, slot))
        return slot.task

    def _landed(self, ident: RouteIdent, slot: _Slot) -> None:
        got = slot.ready()  # also marks a failure as retrieved: its StoreError reaches the
        # next request through that request's own reserve, not "never retrieved" at exit
        if (
            isinstance(got, Reservation)
            and slot.unwanted is not None
            and got.key in slot.unwanted
            and self._slots.get(ident) is slot
        ):
            del self._slots[ident]
            self._release(got)

    async def _made(self, ident: RouteIdent, slot: _Slot) -> None:
        task = self._launch(ident, slot)  # launched now if not yet
        if task is not None:
            await asyncio.wait((task,))

    def _usable(self, slot: _Slot, req: ReserveRequest) -> Reservation | None:
        """The slot's reservation if it may serve ``req``; a stale one is given back."""
        got = slot.ready()
        if not isinstance(got, Reservation):
            return None
        if (
            got.day != req.day
            or req.now_ms - slot.req.now_ms > self.max_age_ms
            or (slot.unwanted is not None and got.key in slot.unwanted)
        ):
            self._release(got)
            return None
        return got

    def _release(self, res: Reservation) -> None:
        task = asyncio.ensure_future(self._give_back(res))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _give_back(self, res: Reservation) -> None:
        try:
            await self.inner.settle(res, RELEASE, 0)  # a release alone reads no clock
        except Exception as exc:  # a store error: the call stays counted, never counted twice
            log.warning(
                "could not give back a reservation held for %s/%s: %s", res.provider, res.key, exc
            )

    def _drop(self, provider: str, key: str, *, release: bool = True) -> None:
        """Forget the slots on ``key``: given back now if made, else once they are."""
        for ident, slot in list(self._slots.items()):
            if ident[0] != provider:
                continue
            if slot.task is None or not slot.task.done():
                if release:
                    slot.unwanted = (slot.unwanted or set()) | {key}
                continue
            got = slot.ready()
            if not isinstance(got, Reservation) or got.key == key:
                del self._slots[ident]
                if isinstance(got, Reservation) and release:
                    self._release(got)

    def sweep(self, now_ms: int) -> None:
        """Give back the slots older than ``max_age_ms`` (of routes no request came for)."""
        for ident, slot in list(self._slots.items()):
            task = slot.task
            if now_ms - slot.req.now_ms > self.max_age_ms and task is not None and task.done():
                del self._slots[ident]
                got = slot.ready()
                if isinstance(got, Reservation):
                    self._release(got)

    async def release_all(self) -> None:
        """Give back every reservation held (when the runtime stops: shutdown or reload);
        from then on nothing is held (a request past the stop's grace reserves for itself)."""
        self._closed = True
        slots, self._slots = self._slots, {}
        for slot in slots.values():
            if slot.task is None:
                continue  # not launched yet: now it never will be
            await asyncio.wait((slot.task,))
            got = slot.ready()
            if isinstance(got, Reservation):
                self._release(got)
        while self._releasing:
            await asyncio.wait(list(self._releasing))

    # -- what makes a held slot stale (the rest goes to the store as it is) ---------------

    async def settle(self, res: Reservation, settlement: Settlement, now_ms: int) -> SettleResult:
        result = await self.inner.settle(res, settlement, now_ms)
        if settlement.cooldown or settlement.exhaust or settlement.disable_reason:
            self._drop(res.provider, res.key)
        return result

    async def disable(self, provider: str, key: str, fingerprint: str, reason: str) -> bool:
        changed = await self.inner.disable(provider, key, fingerprint, reason)
        self._drop(provider, key)
        return changed

    async def reset_key(self, provider: str, key: str, day: str) -> None:
        await self.inner.reset_key(provider, key, day)
        # The reset forgot the held calls' counts with the rest: dropped, not given back.
        self._drop(provider, key, release=False)

    async def aclose(self) -> None:
        """Give back what is held; the wrapped store is its owner's to close."""
        await self.release_all()
