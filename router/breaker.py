"""Provider breakers: stop asking a provider for a while, but only when the provider is down.

A provider-wide fault (an outage answering 5xx, a connection that cannot be made, an HTML page
from a WAF, an IP-wide throttle) looks the same on every key. Met key by key, it would cool
every key in turn, doubling each cooldown, and spend attempts on keys that cannot answer. The
breaker notices the pattern instead and opens for ``open_s``; while it is open the request path
skips the provider as if every key were cooling, and no key's state is touched.

The rule. Within ``window_s`` (10 s), the breaker opens only when both hold:

- failures with one signature came from at least ``trip_keys`` distinct keys (3; every key
  of a provider with fewer), and
- no success at all came from the provider (for a throttle breaker: from the provider for
  that model) in the window.

Any success closes the breaker and resets its evidence (the failures and the doubling). So a
partly failing provider keeps serving on its healthy keys: the keys that fail alone cool down
alone (their own cooldowns, ``router.classify``), and their failures, however many, never stop
the keys that answer. A whole-provider outage still opens it: at the third failing key when
nothing succeeded lately, else at the first failure once the last success is more than
``window_s`` old (until then the failing keys cool one by one, as without a breaker). The
evidence is what has answered so far: when failing keys answer before a healthy key's first
success (a burst right after a quiet spell), the breaker may open, and that success, arriving,
closes it at once.

A re-trip doubles the open time, up to ``max_open_s``. Breakers are keyed like the cooldowns
they stand in for (``router.classify``):

- UPSTREAM_FAILURE cools a whole key, so its breaker is per provider, and a success on any
  model of the provider counts against it;
- THROTTLED cools a key for one model, so its breaker is per provider and model, and only a
  success on that model counts against it.

Once the open time has passed the breaker is half-open: requests go through, the first success
closes it, and the first failure with the signature within ``window_s`` opens it again (for
twice as long). A provider with a single key has no breaker: that key's own cooldown already
is the provider's.

Pure: no I/O, time from an injected clock (Unix seconds, the gateway's clock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from router.classify import Outcome


class Signature(StrEnum):
    """What a provider-wide fault looks like on each key."""

    FAILURE = "upstream_failure"  # 5xx, timeouts, connection errors, non-JSON 401/403
    THROTTLE = "throttled"  # 429 throttling on several keys: an IP-wide limit


SIGNATURES: Final = {
    Outcome.UPSTREAM_FAILURE: Signature.FAILURE,
    Outcome.THROTTLED: Signature.THROTTLE,
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    trip_keys: int = 3  # distinct keys failing alike ...
    window_s: float = 10.0  # ... within this many seconds, and no success in them, open it ...
    open_s: float = 15.0  # ... for this long, doubling on each re-trip ...
    max_open_s: float = 300.0  # ... up to this
    min_keys: int = 2  # a provider with fewer keys has no breaker


DEFAULT_POLICY: Final = BreakerPolicy()
MAX_CIRCUITS: Final = 10_000  # bounded: model names come from clients


@dataclass(frozen=True, slots=True)
class Open:
    """An open breaker: the provider (for ``model``, if a throttle) is skipped until ``until``."""

    provider: str
    model: str | None  # None: every model of the provider
    signature: Signature
    until: float  # Unix seconds
    trips: int  # consecutive trips without a success (the open time doubles with each)
    keys: tuple[str, ...] = ()  # the keys whose failures opened it (empty on a half-open re-trip)


@dataclass(slots=True)
class _Circuit:
    failures: dict[str, float] = field(default_factory=dict)  # key -> last failure time
    until: float | None = None  # end of the current (or last) open period
    trips: int = 0

    def open_for(self, policy: BreakerPolicy) -> float:
        doubled: float = policy.open_s * 2.0 ** min(self.trips - 1, 32)
        return min(doubled, policy.max_open_s)


class Breakers:
    """Every breaker of one gateway process."""

    def __init__(self, clock: Callable[[], float], policy: BreakerPolicy = DEFAULT_POLICY) -> None:
        self._clock = clock
        self.policy = policy
        self._circuits: dict[tuple[str, str | None, Signature], _Circuit] = {}
        # (provider, None) -> the provider's last success, (provider, model) -> for the model
        self._served: dict[tuple[str, str | None], float] = {}

    def blocking(self, provider: str, model: str) -> Open | None:
        """The open breaker that stops ``provider`` from serving ``model`` now, if any."""
        if not self._circuits:  # the usual case: nothing has failed lately
            return None
        now = self._clock()
        found: Open | None = None
        for scope, signature in ((None, Signature.FAILURE), (model, Signature.THROTTLE)):
            circuit = self._circuits.get((provider, scope, signature))
            if circuit is None or circuit.until is None or circuit.until <= now:
                continue
            if found is None or circuit.until > found.until:
                found = Open(provider, scope, signature, circuit.until, circuit.trips)
        return found

    def record(
        self, provider: str, model: str, key: str, outcome: Outcome, keys: int
    ) -> Open | None:
        """What an answer of ``key`` (one of ``keys``) says; the breaker it opened, if one did.

        OK closes the provider's breakers for ``model`` and keeps them from opening for
        ``window_s``; an outcome with a provider-wide signature counts towards one; every other
        outcome is about the key or the model and changes nothing here.
        """
        if outcome is Outcome.OK:
            self._succeeded(provider, model)
            return None
        signature = SIGNATURES.get(outcome)
        if signature is None or keys < self.policy.min_keys:
            return None
        scope = None if signature is Signature.FAILURE else model
        return self._failure(provider, scope, signature, key, keys)

    def _succeeded(self, provider: str, model: str) -> None:
        now = self._clock()
        served = self._served
        if len(served) >= MAX_CIRCUITS and (provider, model) not in served:
            self._forget_successes(now)
        served[provider, None] = now
        served[provider, model] = now
        if not self._circuits:
            return
        for ident in ((provider, None, Signature.FAILURE), (provider, model, Signature.THROTTLE)):
            self._circuits.pop(ident, None)

    def _served_lately(self, provider: str, scope: str | None, now: float) -> bool:
        """Whether the provider (for ``scope``, a model, if given) answered well in the window."""
        at = self._served.get((provider, scope))
        return at is not None and now - at <= self.policy.window_s

    def _forget_successes(self, now: float) -> None:
        """Make room: drop successes out of the window, else every model's (never a provider's)."""
        window = self.policy.window_s
        served = {ident: at for ident, at in self._served.items() if now - at <= window}
        if len(served) >= MAX_CIRCUITS:
            served = {ident: at for ident, at in served.items() if ident[1] is None}
        self._served = served

    def _failure(
        self, provider: str, scope: str | None, signature: Signature, key: str, keys: int
    ) -> Open | None:
        now = self._clock()
        policy = self.policy
        ident = (provider, scope, signature)
        circuit = self._circuits.get(ident)
        if circuit is None:
            if len(self._circuits) >= MAX_CIRCUITS:
                self._forget_idle(now)
            circuit = self._circuits[ident] = _Circuit()
        if circuit.until is not None:
            if now < circuit.until:
                return None  # already open: an answer to a call sent before it opened
            if now - circuit.until <= policy.window_s:  # half-open: one failure is enough
                return self._trip(ident, circuit, now, ())
            if now - circuit.until > policy.max_open_s:  # long closed: a new incident
                circuit.trips = 0
            circuit.until = None
        circuit.failures[key] = now
        for name, at in list(circuit.failures.items()):
            if now - at > policy.window_s:
                del circuit.failures[name]
        if len(circuit.failures) < min(policy.trip_keys, keys):
            return None
        if self._served_lately(provider, scope, now):  # some key answers: not the provider
            return None
        return self._trip(ident, circuit, now, tuple(circuit.failures))

    def _trip(
        self,
        ident: tuple[str, str | None, Signature],
        circuit: _Circuit,
        now: float,
        keys: tuple[str, ...],
    ) -> Open:
        circuit.trips += 1
        circuit.until = now + circuit.open_for(self.policy)
        circuit.failures.clear()
        provider, scope, signature = ident
        return Open(provider, scope, signature, circuit.until, circuit.trips, keys)

    def _forget_idle(self, now: float) -> None:
        """Make room: drop circuits long quiet, else every one that is not open now."""
        horizon = self.policy.window_s + self.policy.max_open_s
        for ident, circuit in list(self._circuits.items()):
            last = max([*circuit.failures.values(), circuit.until or 0.0])
            if now - last > horizon:
                del self._circuits[ident]
        if len(self._circuits) >= MAX_CIRCUITS:
            for ident, circuit in list(self._circuits.items()):
                if circuit.until is None or circuit.until <= now:
                    del self._circuits[ident]
