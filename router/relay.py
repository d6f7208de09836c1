"""The stream relay: an upstream's SSE answer passed to the client chunk by chunk as it arrives.
A stream that breaks after its first byte (the upstream cut it, or it ended without the
endpoint's done marker) ends with an SSE error event, never a clean ``[DONE]``; a stream cut at
the end of the shutdown grace says so. Time spent waiting on the client and on the upstream is
added to the request's trace, aborts to the metrics. Given a ``StreamUsage``, the chunks pass
through it: the stream's token usage is read on the way (and put on the trace however the
stream ends), and the usage chunk the gateway asked for on the client's behalf is taken out.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web

from router.calls import Trace
from router.errors import sse_error_event
from router.metrics import Metrics
from router.upstream import UpstreamReply
from router.usage import StreamUsage

log = logging.getLogger("router.relay")

#: The stream's last bytes kept to look for the done marker.
TAIL_BYTES = 64


async def relay_stream(
    request: web.Request,
    reply: UpstreamReply,
    headers: dict[str, str],
    done_marker: bytes,
    trace: Trace,
    metrics: Metrics,
    usage: StreamUsage | None = None,
    *,
    anthropic: bool = False,
) -> web.StreamResponse:
    """Pass chunks on as they arrive; a stream that breaks ends with an error event (in
    Anthropic's shape for ``anthropic``, /v1/messages)."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "text/event-stream"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    try:
        try:
            await response.prepare(request)
        except (ConnectionError, RuntimeError):
            # The client left before its first byte: an abort like any other, not the
            # "incomplete body" 400 (recorded as a 500) it ended as in the middleware.
            metrics.stream_aborts.labels("client").inc()
            return response
        await _pump(response, reply, done_marker, trace, metrics, usage, anthropic)
        return response
    except asyncio.CancelledError:
        # Cut at the end of the shutdown grace (router.serve): the client is told, like
        # for any broken stream, instead of a bare cut recorded as a 500.
        trace.status = response.status
        if response.prepared:
            event = sse_error_event(_SHUTTING_DOWN, code="shutting_down", anthropic=anthropic)
            await _end(response, event)
        raise
    finally:
        reply.close()
        if usage is not None:
            trace.usage = usage.result()


_SHUTTING_DOWN = "the gateway is shutting down: the stream was cut"


async def _pump(
    response: web.StreamResponse,
    reply: UpstreamReply,
    done_marker: bytes,
    trace: Trace,
    metrics: Metrics,
    usage: StreamUsage | None,
    anthropic: bool,
) -> None:
    """Write the first chunk and every next one; end the stream cleanly or with an error."""
    chunks = reply.response.content.iter_any()
    chunk = reply.first_chunk or b""
    tail = b""
    while True:
        if usage is not None:
            chunk = usage.feed(chunk)
        if chunk:
            if not await _write(response, chunk, trace, metrics):
                return
            tail = (tail + chunk)[-TAIL_BYTES:]
        waiting = time.monotonic()
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            broke = f"the upstream stream broke: {type(exc).__name__}"
            await _broken(response, metrics, broke, anthropic)
            return
        finally:
            trace.upstream_s += time.monotonic() - waiting
    rest = usage.flush() if usage is not None else b""
    if rest:
        if not await _write(response, rest, trace, metrics):
            return
        tail = (tail + rest)[-TAIL_BYTES:]
    if done_marker not in tail:
        ended = f"the upstream stream ended without {done_marker.decode()}"
        await _broken(response, metrics, ended, anthropic)
        return
    await response.write_eof()


async def _write(
    response: web.StreamResponse, chunk: bytes, trace: Trace, metrics: Metrics
) -> bool:
    """Pass ``chunk`` on; False when the client has gone (an abort)."""
    waiting = time.monotonic()
    try:
        await response.write(chunk)
    except (ConnectionError, RuntimeError):
        metrics.stream_aborts.labels("client").inc()
        return False
    finally:
        trace.client_s += time.monotonic() - waiting
    return True


async def _broken(
    response: web.StreamResponse, metrics: Metrics, message: str, anthropic: bool
) -> None:
    metrics.stream_aborts.labels("upstream").inc()
    log.warning("stream aborted: %s", message)
    await _end(response, sse_error_event(message, anthropic=anthropic))


async def _end(response: web.StreamResponse, event: bytes) -> None:
    """The stream's last event, then its end; the client may already be gone."""
    try:
        await response.write(event)
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
