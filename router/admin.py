"""The admin API under /admin: quota and client status, key actions, reload, its OpenAPI
document (data: admin_openapi.yaml).

It has its own key (``admin: {key | key_sha256}``), sent as ``Authorization: Bearer`` or
``X-Api-Key``. Without an admin key in the config every /admin route answers 404. Everything
is read from and written to the quota store, so every replica sees an action at once.
Answers name keys, never their secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import orjson
import yaml
from aiohttp import web

from router.auth import find_key, presented_key
from router.config import ConfigError, ProviderConfig, Settings, fingerprint
from router.errors import BadRequest, Forbidden, NotFound, StoreUnavailable, Unauthorized
from router.quota.days import parse_day, quota_day, to_ms
from router.quota.store import StoreError
from router.runtime import Runtime
from router.state import LIVE
from router.status import (
    Document,
    clients_document,
    key_view,
    quota_document,
    usage_document,
)

log = logging.getLogger("router.admin")

DEFAULT_DISABLE_REASON = "disabled by an administrator"
MAX_REASON_CHARS = 500  # admin_openapi.yaml says so too (maxLength of "reason")
OPENAPI_FILE = "admin_openapi.yaml"

AdminHandler = Callable[[web.Request, Runtime], Awaitable[Document]]


def authorize(headers: Mapping[str, str], settings: Settings) -> None:
    """Raise unless ``headers`` carry the admin key; 404 when the admin API is off.

    Keys are compared as SHA-256 digests with ``hmac.compare_digest``; every client key is
    compared too (a client key is refused with 403, any other key with 401).
    """
    expected = settings.admin.key_digest()
    if expected is None:
        raise NotFound("The admin API is disabled: set 'admin.key' in the config.")
    key = presented_key(headers)
    if key is None:
        raise Unauthorized(
            "Missing admin key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.",
            code="missing_api_key",
        )
    role = find_key(
        key, [(expected, "admin"), *((c.key_digest(), "client") for c in settings.clients)]
    )
    if role == "admin":
        return
    if role == "client":
        raise Forbidden("A client key cannot use the admin API.", code="admin_key_required")
    raise Unauthorized("Invalid admin key.", code="invalid_api_key")


def _json(document: Document, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},  # live figures (the web page reads them)
    )


def admin(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Check the admin key of the current configuration, then answer the handler's document."""

    async def wrapped(request: web.Request) -> web.Response:
        runtime = request.app[LIVE].runtime
        authorize(request.headers, runtime.settings)
        try:
            document = await handler(request, runtime)
        except StoreError as exc:
            log.warning(
                "admin %s %s: quota store unreachable: %s", request.method, request.path, exc
            )
            raise StoreUnavailable("The quota store is unreachable.") from None
        return _json(document)

    return wrapped


# -- handlers ----------------------------------------------------------------------------------


async def get_quota(request: web.Request, runtime: Runtime) -> Document:
    return await quota_document(runtime.settings, runtime.store, runtime.pool, runtime.clock())


async def get_clients(request: web.Request, runtime: Runtime) -> Document:
    return await clients_document(runtime.settings, runtime.store, runtime.clock())


async def get_usage(request: web.Request, runtime: Runtime) -> Document:
    day = request.query.get("day")
    if day is not None and parse_day(day) is None:
        raise BadRequest("'day' must be a date written YYYYMMDD, such as 20261129.", param="day")
    return await usage_document(runtime.settings, runtime.store, runtime.clock(), day)


def _target(request: web.Request, runtime: Runtime) -> tuple[ProviderConfig, str]:
    name, key = request.match_info["provider"], request.match_info["key"]
    try:
        provider = runtime.settings.provider(name)
    except KeyError:
        raise NotFound(
            f"No provider {name!r} in the configuration.", code="provider_not_found"
        ) from None
    if key not in {k.name for k in provider.keys}:
        raise NotFound(f"Provider {name!r} has no key {key!r}.", code="key_not_found")
    return provider, key


async def _reason(request: web.Request) -> str:
    """The optional ``{"reason": "..."}`` body of a disable."""
    raw = await request.read()
    if not raw.strip():
        return DEFAULT_DISABLE_REASON
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest('The body must be a JSON object such as {"reason": "..."}.')
    reason = body.get("reason", DEFAULT_DISABLE_REASON)
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest("'reason' must be a non-empty string.", param="reason")
    if len(reason) > MAX_REASON_CHARS:
        raise BadRequest(f"'reason' is longer than {MAX_REASON_CHARS} characters.", param="reason")
    return reason.strip()


async def _key_document(
    runtime: Runtime, provider: ProviderConfig, key: str, action: str, **extra: Any
) -> Document:
    """The key's state after an action, read back from the store."""
    now = runtime.clock()
    quota = runtime.settings.quota
    day = quota_day(now, quota.tz, quota.reset_time)
    specs = tuple(s for s in runtime.pool.default_specs(provider) if s.name == key)
    usages = await runtime.store.snapshot(
        provider.name, specs, day, to_ms(now), provider.model_limits
    )
    return {
        "status": action,
        "provider": provider.name,
        "key": key_view(provider, usages[0], quota.tz),
        **extra,
    }


async def disable_key(request: web.Request, runtime: Runtime) -> Document:
    provider, key = _target(request, runtime)
    reason = await _reason(request)
    secret = runtime.pool.secret(provider.name, key)
    changed = await runtime.store.disable(provider.name, key, fingerprint(secret), reason)
    log.warning("admin: key %s/%s disabled: %s", provider.name, key, reason)
    return await _key_document(runtime, provider, key, "disabled", changed=changed)


async def enable_key(request: web.Request, runtime: Runtime) -> Document:
    provider, key = _target(request, runtime)
    await runtime.store.enable(provider.name, key)
    log.warning("admin: key %s/%s enabled", provider.name, key)
    return await _key_document(runtime, provider, key, "enabled")


async def reset_key(request: web.Request, runtime: Runtime) -> Document:
    provider, key = _target(request, runtime)
    quota = runtime.settings.quota
    day = quota_day(runtime.clock(), quota.tz, quota.reset_time)
    await runtime.store.reset_key(provider.name, key, day)
    log.warning("admin: key %s/%s reset for quota day %s", provider.name, key, day)
    return await _key_document(runtime, provider, key, "reset")


async def reload_config(request: web.Request, runtime: Runtime) -> Document:
    try:
        settings = await request.app[LIVE].reload()
    except ConfigError as exc:
        log.error("admin reload refused, the old configuration stays: %s", exc)
        raise BadRequest(
            f"The configuration was not reloaded, the old one stays: {exc}",
            code="invalid_config",
        ) from None
    return {
        "status": "reloaded",
        "providers": len(settings.providers),
        "keys": sum(len(p.keys) for p in settings.providers),
        "clients": len(settings.clients),
    }


async def get_openapi(request: web.Request, runtime: Runtime) -> Document:
    return openapi_document()


ROUTES: tuple[tuple[str, str, AdminHandler], ...] = (
    ("GET", "/admin/quota", get_quota),
    ("GET", "/admin/clients", get_clients),
    ("GET", "/admin/usage", get_usage),
    ("POST", "/admin/keys/{provider}/{key}/disable", disable_key),
    ("POST", "/admin/keys/{provider}/{key}/enable", enable_key),
    ("POST", "/admin/keys/{provider}/{key}/reset", reset_key),
    ("POST", "/admin/reload", reload_config),
    ("GET", "/admin/openapi.json", get_openapi),
)


def add_admin_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, admin(handler))


# -- the OpenAPI document (the test suite checks it against the routes above) -----------------


def openapi_document() -> Document:
    """The OpenAPI 3.1 description of the admin API, kept as data in admin_openapi.yaml."""
    text = resources.files("router").joinpath(OPENAPI_FILE).read_text(encoding="utf-8")
    document: Document = yaml.safe_load(text)
    return document
