"""The failover engine, one call in and one outcome out: ``Failover.forward(call)`` plans the
call's routes (model, aliases, the client's rules), then for each route reserves a key in the
quota store, sends the call upstream, asks router.classify what the answer means, settles the
store when the answer changed something (router.settling) and tells the provider breakers; it
moves to the next key or route until one answers. It returns ``Served`` (an upstream reply for
the HTTP layer to relay) or the ``RouterError`` to answer with (its words from router.refusals).
It never reads an error body itself, and knows nothing of the aiohttp server: tests drive it
with a ``Call`` and a real upstream (tests/test_failover_engine.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from router.breaker import Breakers, Open, Signature
from router.calls import Call
from router.catalog import Catalog
from router.classify import (
    Action,
    Outcome,
    TransportFailure,
    Verdict,
    classify,
    classify_transport,
    settlement_for,
)
from router.clients import ClientPolicy
from router.config import Settings
from router.errors import RouterError, StoreUnavailable, UpstreamError
from router.ledger import Ledger
from router.metrics import Metrics
from router.pool import KeyPool
from router.pricing import to_nanos
from router.quota.days import QuotaCalendar, to_ms
from router.quota.store import QuotaStore, StoreError
from router.quota.types import (
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
)
from router.refusals import Refusals
from router.routing import Route, RouteTable, known_routes
from router.settling import LowestSeen, worth_settling
from router.upstream import TransportError, UpstreamBodyTooLarge, UpstreamReply, Upstreams

log = logging.getLogger("router.failover")

#: Plans kept (client, endpoint, model): bounded, since clients choose model names.
PLAN_CACHE_MAX = 4096


@dataclass(slots=True)
class Served:
    """An upstream answer to pass on: the route and reservation it came through, and the reply
    (status and headers read; a stream's first chunk read, the rest still flowing)."""

    route: Route
    reservation: Reservation
    reply: UpstreamReply


@dataclass(slots=True)
class _Progress:
    """What one call has met so far on its way through the routes."""

    deadline: float  # time.monotonic() at which no further attempt starts
    failures: int = 0
    blocked: list[NoCapacity] = field(default_factory=list)
    unavailable: int = 0
    last_failure: Verdict | None = None
    moving_from: tuple[str, str] | None = None  # (provider, reason) of the last failover
    broken: Open | None = None  # the soonest-closing failure breaker that skipped a route
    rate_counted: bool = False  # the client's rpm counted this request (once per request)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Failover:
    """The failover engine of one configuration (a Runtime's); its breakers, floors and plans
    live as long as that configuration."""

    def __init__(
        self,
        settings: Settings,
        store: QuotaStore,
        upstreams: Upstreams,
        pool: KeyPool,
        catalog: Catalog,
        routes: RouteTable,
        metrics: Metrics,
        clock: Callable[[], datetime],
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstreams = upstreams
        self.pool = pool
        self.catalog = catalog
        self.routes = routes
        self.metrics = metrics
        self.clock = clock
        self.policy = ClientPolicy(settings)
        self.ledger = ledger
        self.refusals = Refusals(settings.quota, clock, self._currency)
        self.breakers = Breakers(lambda: self.clock().timestamp())
        self._calendar = QuotaCalendar(settings.quota.tz, settings.quota.reset_time)
        self._lowest = LowestSeen()
        # (client, endpoint, passthrough, model) -> (the catalog's model set it was made
        # with, the routes): every client, model and endpoint check of a call, made once.
        self._plans: dict[tuple[str, str, bool, str], tuple[frozenset[str], tuple[Route, ...]]] = {}

    def _currency(self, provider: str | None) -> str:
        """A provider's currency; None (or one a reload removed): the client budgets' one."""
        try:
            return self.settings.provider(provider or "").currency
        except KeyError:
            return self.settings.budget_currency

    async def forward(self, call: Call) -> Served | RouterError:
        """Serve ``call`` through the first route and key that can; else the refusal to send.

        Updates ``call.trace`` (attempts, upstream time, the provider and key that served).
        """
        try:
            return await self._forward(call)
        except RouterError as exc:
            return exc

    async def _forward(self, call: Call) -> Served:
        routes = self.plan(call)
        progress = _Progress(deadline=time.monotonic() + self.settings.retry.deadline_seconds)
        for index, route in enumerate(routes):
            served = await self._try_route(call, route, index, progress)
            if served is not None:
                return served
            if self._out_of_attempts(progress):
                break
        raise self._no_route(call, len(routes), progress)

    # -- plan ---------------------------------------------------------------------------------

    def plan(self, call: Call) -> tuple[Route, ...]:
        """The routes the call may take, in order; raises the refusal when there is none."""
        endpoint = call.endpoint
        key = (call.trace.client, endpoint.name, endpoint.passthrough, call.model)
        cached = self._plans.get(key)
        if cached is not None and cached[0] is self.catalog.known:  # the catalog is the same
            return cached[1]
        routes = self._plan(call)
        if len(self._plans) < PLAN_CACHE_MAX:
            self._plans[key] = (self.catalog.known, routes)
        return routes

    def _plan(self, call: Call) -> tuple[Route, ...]:
        client, model = call.trace.client, call.model
        if not self.policy.allows_model(client, model):
            raise self.refusals.model_not_allowed(client, model)
        routes = self._routes_for(call)
        if not routes:
            raise self.refusals.no_such_model(model)
        if not self.routes.has_alias(model):  # an alias is judged by its id alone
            listed = itertools.chain(self.catalog.all_models(), self.routes.alias_models)
            allowed = self.policy.allowed_routes(client, model, routes, listed)
            if not allowed:
                raise self.refusals.served_as_not_allowed(client, model, routes)
            routes = allowed
        routes = self.policy.routes_for(client, routes)
        if not routes:
            raise self.refusals.paid_not_allowed(client, model)
        return routes

    def _routes_for(self, call: Call) -> tuple[Route, ...]:
        endpoint = call.endpoint
        if not call.model:  # a passthrough body without a model: every provider that declares it
            providers = self.settings.providers
            return tuple(Route(p, "") for p in providers if endpoint.url(p) is not None)
        routes = known_routes(self.routes.resolve(call.model), self.catalog.models)
        return tuple(r for r in routes if endpoint.url(r.provider) is not None)

    # -- one route: reserve, send, classify, settle, until it answers or is spent ------------

    def _out_of_attempts(self, progress: _Progress) -> bool:
        return progress.failures >= self.settings.retry.max_attempts or progress.remaining() <= 0

    async def _try_route(
        self, call: Call, route: Route, index: int, progress: _Progress
    ) -> Served | None:
        specs = self.pool.specs(route.provider, route.model)
        # Each NEXT_KEY takes a key out of the pool, so this bound is never the one that stops.
        for _ in range(len(specs) + self.settings.retry.max_attempts + 1):
            if self._out_of_attempts(progress) or self._breaker_open(route, progress):
                return None
            reservation = await self._reserve(route, specs, call.trace.client, progress)
            if isinstance(reservation, NoCapacity):
                if reservation.reason.whole_client:
                    self.metrics.refusals.labels(call.trace.client, reservation.reason).inc()
                    raise self.refusals.client_refusal(call.trace.client, reservation)
                progress.blocked.append(reservation)
                return None
            self._lowest.record(reservation)
            self._count_failover(progress, route)
            verdict, reply = await self._attempt(call, route, reservation, progress)
            await self._learn(route, reservation, verdict, len(specs))
            if verdict.action is Action.RETURN:
                assert reply is not None
                return self._served(call, route, index, reservation, verdict, reply)
            if reply is not None:
                reply.close()
            if not self._failed(route, reservation, verdict, progress):
                return None
        return None

    def _served(
        self,
        call: Call,
        route: Route,
        index: int,
        reservation: Reservation,
        verdict: Verdict,
        reply: UpstreamReply,
    ) -> Served:
        if index > 0 and verdict.outcome is Outcome.OK:
            self.metrics.fallback_requests.labels(route.provider.name).inc()
        call.trace.provider, call.trace.key = reservation.provider, reservation.key
        call.trace.reservation = reservation
        return Served(route, reservation, reply)

    def _failed(
        self, route: Route, reservation: Reservation, verdict: Verdict, progress: _Progress
    ) -> bool:
        """Note a failed attempt; whether this route may try another key."""
        self.metrics.upstream_errors.labels(route.provider.name, reservation.key, verdict.row).inc()
        progress.moving_from = (route.provider.name, verdict.outcome.value)
        progress.last_failure = verdict
        if verdict.action is Action.NEXT_ROUTE:
            progress.unavailable += 1
            return False
        if verdict.action is Action.RETRY:
            progress.failures += 1
        return True

    async def _reserve(
        self, route: Route, specs: tuple[KeySpec, ...], client: str, progress: _Progress
    ) -> Reservation | NoCapacity:
        provider = route.provider
        quota = self.policy.quota_for(client, provider, count_rate=not progress.rate_counted)
        budget = provider.daily_budget
        checks_usage = budget is not None or (quota is not None and quota.checks_usage)
        if self.ledger is not None and checks_usage:
            # Checked against what the store holds: first this replica's answers that ended.
            await self.ledger.caught_up()
        now = self.clock()
        day, day_end_ms = self._calendar.window(now)
        req = ReserveRequest(
            provider=provider.name,
            model=route.model,
            keys=specs,
            strategy=provider.strategy,
            day=day,
            now_ms=to_ms(now),
            day_end_ms=day_end_ms,
            client=quota,
            budget=None if budget is None else to_nanos(budget),
        )
        try:
            outcome = await self.store.reserve(req)
            if isinstance(outcome, Reservation) and quota is not None and quota.count_rate:
                progress.rate_counted = True
            return outcome
        except StoreError as exc:
            log.error("quota store unavailable: %s", exc)
            raise StoreUnavailable(
                "The quota store is unavailable; try again shortly.",
                headers={"Retry-After": "5"},
            ) from None

    async def _attempt(
        self, call: Call, route: Route, res: Reservation, progress: _Progress
    ) -> tuple[Verdict, UpstreamReply | None]:
        """Send the call with the reserved key, within the call's deadline; classify the answer."""
        secret = self.pool.secret(route.provider.name, res.key)
        started = time.monotonic()
        call.trace.attempts += 1
        try:
            async with asyncio.timeout(max(progress.remaining(), 0.001)):
                reply = await self.upstreams.send(
                    route.provider,
                    call.endpoint.url(route.provider) or "",
                    secret,
                    call.body_for(route),
                    stream=call.stream,
                    extra_headers=_extra_headers(call, secret),
                    max_body=self.settings.server.max_upstream_body_bytes,
                )
        except TransportError as exc:
            return classify_transport(exc.failure, exc.detail), None
        except UpstreamBodyTooLarge as exc:
            raise self._body_too_large(call, res, exc.limit) from None
        except TimeoutError:  # the call's deadline (retry.deadline_seconds), not a socket's
            return classify_transport(
                TransportFailure.READ_TIMEOUT, "request deadline reached"
            ), None
        finally:
            waited = time.monotonic() - started
            call.trace.upstream_s += waited
        self.metrics.upstream_duration.labels(route.provider.name, res.key).observe(waited)
        verdict = classify(
            route.provider.type,
            reply.status,
            reply.response.headers,
            reply.body if reply.body is not None else b"",
            stream=call.stream,
        )
        return verdict, reply

    def _body_too_large(self, call: Call, res: Reservation, limit: int) -> UpstreamError:
        """A 200 answer over ``server.max_upstream_body_bytes``, dropped unread: a 502 at once.

        The upstream served (and counted) the call, so the reservation stays counted and is
        not settled; the key did nothing wrong (no cooldown, never disabled, no breaker).
        No other key is tried: the size follows from the request, and each try would spend a
        call on the same answer.
        """
        call.trace.provider, call.trace.key = res.provider, res.key
        self.metrics.upstream_errors.labels(res.provider, res.key, "body_too_large").inc()
        log.warning(
            "upstream answer over %d bytes dropped: %s/%s for %s (request %s)",
            limit,
            res.provider,
            res.key,
            res.model,
            call.request_id,
        )
        return self.refusals.body_too_large(limit)

    # -- what an answer teaches: the store and the breakers ----------------------------------

    async def _learn(self, route: Route, res: Reservation, verdict: Verdict, keys: int) -> None:
        settlement = settlement_for(verdict, daily_limit=res.daily_limit)
        if worth_settling(settlement, *self._lowest.floors(res)):
            await self._settle(res, settlement, verdict)
        self._tell_breaker(route, res.key, verdict, keys)

    async def _settle(self, res: Reservation, settlement: Settlement, verdict: Verdict) -> None:
        try:
            result = await self.store.settle(res, settlement, to_ms(self.clock()))
        except StoreError as exc:
            log.warning(
                "could not record %s for %s/%s: %s", verdict.row, res.provider, res.key, exc
            )
            return
        if result.newly_disabled:
            log.error(
                "KEY DISABLED: provider %s key %s was rejected upstream (%s: %s); "
                "fix or replace its secret, then reload",
                res.provider,
                res.key,
                verdict.row,
                verdict.message,
            )
        elif result.exhausted:
            log.info(
                "%s/%s out for the day (%s) for %s",
                res.provider,
                res.key,
                result.exhausted,
                res.model,
            )

    def _breaker_open(self, route: Route, progress: _Progress) -> bool:
        """Skip a provider behind an open breaker, as if its keys were cooling (untouched)."""
        opened = self.breakers.blocking(route.provider.name, route.model)
        if opened is None:
            return False
        if progress.moving_from is None:  # else the failure that opened it is the reason
            progress.moving_from = (route.provider.name, "breaker_open")
        if opened.signature is Signature.THROTTLE:
            progress.blocked.append(
                NoCapacity(route.provider.name, route.model, retry_at_ms=int(opened.until * 1000))
            )
        elif progress.broken is None or opened.until < progress.broken.until:
            progress.broken = opened
        return True

    def _tell_breaker(self, route: Route, key: str, verdict: Verdict, keys: int) -> None:
        opened = self.breakers.record(route.provider.name, route.model, key, verdict.outcome, keys)
        if opened is not None:
            log.warning(
                "provider breaker open: %s%s skipped for %.0f s after %s on %s (trip %d)",
                opened.provider,
                "" if opened.model is None else f" for {opened.model}",
                opened.until - self.clock().timestamp(),
                opened.signature.value,
                ", ".join(opened.keys) if opened.keys else "a half-open try",
                opened.trips,
            )

    def _count_failover(self, progress: _Progress, route: Route) -> None:
        if progress.moving_from is not None:
            source, reason = progress.moving_from
            self.metrics.failovers.labels(source, route.provider.name, reason).inc()
            progress.moving_from = None

    # -- no route served ------------------------------------------------------------------

    def _no_route(self, call: Call, routes: int, progress: _Progress) -> RouterError:
        """Why nothing served, most telling first: the client's share, a breaker, spent keys,
        a model nobody serves, then the upstreams' failures."""
        words = self.refusals
        shares = [b for b in progress.blocked if b.reason is Refusal.CLIENT_SHARE]
        if shares and all(b.reason is Refusal.CLIENT_SHARE for b in progress.blocked):
            # Only the client's own share stands in the way (no paid route it may use).
            return words.client_share(call.trace.client, shares[0])
        if progress.broken is not None:
            return words.upstream_unavailable(call.model, progress.broken, progress.blocked)
        budgets = [b for b in progress.blocked if b.reason in _BUDGETS]
        if budgets and not any(b.retry_at_ms is not None for b in progress.blocked):
            # Nothing frees before the reset, and a budget stops the last route(s).
            self.metrics.refusals.labels(call.trace.client, budgets[-1].reason).inc()
            return words.budget_spent(call.trace.client, call.model, budgets[-1])
        if progress.blocked:
            return words.pool_exhausted(call.model, progress.blocked)
        if progress.unavailable >= routes:
            return words.not_served_anywhere(call.model)
        return words.upstream_failed(progress.last_failure, out_of_time=progress.remaining() <= 0)


_BUDGETS = (Refusal.CLIENT_BUDGET, Refusal.PROVIDER_BUDGET)


def _extra_headers(call: Call, secret: str) -> dict[str, str] | None:
    """The client headers an endpoint passes on, and Anthropic's key header."""
    endpoint = call.endpoint
    if not endpoint.forward_headers and not endpoint.anthropic:
        return None
    headers = {
        name: value
        for name in endpoint.forward_headers
        if (value := call.headers.get(name)) is not None
    }
    if endpoint.anthropic:
        headers["x-api-key"] = secret  # Anthropic clients' header; Bearer is sent as well
    return headers
