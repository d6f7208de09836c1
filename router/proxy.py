"""The request path: parse just enough, authenticate, resolve routes, reserve, forward, fail over.

Every decision about an upstream answer comes from ``router.classify``; every count from the
quota store. This module only glues them together.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from router.auth import OPEN_CLIENT, ClientAuth
from router.breaker import Breakers, Open, Signature
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
from router.config import ProviderConfig, Settings
from router.endpoints import (
    CHAT,
    EMBEDDINGS,
    FIXED_PATHS,
    IMAGES,
    MESSAGES,
    Endpoint,
    passthrough,
)
from router.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PoolExhausted,
    RouterError,
    StoreUnavailable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    sse_error_event,
)
from router.logs import FieldLog
from router.metrics import Metrics
from router.pool import KeyPool
from router.quota.days import QuotaCalendar, next_reset, to_ms
from router.quota.store import QuotaStore, StoreError
from router.quota.types import (
    KeySpec,
    NoCapacity,
    Refusal,
    Reservation,
    ReserveRequest,
    Settlement,
)
from router.routing import Route, RouteTable, known_routes
from router.upstream import TransportError, UpstreamBodyTooLarge, UpstreamReply, Upstreams

log = logging.getLogger("router.proxy")
access_log = FieldLog("router.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TASK_TTL_MS = 24 * 3600 * 1000
URL_CACHE_MAX = 4096
PLAN_CACHE_MAX = 4096


@dataclass(slots=True)
class Trace:
    """What one request did and where its time went: for the access log and the metrics."""

    request_id: str
    started: float
    client: str = "unknown"
    model: str = "none"  # a bounded label: alias, listed model, or "other"
    provider: str = "none"
    key: str = "none"
    status: int = 500
    attempts: int = 0
    upstream_s: float = 0.0  # waiting on upstreams
    client_s: float = 0.0  # waiting on the client to take a stream


class Deadline:
    """``asyncio.timeout`` for one await, as a plain timer on the task: the same cancel and
    ``uncancel`` bookkeeping, without an async context manager and the two event-loop lookups
    it makes per attempt (each a getpid on Python 3.11; bench/ profile). Used as::

        deadline = Deadline(task, seconds)
        try:
            await work()
        except asyncio.CancelledError:
            if not deadline.expired():
                raise  # someone else's cancellation
            ...  # the deadline's
        finally:
            deadline.cancel()
    """

    __slots__ = ("_cancelling", "_fired", "_handle", "_task")

    def __init__(self, task: asyncio.Task[Any], seconds: float) -> None:
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False
        self._handle = task.get_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """After a CancelledError: whether it was this deadline's (then it is taken back)."""
        return self._fired and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(slots=True)
class Call:
    """One client request, parsed only as deep as routing needs."""

    endpoint: Endpoint
    model: str  # "" for a passthrough body without one
    stream: bool
    payload: dict[str, Any]
    raw: bytes
    trace: Trace
    headers: Mapping[str, str]  # the client's, read only for an endpoint's forward_headers

    @property
    def request_id(self) -> str:
        return self.trace.request_id

    def body_for(self, route: Route) -> bytes:
        """The client's body, unchanged but for ``model``."""
        if route.model == self.model or not self.model:
            return self.raw
        return orjson.dumps({**self.payload, "model": route.model})


def parse_call(
    raw: bytes, endpoint: Endpoint, trace: Trace, headers: Mapping[str, str] | None = None
) -> Call:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    if _model_given_twice(raw):
        raise BadRequest(
            "The request body gives 'model' more than once; send it once.",
            code="duplicate_model",
            param="model",
        )
    model = payload.get("model", "" if not endpoint.needs_model else None)
    if (
        not isinstance(model, str)
        or len(model) > 256
        or (endpoint.needs_model and not model.strip())
    ):
        raise BadRequest("'model' is required: a model id or alias.", param="model")
    endpoint.check(payload)
    stream = payload.get("stream", False)
    if not endpoint.streams:
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    return Call(endpoint, model, stream, payload, raw, trace, headers or {})


# The bytes of the key "model" (a second one is looked for), and a JSON escape of one of its
# letters (m o d e l: U+006D 006F 0064 0065 006C), the other way to spell the key.
_MODEL_KEY = b'"model"'
_ESCAPED_MODEL_LETTER = re.compile(rb"\\u006[45cdfCDF]")


def _model_given_twice(raw: bytes) -> bool:
    """Whether the body's top level has the key ``model`` more than once (BadRequest when
    the body cannot be checked).

    orjson keeps the last silently, an upstream's parser may keep the first: the allow-list
    and the counters would judge one model and the upstream serve another. Cheap: the body is
    parsed a second time (by the standard library, keeping every key of the top level) only
    when its bytes hold ``"model"`` twice or an escaped letter of it; the common body is only
    scanned.
    """
    if raw.count(_MODEL_KEY) < 2 and _ESCAPED_MODEL_LETTER.search(raw) is None:
        return False
    try:
        # The hook keeps an object's pairs as a list: the top level's is the result.
        pairs = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    except (ValueError, RecursionError):  # orjson took it, the standard library did not
        raise BadRequest(
            "The request body could not be checked for a repeated 'model'.", code="invalid_json"
        ) from None
    return sum(1 for name, _ in pairs if name == "model") > 1


class RequestIds:
    """32 hex digits, unique: 64 random bits drawn once per process, then a counter. No
    syscall per request (uuid4 and os.urandom read the kernel's random source each time);
    an id names a request in the logs, it is no secret."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count(1).__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next():016x}"


_IDS = RequestIds()


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    return given if given is not None and _REQUEST_ID.match(given) else _IDS.new()


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


@dataclass(slots=True)
class _Progress:
    """What one request has met so far on its way through the routes."""

    deadline: float
    task: asyncio.Task[Any]  # the handler's: what a Deadline cancels
    failures: int = 0
    blocked: list[NoCapacity] = field(default_factory=list)
    unavailable: int = 0
    last_failure: Verdict | None = None
    moving_from: tuple[str, str] | None = None  # (provider, reason) of the last failover
    broken: Open | None = None  # the soonest-closing failure breaker that skipped a route

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Proxy:
    """The gateway's request handlers and the failover loop."""

    def __init__(
        self,
        settings: Settings,
        store: QuotaStore,
        upstreams: Upstreams,
        pool: KeyPool,
        catalog: Catalog,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstreams = upstreams
        self.pool = pool
        self.catalog = catalog
        self.metrics = metrics
        self.clock = clock
        self.auth = ClientAuth(settings.clients)
        self.policy = ClientPolicy(settings)
        self.routes = RouteTable(settings)
        self._providers = {p.name: p for p in settings.providers}
        self._passthrough = frozenset(path for p in settings.providers for path in p.passthrough)
        self._tz = settings.quota.tz
        self._reset = settings.quota.reset_time
        self._calendar = QuotaCalendar(self._tz, self._reset)
        self._lowest = LowestSeen()
        self._urls: dict[tuple[str, bool, str], URL | None] = {}
        # (client, endpoint, passthrough, model) -> (the catalog's model set it was made
        # with, the routes): every client, model and endpoint check of a call, made once.
        self._plans: dict[tuple[str, str, bool, str], tuple[frozenset[str], tuple[Route, ...]]] = {}
        self.breakers = Breakers(lambda: self.clock().timestamp())

    # -- handlers ---------------------------------------------------------------------------
    # The endpoints hand back _handle's coroutine itself: no frame of their own to pass
    # through at each of the request's resumptions.

    def chat_completions(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        return self._handle(request, CHAT)

    def embeddings(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        return self._handle(request, EMBEDDINGS)

    def images(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        return self._handle(request, IMAGES)

    def messages(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        return self._handle(request, MESSAGES)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """An allow-listed ``/v1/<path>``; anything else is 404, so this is no open proxy."""
        path = request.match_info.get("path", "")
        if request.method != "POST" or path not in self._passthrough:
            if path in FIXED_PATHS or path.startswith("tasks/"):
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}.")
            raise NotFound(f"No route for {request.method} {request.path}.")
        if request.raw_path.split("?", 1)[0] != f"/v1/{path}":  # encoded slashes, dot segments
            raise NotFound(f"No route for {request.method} {request.path}.")
        return await self._handle(request, passthrough(path))

    async def task(self, request: web.Request) -> web.StreamResponse:
        """Poll an image task at the key that created it (any replica knows it): not a call.

        Only the client that created a task may poll it; to any other it does not exist (the
        same 404 as an unknown id, so ids cannot be probed). A task whose key a reload removed
        answers 404 ``task_key_removed``: its result can no longer be fetched."""
        client = self.auth.authenticate(request.headers)
        task_id = request.match_info.get("task_id", "")
        if not _TASK_ID.match(task_id):
            raise NotFound("No such task.", code="task_not_found")
        try:
            remembered = await self.store.recall_task(task_id)
        except StoreError:
            raise StoreUnavailable("The quota store is unavailable; try again shortly.") from None
        provider_name, key, creator = _task_owner(remembered)
        if not key or creator != client:
            raise NotFound("No such task (or it expired).", code="task_not_found")
        try:
            provider = self._providers[provider_name]
            secret = self.pool.secret(provider_name, key)
        except KeyError:  # a reload removed the provider or the key
            raise NotFound(
                f"The task was created with the upstream key '{provider_name}/{key}', which is "
                "no longer configured (a reload removed it): its result cannot be fetched.",
                code="task_key_removed",
            ) from None
        headers = {
            name: request.headers[name]
            for name in ("X-ModelScope-Task-Type",)
            if name in request.headers
        }
        try:
            status, content_type, body = await self.upstreams.get(
                provider, f"tasks/{task_id}", secret, headers
            )
        except TransportError as exc:
            raise UpstreamError(
                f"The upstream did not answer the task poll ({exc.failure})."
            ) from None
        return web.Response(
            status=status,
            body=_without_secret(body, secret),
            headers={"Content-Type": content_type or "application/json", "x-router-key": key},
        )

    async def list_models(self, request: web.Request) -> web.Response:
        self.auth.authenticate(request.headers)
        created = int(self.clock().timestamp())
        ids = list(dict.fromkeys([*self.routes.aliases, *self.catalog.all_models()]))
        data = [
            {"id": i, "object": "model", "created": created, "owned_by": "modelscope-router"}
            for i in ids
        ]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        trace = Trace(request_id_of(request), time.monotonic())
        task = asyncio.current_task()  # the handler's: a Deadline cancels it
        assert task is not None  # aiohttp runs every handler in a task
        self.metrics.handling += 1
        try:
            trace.client = self.auth.authenticate(request.headers)
            call = parse_call(await self._read_body(request), endpoint, trace, request.headers)
            trace.model = self._model_label(call.model)
            response = await self._forward(request, call, task)
            trace.status = response.status
            return response
        except RouterError as exc:
            trace.status = exc.status
            exc.headers["x-request-id"] = trace.request_id
            exc.anthropic = endpoint.anthropic
            raise
        finally:
            self.metrics.handling -= 1
            # Once this step of the task is over, i.e. after aiohttp has written the answer:
            # the access line and the metrics are off the client's critical path.
            task.get_loop().call_soon(self._record, trace)

    def _record(self, trace: Trace) -> None:
        total = time.monotonic() - trace.started
        overhead = max(0.0, total - trace.upstream_s - trace.client_s)
        m = self.metrics
        m.requests.inc(trace.client, trace.model, trace.provider, str(trace.status))
        m.request_duration.observe(total, trace.provider)
        m.overhead.observe(overhead)
        access_log.info(
            "%s %s %s -> %s/%s attempts=%d upstream=%.1fms total=%.1fms",
            trace.status,
            trace.client,
            trace.model,
            trace.provider,
            trace.key,
            trace.attempts,
            trace.upstream_s * 1000,
            total * 1000,
            fields={
                "request_id": trace.request_id,
                "client": trace.client,
                "model": trace.model,
                "provider": trace.provider,
                "key": trace.key,
                "status": trace.status,
                "attempts": trace.attempts,
                "upstream_ms": round(trace.upstream_s * 1000, 2),
                "overhead_ms": round(overhead * 1000, 3),
                "total_ms": round(total * 1000, 2),
            },
        )

    async def _read_body(self, request: web.Request) -> bytes:
        # aiohttp raises its own HTTPRequestEntityTooLarge past client_max_size; left to the app
        # middleware, the 413 lost its x-request-id and was counted as a 500 in the metrics.
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.settings.server.max_body_bytes
            raise BodyTooLarge(f"The request body is larger than {limit} bytes.") from None
        except ConnectionResetError:
            # The client closed before its whole body arrived (a Content-Length larger than
            # what it sent). Not a gateway fault: it was logged as an unexpected error with a
            # traceback and counted as a 500 (found by tests/test_fuzz.py).
            raise BadRequest(
                "The connection closed before the whole request body arrived.",
                code="incomplete_body",
            ) from None

    def _model_label(self, model: str) -> str:
        # Bounded label set: a client sending random names cannot blow up the series count.
        if model in self.catalog.known or self.routes.has_alias(model):
            return model
        return "other"

    # -- the failover loop ------------------------------------------------------------------

    async def _forward(
        self, request: web.Request, call: Call, task: asyncio.Task[Any]
    ) -> web.StreamResponse:
        client = call.trace.client
        endpoint = call.endpoint
        plan_key = (client, endpoint.name, endpoint.passthrough, call.model)
        plan = self._plans.get(plan_key)
        if plan is not None and plan[0] is self.catalog.known:  # the catalog has not changed
            routes = plan[1]
        else:
            routes = self._plan(call)
            if len(self._plans) < PLAN_CACHE_MAX:  # bounded: clients choose model names
                self._plans[plan_key] = (self.catalog.known, routes)
        deadline = time.monotonic() + self.settings.retry.deadline_seconds
        progress = _Progress(deadline=deadline, task=task)
        for index, route in enumerate(routes):
            answer = await self._try_route(request, call, route, index, progress)
            if answer is not None:
                return answer
            if self._out_of_attempts(progress):
                break
        raise self._no_route_error(call, len(routes), progress)

    def _plan(self, call: Call) -> tuple[Route, ...]:
        """The routes a client's call may take, in order; raises when there is none."""
        client = call.trace.client
        if not self.policy.allows_model(client, call.model):
            raise Forbidden(
                f"The client '{client}' may not use the model '{call.model}'.",
                code="model_not_allowed",
                param="model",
            )
        routes = self._routes_for(call)
        if not routes:
            raise NotFound(
                f"The model '{call.model}' does not exist or no configured provider serves it.",
                code="model_not_found",
                param="model",
            )
        if not self.routes.has_alias(call.model):  # an alias is judged by its id alone
            listed = itertools.chain(self.catalog.all_models(), self.routes.alias_models)
            allowed = self.policy.allowed_routes(client, call.model, routes, listed)
            if not allowed:
                served = ", ".join(f"'{r.model}' on {r.provider.name}" for r in routes)
                raise Forbidden(
                    f"The client '{client}' may not use the model '{call.model}': it would be "
                    f"served as {served}, which its allowed models do not cover.",
                    code="model_not_allowed",
                    param="model",
                )
            routes = allowed
        routes = self.policy.routes_for(client, routes)
        if not routes:
            raise Forbidden(
                f"The client '{client}' may not use paid providers, the only ones serving "
                f"'{call.model}'.",
                code="paid_provider_not_allowed",
                param="model",
            )
        return routes

    def _routes_for(self, call: Call) -> tuple[Route, ...]:
        endpoint = call.endpoint
        if not call.model:  # a passthrough body without a model: every provider that declares it
            return tuple(Route(p, "") for p in self._providers.values() if self._url(endpoint, p))
        routes = known_routes(self.routes.resolve(call.model), self.catalog.models)
        return tuple(r for r in routes if self._url(endpoint, r.provider) is not None)

    def _url(self, endpoint: Endpoint, provider: ProviderConfig) -> URL | None:
        """``endpoint.url(provider)``, parsed once (aiohttp parses a str URL on every call)."""
        ident = (endpoint.name, endpoint.passthrough, provider.name)
        try:
            return self._urls[ident]
        except KeyError:
            text = endpoint.url(provider)
            url = None if text is None else URL(text)
            if len(self._urls) < URL_CACHE_MAX:  # passthrough paths are allow-listed: bounded
                self._urls[ident] = url
            return url

    def _out_of_attempts(self, progress: _Progress) -> bool:
        return progress.failures >= self.settings.retry.max_attempts or progress.remaining() <= 0

    async def _try_route(
        self, request: web.Request, call: Call, route: Route, index: int, progress: _Progress
    ) -> web.StreamResponse | None:
        specs = self.pool.specs(route.provider, route.model)
        # Each NEXT_KEY takes a key out of the pool, so this bound is never the one that stops.
        for _ in range(len(specs) + self.settings.retry.max_attempts + 1):
            if self._out_of_attempts(progress):
                return None
            if self._breaker_open(route, progress):
                return None
            reservation = await self._reserve(route, specs, call.trace.client)
            if isinstance(reservation, NoCapacity):
                if reservation.reason is Refusal.CLIENT_LIMIT:
                    raise self._client_limit(call, reservation)
                progress.blocked.append(reservation)
                return None
            self._lowest.record(reservation)
            self._count_failover(progress, route)
            verdict, reply = await self._attempt(call, route, reservation, progress)
            settlement = settlement_for(verdict, daily_limit=reservation.daily_limit)
            if worth_settling(settlement, *self._lowest.floors(reservation)):
                await self._settle(reservation, settlement, verdict)
            self._tell_breaker(route, reservation.key, verdict, len(specs))
            action = verdict.action
            if action is Action.RETURN:
                assert reply is not None
                if index > 0 and verdict.outcome is Outcome.OK:
                    self.metrics.fallback_requests.labels(route.provider.name).inc()
                return await self._answer(request, call, reservation, reply)
            if reply is not None:
                reply.close()
            self.metrics.upstream_errors.labels(
                route.provider.name, reservation.key, verdict.row
            ).inc()
            progress.moving_from = (route.provider.name, verdict.outcome.value)
            progress.last_failure = verdict
            if action is Action.NEXT_ROUTE:
                progress.unavailable += 1
                return None
            if action is Action.RETRY:
                progress.failures += 1
        return None

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

    async def _reserve(
        self, route: Route, specs: tuple[KeySpec, ...], client: str
    ) -> Reservation | NoCapacity:
        now = self.clock()
        day, day_end_ms = self._calendar.window(now)
        req = ReserveRequest(
            provider=route.provider.name,
            model=route.model,
            keys=specs,
            strategy=route.provider.strategy,
            day=day,
            now_ms=to_ms(now),
            day_end_ms=day_end_ms,
            client=self.policy.quota_for(client, route.provider),
        )
        try:
            return await self.store.reserve(req)
        except StoreError as exc:
            log.error("quota store unavailable: %s", exc)
            raise StoreUnavailable(
                "The quota store is unavailable; try again shortly.",
                headers={"Retry-After": "5"},
            ) from None

    async def _attempt(
        self, call: Call, route: Route, res: Reservation, progress: _Progress
    ) -> tuple[Verdict, UpstreamReply | None]:
        secret = self.pool.secret(route.provider.name, res.key)
        started = time.monotonic()
        call.trace.attempts += 1
        deadline = Deadline(progress.task, max(progress.remaining(), 0.001))
        try:
            reply = await self.upstreams.send(
                route.provider,
                self._url(call.endpoint, route.provider) or "",
                secret,
                call.body_for(route),
                stream=call.stream,
                extra_headers=self._extra_headers(call, secret),
                max_body=self.settings.server.max_upstream_body_bytes,
            )
        except TransportError as exc:
            return classify_transport(exc.failure, exc.detail), None
        except UpstreamBodyTooLarge as exc:
            raise self._body_too_large(call, route, res, exc.limit) from None
        except asyncio.CancelledError:
            if not deadline.expired():
                raise  # the client went away, or the shutdown's grace is over
            return classify_transport(
                TransportFailure.READ_TIMEOUT, "request deadline reached"
            ), None
        finally:
            deadline.cancel()
            waited = time.monotonic() - started
            call.trace.upstream_s += waited
        self.metrics.upstream_duration.observe(waited, route.provider.name, res.key)
        verdict = classify(
            route.provider.type,
            reply.status,
            reply.response.headers,
            reply.body if reply.body is not None else b"",
            stream=call.stream,
        )
        return verdict, reply

    def _body_too_large(
        self, call: Call, route: Route, res: Reservation, limit: int
    ) -> UpstreamError:
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
            route.model,
            call.request_id,
        )
        return UpstreamError(
            f"The upstream's answer is larger than the gateway's limit of {limit} bytes "
            "(server.max_upstream_body_bytes) and was not passed on; the call was made and "
            "counts against the quota.",
            code="upstream_body_too_large",
        )

    def _extra_headers(self, call: Call, secret: str) -> dict[str, str] | None:
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

    # -- answers ----------------------------------------------------------------------------

    def _router_headers(self, call: Call, res: Reservation) -> dict[str, str]:
        return {
            "x-request-id": call.request_id,
            "x-router-provider": res.provider,
            "x-router-key": res.key,
        }

    async def _answer(
        self, request: web.Request, call: Call, res: Reservation, reply: UpstreamReply
    ) -> web.StreamResponse:
        headers = self._router_headers(call, res)
        call.trace.provider, call.trace.key = res.provider, res.key
        if reply.first_chunk is None:
            reply.close()
            if call.endpoint is IMAGES and reply.status == 200:
                await self._remember_task(reply.body or b"", res, call.trace.client)
            content_type = reply.response.headers.get("Content-Type", "application/json")
            headers["Content-Type"] = content_type
            body = _without_secret(reply.body or b"", self.pool.secret(res.provider, res.key))
            return web.Response(status=reply.status, body=body, headers=headers)
        return await self._relay_stream(request, reply, headers, call)

    async def _remember_task(self, body: bytes, res: Reservation, client: str) -> None:
        try:
            task_id = orjson.loads(body).get("task_id")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(task_id, str) and _TASK_ID.match(task_id):
            try:
                owner = f"{res.provider}|{res.key}|{client}"  # names never hold a "|"
                await self.store.remember_task(task_id, owner, TASK_TTL_MS)
            except StoreError as exc:
                log.warning("could not remember image task %s: %s", task_id, exc)

    async def _relay_stream(
        self, request: web.Request, reply: UpstreamReply, headers: dict[str, str], call: Call
    ) -> web.StreamResponse:
        """Pass chunks on as they arrive; a stream that breaks ends with an error event."""
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        trace = call.trace
        chunks = reply.response.content.iter_any()
        tail = b""
        chunk = reply.first_chunk or b""
        try:
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError):
                # The client left before its first byte: an abort like any other, not the
                # "incomplete body" 400 (recorded as a 500) it ended as in the middleware.
                self.metrics.stream_aborts.labels("client").inc()
                return response
            while True:
                waiting = time.monotonic()
                try:
                    await response.write(chunk)
                except (ConnectionError, RuntimeError):
                    self.metrics.stream_aborts.labels("client").inc()
                    return response
                finally:
                    trace.client_s += time.monotonic() - waiting
                tail = (tail + chunk)[-64:]
                waiting = time.monotonic()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    await self._end_broken_stream(
                        response, f"the upstream stream broke: {type(exc).__name__}"
                    )
                    return response
                finally:
                    trace.upstream_s += time.monotonic() - waiting
            if call.endpoint.done_marker not in tail:
                marker = call.endpoint.done_marker.decode()
                await self._end_broken_stream(
                    response, f"the upstream stream ended without {marker}"
                )
                return response
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            # Cut at the end of the shutdown grace (router.serve): the client is told, like
            # for any broken stream, instead of a bare cut recorded as a 500.
            trace.status = response.status
            if response.prepared:
                await self._end_cut_stream(response)
            raise
        finally:
            reply.close()

    async def _end_cut_stream(self, response: web.StreamResponse) -> None:
        event = sse_error_event(
            "the gateway is shutting down: the stream was cut", code="shutting_down"
        )
        try:
            await response.write(event)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass

    async def _end_broken_stream(self, response: web.StreamResponse, message: str) -> None:
        self.metrics.stream_aborts.labels("upstream").inc()
        log.warning("stream aborted: %s", message)
        try:
            await response.write(sse_error_event(message))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass

    def _no_route_error(self, call: Call, routes: int, progress: _Progress) -> RouterError:
        shares = [b for b in progress.blocked if b.reason is Refusal.CLIENT_SHARE]
        if shares and all(b.reason is Refusal.CLIENT_SHARE for b in progress.blocked):
            # Only the client's own share stands in the way (no paid route it may use).
            return self._client_share(call, shares[0])
        if progress.broken is not None:
            return self._upstream_unavailable(call, progress.broken, progress.blocked)
        if progress.blocked:
            return self._pool_exhausted(call, progress.blocked)
        if progress.unavailable >= routes:
            return NotFound(
                f"The model '{call.model}' is not served by any configured provider.",
                code="model_not_found",
                param="model",
            )
        last = progress.last_failure
        detail = f" (last: {last.row})" if last is not None else ""
        if progress.remaining() <= 0 or (last is not None and last.row.endswith("timeout")):
            return UpstreamTimeout(f"The upstream did not answer in time{detail}.")
        return UpstreamError(f"Every upstream attempt failed{detail}; try again shortly.")

    def _upstream_unavailable(
        self, call: Call, broken: Open, blocked: list[NoCapacity]
    ) -> UpstreamUnavailable:
        # The earliest moment a route may serve again: the breaker's end, or a cooldown's.
        now_ms = to_ms(self.clock())
        soonest = min(
            [int(broken.until * 1000), *(b.retry_at_ms for b in blocked if b.retry_at_ms)]
        )
        wait = (soonest - now_ms) / 1000
        return UpstreamUnavailable(
            f"The provider '{broken.provider}' is failing on several keys at once; "
            f"no other route can serve '{call.model}' now. Retry in {max(1, math.ceil(wait))} s.",
            retry_after_s=wait,
        )

    def _reset_text(self) -> tuple[str, float]:
        now = self.clock()
        reset = next_reset(now, self._tz, self._reset)
        text = reset.strftime("%Y-%m-%d %H:%M") + f" {self.settings.quota.timezone}"
        return text, (reset - now).total_seconds()

    def _client_limit(self, call: Call, refusal: NoCapacity) -> PoolExhausted:
        reset_text, wait = self._reset_text()
        return PoolExhausted(
            f"The client '{call.trace.client}' has used its daily limit of "
            f"{refusal.client_limit} calls; it resets at {reset_text}.",
            retry_after_s=wait,
            code="client_daily_limit",
        )

    def _client_share(self, call: Call, refusal: NoCapacity) -> PoolExhausted:
        reset_text, wait = self._reset_text()
        return PoolExhausted(
            f"The free pool is running low and is shared out: the client '{call.trace.client}' "
            f"has used its share of {refusal.client_limit} calls on {refusal.provider} today"
            " and may not use a paid fallback. It resets at "
            f"{reset_text}.",
            retry_after_s=wait,
            code="client_fair_share",
        )

    def _pool_exhausted(self, call: Call, blocked: list[NoCapacity]) -> PoolExhausted:
        reset_text, to_reset = self._reset_text()
        cooling = [b.retry_at_ms for b in blocked if b.retry_at_ms is not None]
        if cooling:
            wait = (min(cooling) - to_ms(self.clock())) / 1000
            return PoolExhausted(
                f"Every key that serves '{call.model}' is spent or cooling down after upstream "
                f"throttling; retry in {max(1, round(wait))} s. "
                f"The daily quota resets at {reset_text}.",
                retry_after_s=wait,
                code="rate_limited",
            )
        return PoolExhausted(
            f"The daily quota pool for '{call.model}' is spent on every route; "
            f"it resets at {reset_text} (in {_duration(to_reset)}).",
            retry_after_s=to_reset,
        )


def _task_owner(remembered: str | None) -> tuple[str, str, str]:
    """(provider, key, client) of a remembered task; ("", "", "") when there is none.

    A value of the older "provider|key" form (remembered before tasks had an owner) belongs
    to the open gateway's client only: a gateway with client keys does not show it to anyone.
    """
    parts = (remembered or "").split("|")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return parts[0], parts[1], OPEN_CLIENT
    return "", "", ""


def _without_secret(body: bytes, secret: str) -> bytes:
    """``body`` with every copy of ``secret`` replaced: an upstream that echoes the key it was
    sent (some error pages do) handed it to the client in a 4xx passed on as is
    (tests/test_canary.py). Streams are relayed as they come and are not scanned."""
    return body.replace(secret.encode(), b"[redacted]") if secret else body


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes} min"
