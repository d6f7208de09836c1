"""The client API's endpoints (/v1/...): read and parse just enough of the request, authenticate
the client, hand the call to the failover engine (router.failover) and answer with what it
returns, the upstream's reply (a JSON body, or a stream through router.relay) or the refusal,
which the middleware renders in the client API's shape; also the image task poll, the model list,
and one access-log line and the request metrics per call. Each handler runs on the live Runtime
(router.state) and keeps it to its end, so a reload never changes the configuration under a
running request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from router.auth import OPEN_CLIENT
from router.calls import Call, Trace, parse_call, request_id
from router.endpoints import CHAT, EMBEDDINGS, FIXED_PATHS, IMAGES, MESSAGES, Endpoint
from router.endpoints import passthrough as passthrough_endpoint
from router.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    RouterError,
    ShuttingDown,
    StoreUnavailable,
    UpstreamError,
)
from router.failover import Served
from router.metrics import Metrics
from router.pricing import from_nanos
from router.quota.days import to_ms
from router.quota.store import QuotaStore, StoreError
from router.quota.types import Reservation, UsageRecord
from router.relay import relay_stream
from router.runtime import Runtime
from router.state import LIFECYCLE, LIVE
from router.upstream import TransportError
from router.usage import StreamUsage, Usage, from_body

log = logging.getLogger("router.gateway")
access_log = logging.getLogger("router.access")

_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TASK_TTL_MS = 24 * 3600 * 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RuntimeHandler = Callable[[web.Request, Runtime], Awaitable[web.StreamResponse]]


def on_runtime(handler: RuntimeHandler) -> Handler:
    """``handler`` on the live Runtime, held until the answer ends; 503 while draining."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.app[LIFECYCLE].draining:
            raise ShuttingDown("The gateway is shutting down; retry on another replica.")
        runtime = request.app[LIVE].runtime
        runtime.enter()
        try:
            return await handler(request, runtime)
        finally:
            runtime.leave()

    return wrapped


def _calls(endpoint: Endpoint) -> Handler:
    async def handler(request: web.Request, runtime: Runtime) -> web.StreamResponse:
        return await _serve(request, runtime, endpoint)

    return on_runtime(handler)


chat_completions = _calls(CHAT)
embeddings = _calls(EMBEDDINGS)
images = _calls(IMAGES)
messages = _calls(MESSAGES)


@on_runtime
async def passthrough(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    """An allow-listed ``/v1/<path>``; anything else is 404, so this is no open proxy."""
    path = request.match_info.get("path", "")
    allowed = any(path in p.passthrough for p in runtime.settings.providers)
    if request.method != "POST" or not allowed:
        if path in FIXED_PATHS or path.startswith("tasks/"):
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}.")
        raise NotFound(f"No route for {request.method} {request.path}.")
    if request.raw_path.split("?", 1)[0] != f"/v1/{path}":  # encoded slashes, dot segments
        raise NotFound(f"No route for {request.method} {request.path}.")
    return await _serve(request, runtime, passthrough_endpoint(path))


@on_runtime
async def list_models(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    client = runtime.auth.authenticate(request.headers)
    created = int(runtime.clock().timestamp())
    data = [
        {"id": i, "object": "model", "created": created, "owned_by": "modelscope-router"}
        for i in runtime.model_ids(client)
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


# -- a call: parse, forward, answer, record -----------------------------------------------------


async def _serve(request: web.Request, runtime: Runtime, endpoint: Endpoint) -> web.StreamResponse:
    trace = Trace(request_id(request.headers), time.monotonic())
    metrics = runtime.metrics
    metrics.inflight.inc()
    try:
        trace.client = runtime.auth.authenticate(request.headers)
        raw = await _read_body(request, runtime.settings.server.max_body_bytes)
        record = runtime.settings.usage.record
        call = parse_call(raw, endpoint, trace, request.headers, record)
        trace.model = _model_label(runtime, call.model)
        outcome = await runtime.failover.forward(call)
        if isinstance(outcome, RouterError):
            raise outcome
        response = await _answer(request, runtime, call, outcome)
        trace.status = response.status
        return response
    except RouterError as exc:
        trace.status = exc.status
        exc.headers["x-request-id"] = trace.request_id
        exc.anthropic = endpoint.anthropic
        raise
    finally:
        metrics.inflight.dec()
        _record(runtime, trace)


async def _read_body(request: web.Request, limit: int) -> bytes:
    # aiohttp raises its own HTTPRequestEntityTooLarge past client_max_size; left to the
    # middleware, the 413 lost its x-request-id and was counted as a 500 in the metrics.
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"The request body is larger than {limit} bytes.") from None
    except ConnectionResetError:
        # The client closed before its whole body arrived (a Content-Length larger than
        # what it sent). Not a gateway fault: it was logged as an unexpected error with a
        # traceback and counted as a 500 (found by tests/test_fuzz.py).
        raise BadRequest(
            "The connection closed before the whole request body arrived.",
            code="incomplete_body",
        ) from None


def _model_label(runtime: Runtime, model: str) -> str:
    # Bounded label set: a client sending random names cannot blow up the series count.
    if model in runtime.catalog.known or runtime.routes.has_alias(model):
        return model
    return "other"


async def _answer(
    request: web.Request, runtime: Runtime, call: Call, served: Served
) -> web.StreamResponse:
    res, reply = served.reservation, served.reply
    headers = {
        "x-request-id": call.request_id,
        "x-router-provider": res.provider,
        "x-router-key": res.key,
    }
    endpoint = call.endpoint
    if reply.first_chunk is not None:
        usage = None
        if endpoint.reads_usage and runtime.settings.usage.record:
            usage = StreamUsage(anthropic=endpoint.anthropic, strip=call.adds_usage)
        done = endpoint.done_marker
        trace, metrics = call.trace, runtime.metrics
        return await relay_stream(
            request, reply, headers, done, trace, metrics, usage, anthropic=endpoint.anthropic
        )
    reply.close()
    if endpoint.reads_usage and reply.status == 200 and runtime.settings.usage.record:
        call.trace.usage = from_body(reply.body or b"", endpoint.anthropic)
    if call.endpoint is IMAGES and reply.status == 200:
        await _remember_task(runtime.store, reply.body or b"", res, call.trace.client)
    headers["Content-Type"] = reply.response.headers.get("Content-Type", "application/json")
    body = without_secret(reply.body or b"", runtime.pool.secret(res.provider, res.key))
    return web.Response(status=reply.status, body=body, headers=headers)


def _record(runtime: Runtime, trace: Trace) -> None:
    """The request's metrics, its usage and cost (to the store, through the ledger) and its
    access-log line."""
    metrics = runtime.metrics
    total = time.monotonic() - trace.started
    overhead = max(0.0, total - trace.upstream_s - trace.client_s)
    metrics.requests.labels(trace.client, trace.model, trace.provider, str(trace.status)).inc()
    metrics.request_duration.labels(trace.provider).observe(total)
    metrics.overhead.observe(overhead)
    if trace.usage is not None:
        _record_tokens(metrics, trace, trace.usage)
        if trace.reservation is not None:
            _record_usage(runtime, trace, trace.reservation, trace.usage)
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
        extra={
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


def _record_tokens(metrics: Metrics, trace: Trace, usage: Usage) -> None:
    """The answer's tokens, once per request, by kind; a stream whose usage was incomplete."""
    for kind, tokens in usage.kinds():
        if tokens:
            metrics.tokens.labels(trace.client, trace.provider, trace.model, kind).inc(tokens)
    if usage.estimated:
        metrics.tokens_estimated.labels(trace.client, trace.provider).inc()


def _record_usage(runtime: Runtime, trace: Trace, res: Reservation, usage: Usage) -> None:
    """The answer's tokens and cost, on the quota day its call was counted on."""
    cost = runtime.prices.cost(res.provider, res.model, usage)
    client = runtime.failover.policy.client(trace.client)
    runtime.ledger.add(
        UsageRecord(
            day=res.day,
            day_end_ms=res.day_end_ms,
            client=trace.client,
            provider=res.provider,
            key=res.key,
            model=res.model,
            prompt=usage.prompt,
            completion=usage.completion,
            total=usage.total,
            cost=cost,
            at_ms=to_ms(runtime.clock()),
            tpm=client is not None and client.tpm is not None,
            estimated=usage.estimated,
        )
    )
    if cost:
        currency = runtime.prices.currency(res.provider)
        runtime.metrics.cost.labels(trace.client, res.provider, currency).inc(from_nanos(cost))


# -- image tasks: created by a call, polled at the key that created them ---------------------


async def _remember_task(store: QuotaStore, body: bytes, res: Reservation, client: str) -> None:
    try:
        task_id = orjson.loads(body).get("task_id")
    except (orjson.JSONDecodeError, AttributeError):
        return
    if isinstance(task_id, str) and _TASK_ID.match(task_id):
        try:
            owner = f"{res.provider}|{res.key}|{client}"  # names never hold a "|"
            await store.remember_task(task_id, owner, TASK_TTL_MS)
        except StoreError as exc:
            log.warning("could not remember image task %s: %s", task_id, exc)


@on_runtime
async def task(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    """Poll an image task at the key that created it (any replica knows it): not a call.

    Only the client that created a task may poll it; to any other it does not exist (the
    same 404 as an unknown id, so ids cannot be probed). A task whose key a reload removed
    answers 404 ``task_key_removed``: its result can no longer be fetched."""
    client = runtime.auth.authenticate(request.headers)
    task_id = request.match_info.get("task_id", "")
    if not _TASK_ID.match(task_id):
        raise NotFound("No such task.", code="task_not_found")
    try:
        remembered = await runtime.store.recall_task(task_id)
    except StoreError:
        raise StoreUnavailable("The quota store is unavailable; try again shortly.") from None
    provider_name, key, creator = _task_owner(remembered)
    if not key or creator != client:
        raise NotFound("No such task (or it expired).", code="task_not_found")
    try:
        provider = runtime.settings.provider(provider_name)
        secret = runtime.pool.secret(provider_name, key)
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
        status, content_type, body = await runtime.upstreams.get(
            provider, f"tasks/{task_id}", secret, headers
        )
    except TransportError as exc:
        raise UpstreamError(f"The upstream did not answer the task poll ({exc.failure}).") from None
    return web.Response(
        status=status,
        body=without_secret(body, secret),
        headers={"Content-Type": content_type or "application/json", "x-router-key": key},
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


def without_secret(body: bytes, secret: str) -> bytes:
    """``body`` with every copy of ``secret`` replaced: an upstream that echoes the key it was
    sent (some error pages do) handed it to the client in a 4xx passed on as is
    (tests/test_canary.py). Streams are relayed as they come and are not scanned."""
    return body.replace(secret.encode(), b"[redacted]") if secret else body
