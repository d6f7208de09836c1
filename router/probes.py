"""The operational endpoints: ``/healthz`` (the process answers), ``/readyz`` (it can make a
reservation and is not draining) and ``/metrics`` (Prometheus text, quota gauges read from the
store first; behind ``metrics.token`` when one is set).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auth import matches, presented_key
from router.config import secret_digest
from router.errors import ShuttingDown, StoreUnavailable, Unauthorized
from router.quota.days import next_reset, quota_day, to_ms
from router.quota.store import StoreError, probe_reservation
from router.state import LIFECYCLE, LIVE, METRICS, STORE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return ShuttingDown("The gateway is shutting down.").to_response()
    runtime = request.app[LIVE].runtime
    quota = runtime.settings.quota
    now = runtime.clock()
    day = quota_day(now, quota.tz, quota.reset_time)
    day_end_ms = to_ms(next_reset(now, quota.tz, quota.reset_time))
    try:
        # Ready means a reservation can be made, not merely that the store answers a ping: a
        # read-only or full Redis answers PING and refuses every reservation.
        await probe_reservation(request.app[STORE], day, to_ms(now), day_end_ms)
    except StoreError:
        return StoreUnavailable("The quota store cannot make a reservation.").to_response()
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; quota gauges are read from the store first."""
    runtime = request.app[LIVE].runtime
    token = runtime.settings.metrics.token
    if token is not None:
        presented = presented_key(request.headers) or ""
        # Compared as digests, like client and admin keys (an invalid UTF-8 header made the
        # plain compare raise and /metrics answer 500: tests/test_fuzz.py).
        if not matches(presented, secret_digest(token.get_secret_value())):
            raise Unauthorized(
                "The metrics endpoint needs its token.", code="invalid_metrics_token"
            )
    await runtime.reporter.refresh()
    response = web.Response(body=generate_latest(request.app[METRICS].registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
