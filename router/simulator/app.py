"""The aiohttp applications standing in for ModelScope (/v1) and Bailian (/compatible-mode/v1).

Every request to an API endpoint goes through the same pipeline: parse (token, body,
model) -> take a matching fault -> configured latency -> checks (body, auth, model,
thinking rule, throttling, quota) -> count -> answer. The control API lives under /_sim/.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from router.simulator import anthropic, sse
from router.simulator.dialects import (
    BailianDialect,
    Dialect,
    ModelScopeDialect,
    bailian_error,
    json_response,
    request_id,
)
from router.simulator.faults import COUNTED_KINDS, FaultRule, Faults, parse_rule
from router.simulator.state import Account, Provider, ProviderState, SimState

MODELSCOPE_BASE = "/v1"
BAILIAN_BASE = "/compatible-mode/v1"
MODEL_CREATED = 1_700_000_000


@dataclass
class AppContext:
    """What the handlers of one simulated upstream share."""

    state: SimState
    faults: Faults
    dialect: Dialect
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def provider(self) -> ProviderState:
        return self.state.provider(self.dialect.provider)

    @property
    def name(self) -> Provider:
        return self.dialect.provider


CTX = web.AppKey("sim_context", AppContext)


@dataclass
class Call:
    """One API request being answered."""

    ctx: AppContext
    request: web.Request
    secret: str | None
    account: Account | None
    body: dict[str, Any]
    body_error: str | None
    fault: FaultRule | None = None
    counts: bool = True  # False once a fault that is not a real answer fired
    decorate: bool = True  # provider headers (ModelScope rate limits) on the answer

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) and model else None

    @property
    def dialect(self) -> Dialect:
        return self.ctx.dialect

    @property
    def cut(self) -> bool:
        return self.fault is not None and self.fault.kind == "mid_stream_cut"

    @property
    def usage_mode(self) -> anthropic.UsageMode:
        """How the answer reports its usage: truly, or as a no_usage/bad_usage fault says."""
        kind = self.fault.kind if self.fault is not None else ""
        return "none" if kind == "no_usage" else "bad" if kind == "bad_usage" else "real"

    @property
    def padding(self) -> int:
        """Bytes a big_body fault pads a JSON answer with (0: none)."""
        if self.fault is None or not self.fault.kind.startswith("big_body"):
            return 0
        return int(self.fault.number)


CALL_KEY = web.RequestKey("sim_call", Call)
Check = Callable[[Call], web.Response | None]
Answer = Callable[[Call], Awaitable[web.StreamResponse]]


# -- parsing ------------------------------------------------------------------------------
def bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def read_body(request: web.Request) -> tuple[dict[str, Any], str | None]:
    raw = await request.read()
    if not raw:
        return {}, "Request body is empty."
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, "Request body is not valid JSON."
    if not isinstance(data, dict):
        return {}, "Request body must be a JSON object."
    return data, None


async def begin_call(request: web.Request, read: bool = True) -> Call:
    """Parse a request; an API call (``read``) also takes the first matching fault."""
    ctx = request.app[CTX]
    secret = bearer(request)
    account = ctx.provider.lookup(secret)
    body, error = await read_body(request) if read else ({}, None)
    call = Call(ctx, request, secret, account, body, error)
    if read:
        refs = [r for r in (secret, account.name if account else None) if r]
        call.fault = ctx.faults.take(ctx.name, refs, call.model)
    request[CALL_KEY] = call
    return call


# -- connection tricks --------------------------------------------------------------------
def drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# -- faults -------------------------------------------------------------------------------
MALFORMED_SSE = (
    b'data: {"id": "chatcmpl-broken", "object": "chat.completion.chunk", "choices": [\n\n',
    b": keep-alive\n\n",
    b"event: ???\ndata: <<<not json>>>\n\n",
    b"garbage line without a field name\n\n",
    b'data: {"choices": [{"delta": {"content": 42}}]}\n\n',
)
HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>Service Maintenance</title></head>"
    "<body><h1>The service is under maintenance</h1><p>Please try again later.</p>"
    "</body></html>"
)
NON_JSON_ERROR = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
)


async def fault_reset(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    drop_connection(call.request)
    return web.Response()


async def fault_hang(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    # Ends when the client disconnects (at once under handler_cancellation, else on the
    # next transport check) or when the simulator shuts down.
    transport = call.request.transport
    while transport is not None and not transport.is_closing():
        try:
            async with asyncio.timeout(0.05):
                await call.ctx.closing.wait()
        except TimeoutError:
            continue
        break
    drop_connection(call.request)
    return web.Response()


async def fault_sleep_first(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    await asyncio.sleep(rule.number / 1000)
    return None  # then answer normally


async def fault_status(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    return call.dialect.server_error(int(rule.kind.removeprefix("status_")))


async def fault_throttle(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    return call.dialect.throttle(call.model)


async def fault_retry_after(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    response = call.dialect.throttle(call.model)
    response.headers["Retry-After"] = rule.arg or "1"
    return response


async def fault_bailian_code(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    return bailian_error(rule.arg or "InternalError")


async def fault_malformed_sse(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    call.decorate = False
    response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
    await response.prepare(call.request)
    for line in MALFORMED_SSE:
        await response.write(line)
    await response.write_eof()
    return response


async def fault_html(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    call.decorate = False
    return web.Response(status=200, text=HTML_PAGE, content_type="text/html")


async def fault_non_json(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    call.decorate = False
    return web.Response(status=502, text=NON_JSON_ERROR, content_type="text/plain")


async def fault_passthrough(call: Call, rule: FaultRule) -> web.StreamResponse | None:
    return None  # mid_stream_cut, big_body*, *_usage, ragged_sse: acted on by the answer writers


FaultAction = Callable[[Call, FaultRule], Awaitable[web.StreamResponse | None]]
FAULT_ACTIONS: dict[str, FaultAction] = {
    "status_500": fault_status,
    "status_502": fault_status,
    "status_503": fault_status,
    "throttle": fault_throttle,
    "bailian_code": fault_bailian_code,
    "retry_after": fault_retry_after,
    "reset": fault_reset,
    "hang": fault_hang,
    "slow_first_byte": fault_sleep_first,
    "mid_stream_cut": fault_passthrough,
    "malformed_sse": fault_malformed_sse,
    "html_200": fault_html,
    "non_json_error": fault_non_json,
    "latency": fault_sleep_first,
    "big_body": fault_passthrough,
    "big_body_chunked": fault_passthrough,
    "no_usage": fault_passthrough,
    "bad_usage": fault_passthrough,
    "ragged_sse": fault_passthrough,
}


async def apply_fault(call: Call) -> web.StreamResponse | None:
    rule = call.fault
    if rule is None:
        return None
    call.ctx.provider.fault_fired(rule.spec)
    if rule.kind not in COUNTED_KINDS:
        call.counts = False
    return await FAULT_ACTIONS[rule.kind](call, rule)


# -- checks -------------------------------------------------------------------------------
def check_body(call: Call) -> web.Response | None:
    if call.body_error is not None:
        return call.dialect.bad_request(call.body_error)
    return None


def check_auth(call: Call) -> web.Response | None:
    return call.dialect.auth_error(call.secret, call.account)


def check_model(call: Call) -> web.Response | None:
    model = call.model
    if model is None:
        return call.dialect.bad_request("The 'model' field is required.")
    return call.dialect.model_error(model)


def check_thinking(call: Call) -> web.Response | None:
    if call.body.get("enable_thinking") is True and call.body.get("stream") is not True:
        return call.dialect.thinking_error()
    return None


def check_messages(call: Call) -> web.Response | None:
    messages = call.body.get("messages")
    if not isinstance(messages, list) or not messages:
        return call.dialect.bad_request("The 'messages' field must be a non-empty list.")
    return None


def check_input(call: Call) -> web.Response | None:
    if embedding_inputs(call.body) is None:
        return call.dialect.bad_request("The 'input' field must be a string or a list of strings.")
    return None


def check_async_mode(call: Call) -> web.Response | None:
    if call.request.headers.get("X-ModelScope-Async-Mode", "").lower() != "true":
        return call.dialect.bad_request(
            "Synchronous image generation is not supported, "
            "please set the header X-ModelScope-Async-Mode: true."
        )
    return None


def check_concurrency(call: Call) -> web.Response | None:
    limit = call.dialect.concurrency_limit
    if limit is None or call.account is None:
        return None
    if call.ctx.provider.inflight_by_account[call.account.name] > limit:
        return call.dialect.throttle(call.model)
    return None


def check_quota(call: Call) -> web.Response | None:
    assert call.account is not None
    assert call.model is not None
    over = call.ctx.provider.over_quota(call.account, call.model)
    if over is not None:
        return call.dialect.quota_error(over, call.model)
    return None


CHAT_CHECKS: tuple[Check, ...] = (
    check_auth,
    check_body,
    check_model,
    check_messages,
    check_thinking,
    check_concurrency,
    check_quota,
)
EMBEDDING_CHECKS: tuple[Check, ...] = (
    check_auth,
    check_body,
    check_model,
    check_input,
    check_concurrency,
    check_quota,
)
IMAGE_CHECKS: tuple[Check, ...] = (
    check_auth,
    check_async_mode,
    check_body,
    check_model,
    check_concurrency,
    check_quota,
)


# -- answers ------------------------------------------------------------------------------
def with_usage_mode(call: Call, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its usage as a no_usage or bad_usage fault says."""
    mode = call.usage_mode
    if mode == "real" or "usage" not in payload:
        return payload
    payload = {k: v for k, v in payload.items() if k != "usage"}
    if mode == "bad":
        payload["usage"] = sse.BAD_USAGE
    return payload


async def send_json(call: Call, payload: dict[str, Any]) -> web.StreamResponse:
    payload = with_usage_mode(call, payload)
    if call.padding:
        return await send_padded(call, payload, call.padding)
    data = orjson.dumps(payload)
    if not call.cut:
        return web.Response(body=data, content_type="application/json")
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(data)
    await response.prepare(call.request)
    await response.write(data[: len(data) // 2])
    drop_connection(call.request)
    return response


async def send_padded(call: Call, payload: dict[str, Any], size: int) -> web.StreamResponse:
    """A big_body fault: the real answer with a ``padding`` field of ``size`` bytes."""
    data = orjson.dumps({**payload, "padding": "x" * size})
    assert call.fault is not None
    if call.fault.kind == "big_body":
        return web.Response(body=data, content_type="application/json")
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(call.request)
    try:
        for start in range(0, len(data), 64 * 1024):
            await response.write(data[start : start + 64 * 1024])
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client stopped reading: the point of the fault
    return response


#: Between the two halves of an event of a ragged_sse stream: they reach the client apart.
RAGGED_PAUSE_S = 0.005


def ragged(events: list[bytes]) -> list[bytes]:
    """A ragged_sse fault's writes: CRLF line ends, each event cut in two in its middle, and
    the last event without the blank line that ends it."""
    crlf = [event.replace(b"\n", b"\r\n") for event in events]
    crlf[-1] = crlf[-1].removesuffix(b"\r\n")
    return [half for event in crlf for half in (event[: len(event) // 2], event[len(event) // 2 :])]


async def send_events(call: Call, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await response.prepare(call.request)
    delay = call.ctx.state.config.stream_chunk_delay_ms / 1000
    if call.fault is not None and call.fault.kind == "ragged_sse":
        events, delay = ragged(events), max(delay, RAGGED_PAUSE_S)
    for i, event in enumerate(events):
        if call.cut and i == 2:
            drop_connection(call.request)
            return response
        if i and delay:
            await asyncio.sleep(delay)
        await response.write(event)
    await response.write_eof()
    return response


async def answer_chat(call: Call) -> web.StreamResponse:
    assert call.account is not None
    assert call.model is not None
    model = call.model
    content = sse.reply_text(call.ctx.name, call.account.name, model)
    reasoning = sse.reasoning_text(model) if sse.is_reasoning(model, call.body) else None
    created = int(call.ctx.state.now())
    prompt = sse.prompt_tokens(call.body)
    if call.body.get("stream") is not True:
        cid = sse.completion_id()
        payload = sse.chat_completion(cid, created, model, content, reasoning, prompt)
        return await send_json(call, payload)
    options = call.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    include_usage &= call.usage_mode != "none"
    n = call.ctx.state.config.stream_chunks
    events = sse.stream_events(
        model, created, content, reasoning, n, prompt, include_usage, call.usage_mode == "bad"
    )
    return await send_events(call, events)


def embedding_inputs(body: dict[str, Any]) -> list[str] | None:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


async def answer_embeddings(call: Call) -> web.StreamResponse:
    assert call.model is not None
    inputs = embedding_inputs(call.body) or []
    encoding = call.body.get("encoding_format")
    payload = sse.embeddings_body(call.model, inputs, encoding if isinstance(encoding, str) else "")
    return await send_json(call, payload)


async def answer_image(call: Call) -> web.StreamResponse:
    assert call.account is not None
    assert call.model is not None
    task = call.ctx.state.create_task(call.account.name, call.model)
    return await send_json(call, {"task_id": task.task_id, "request_id": request_id()})


async def answer_messages(call: Call) -> web.StreamResponse:
    """ModelScope's Anthropic-compatible endpoint: the same quota, Anthropic's shapes."""
    assert call.account is not None
    assert call.model is not None
    text = sse.reply_text(call.ctx.name, call.account.name, call.model)
    cache, scope = call.ctx.provider.prompt_cache, f"{call.account.name}\x00{call.model}"
    prompt = anthropic.prompt_usage(call.body, cache, scope)
    if call.body.get("stream") is not True:
        return await send_json(call, anthropic.message(call.model, text, prompt))
    n = call.ctx.state.config.stream_chunks
    events = anthropic.stream_events(call.model, text, prompt, n, call.usage_mode)
    return await send_events(call, events)


# -- the pipeline -------------------------------------------------------------------------
async def run_call(call: Call, checks: tuple[Check, ...], answer: Answer) -> web.StreamResponse:
    early = await apply_fault(call)
    if early is not None:
        return early
    latency = call.ctx.state.config.latency_ms
    if latency:
        await asyncio.sleep(latency / 1000)
    for check in checks:
        rejection = check(call)
        if rejection is not None:
            return rejection
    assert call.account is not None
    assert call.model is not None
    if call.counts:
        call.ctx.provider.record(call.account.name, call.model)
    return await answer(call)


async def chat_handler(request: web.Request) -> web.StreamResponse:
    return await run_call(await begin_call(request), CHAT_CHECKS, answer_chat)


async def embeddings_handler(request: web.Request) -> web.StreamResponse:
    return await run_call(await begin_call(request), EMBEDDING_CHECKS, answer_embeddings)


async def messages_handler(request: web.Request) -> web.StreamResponse:
    return await run_call(await begin_call(request), CHAT_CHECKS, answer_messages)


async def images_handler(request: web.Request) -> web.StreamResponse:
    return await run_call(await begin_call(request), IMAGE_CHECKS, answer_image)


async def task_handler(request: web.Request) -> web.StreamResponse:
    call = await begin_call(request, read=False)
    call.decorate = False
    rejection = check_auth(call)
    if rejection is not None:
        return rejection
    if request.headers.get("X-ModelScope-Task-Type", "") != "image_generation":
        return call.dialect.bad_request(
            "Please set the header X-ModelScope-Task-Type: image_generation."
        )
    task = call.ctx.state.tasks.get(request.match_info["task_id"])
    if task is None or call.account is None or task.account != call.account.name:
        return call.dialect.not_found("Task not found.")
    body = {
        "task_id": task.task_id,
        "task_status": "SUCCEED",
        "output_images": ["http://127.0.0.1/fake.png"],
        "request_id": request_id(),
    }
    return json_response(200, body)


async def models_handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    if ctx.name == "bailian":
        secret = bearer(request)
        rejection = ctx.dialect.auth_error(secret, ctx.provider.lookup(secret))
        if rejection is not None:
            return rejection
    data = [
        {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": ctx.dialect.owned_by(m)}
        for m in ctx.dialect.models
    ]
    return json_response(200, {"object": "list", "data": data})


# -- hooks --------------------------------------------------------------------------------
@web.middleware
async def track_inflight(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/_sim/"):
        return await handler(request)
    provider = request.app[CTX].provider
    account = provider.lookup(bearer(request))
    name = account.name if account is not None else None
    provider.enter(name)
    try:
        return await handler(request)
    finally:
        provider.leave(name)


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    call = request.get(CALL_KEY)
    if call is None:
        return
    if response.status >= 400:
        call.ctx.provider.reject(response.status)
    if call.decorate:
        call.dialect.decorate(response, call.ctx.provider, call.account, call.model)


async def on_shutdown(app: web.Application) -> None:
    app[CTX].closing.set()


# -- control API --------------------------------------------------------------------------
def control_error(message: str) -> web.Response:
    return json_response(400, {"error": message})


async def read_control(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    return orjson.loads(raw)


async def post_faults(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        data = await read_control(request)
        items = data if isinstance(data, list) else [data]
        rules = [parse_rule(item, ctx.name) for item in items]
    except (ValueError, TypeError, AttributeError) as exc:  # orjson errors are ValueErrors
        return control_error(str(exc))
    for rule in rules:
        ctx.faults.add(rule)
    return json_response(
        200,
        {"added": [r.to_dict() for r in rules], "pending": len(ctx.faults.pending(ctx.name))},
    )


async def get_faults(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    return json_response(200, {"faults": [r.to_dict() for r in ctx.faults.pending(ctx.name)]})


async def delete_faults(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    return json_response(200, {"cleared": ctx.faults.clear(ctx.name)})


async def get_stats(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    return json_response(200, ctx.state.stats(ctx.name))


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{key!r} must be an integer")
    return value


async def post_usage(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        data = await read_control(request)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        account = ctx.provider.find(str(data.get("token", "")))
        if account is None:
            raise ValueError(f"unknown token {data.get('token')!r}")
        used, model_used = _opt_int(data, "used"), _opt_int(data, "model_used")
        model = data.get("model")
        if model_used is not None and not isinstance(model, str):
            raise ValueError("'model_used' needs 'model'")
    except ValueError as exc:
        return control_error(str(exc))
    ctx.provider.set_usage(
        account.name, used, model if isinstance(model, str) else None, model_used
    )
    return json_response(200, ctx.state.stats(ctx.name)["by_token"][account.name])


async def post_reset(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    ctx.state.reset(ctx.name)
    ctx.faults.clear(ctx.name)
    return json_response(200, {"reset": ctx.name})


async def post_clock(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        data = await read_control(request)
        advance = data.get("advance", 0) if isinstance(data, dict) else None
        if not isinstance(advance, int | float) or isinstance(advance, bool):
            raise ValueError("expected {'advance': seconds}")
        if not math.isfinite(advance):
            raise ValueError("'advance' must be finite")
    except ValueError as exc:
        return control_error(str(exc))
    ctx.state.advance(float(advance))
    now = ctx.state.now()
    return json_response(200, {"now": now, "quota_day": ctx.state.quota_day().isoformat()})


def add_control_routes(app: web.Application) -> None:
    app.router.add_post("/_sim/faults", post_faults)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_delete("/_sim/faults", delete_faults)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_post("/_sim/usage", post_usage)
    app.router.add_post("/_sim/reset", post_reset)
    app.router.add_post("/_sim/clock", post_clock)


# -- factories ----------------------------------------------------------------------------
def _base_app(ctx: AppContext) -> web.Application:
    app = web.Application(middlewares=[track_inflight], client_max_size=16 * 1024 * 1024)
    app[CTX] = ctx
    app.on_response_prepare.append(on_prepare)
    app.on_shutdown.append(on_shutdown)
    add_control_routes(app)
    return app


def create_modelscope_app(state: SimState, faults: Faults) -> web.Application:
    """The ModelScope API-Inference stand-in (base path /v1)."""
    app = _base_app(AppContext(state, faults, ModelScopeDialect(state.config.modelscope)))
    app.router.add_get(f"{MODELSCOPE_BASE}/models", models_handler)
    app.router.add_post(f"{MODELSCOPE_BASE}/chat/completions", chat_handler)
    app.router.add_post(f"{MODELSCOPE_BASE}/embeddings", embeddings_handler)
    app.router.add_post(f"{MODELSCOPE_BASE}/images/generations", images_handler)
    app.router.add_post("/v1/messages", messages_handler)  # the Anthropic base is the root
    app.router.add_get(f"{MODELSCOPE_BASE}/tasks/{{task_id}}", task_handler)
    return app


def create_bailian_app(state: SimState, faults: Faults) -> web.Application:
    """The Bailian (DashScope OpenAI-compatible mode) stand-in (base /compatible-mode/v1)."""
    app = _base_app(AppContext(state, faults, BailianDialect(state.config.bailian)))
    app.router.add_get(f"{BAILIAN_BASE}/models", models_handler)
    app.router.add_post(f"{BAILIAN_BASE}/chat/completions", chat_handler)
    app.router.add_post(f"{BAILIAN_BASE}/embeddings", embeddings_handler)
    return app


def create_app(kind: Provider, state: SimState, faults: Faults) -> web.Application:
    if kind == "modelscope":
        return create_modelscope_app(state, faults)
    return create_bailian_app(state, faults)
