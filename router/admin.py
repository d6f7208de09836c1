"""The admin API under /admin: quota and client status, key actions, reload, its OpenAPI.

It has its own key (``admin: {key | key_sha256}``), sent as ``Authorization: Bearer`` or
``X-Api-Key``. Without an admin key in the config every /admin route answers 404. Everything
is read from and written to the quota store, so every replica sees an action at once.
Answers name keys, never their secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from router.auth import find_key, presented_key
from router.config import ConfigError, ProviderConfig, Settings, fingerprint
from router.errors import BadRequest, Forbidden, NotFound, StoreUnavailable, Unauthorized
from router.quota.days import quota_day, to_ms
from router.quota.store import StoreError
from router.runtime import Runtime
from router.status import Document, clients_document, key_view, quota_document

if TYPE_CHECKING:
    from router.app import Live

log = logging.getLogger("router.admin")

DEFAULT_DISABLE_REASON = "disabled by an administrator"
MAX_REASON_CHARS = 500

AdminHandler = Callable[[web.Request, Runtime], Awaitable[Document]]


def _live(request: web.Request) -> Live:
    from router.app import LIVE  # router.app imports this module: look the key up late

    return request.app[LIVE]


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
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")


def admin(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Check the admin key of the current configuration, then answer the handler's document."""

    async def wrapped(request: web.Request) -> web.Response:
        runtime = _live(request).runtime
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
        settings = await _live(request).reload()
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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ERRORS = {
    "401": _answer("The admin key is missing or wrong.", "Error"),
    "403": _answer("A client key was sent instead of the admin key.", "Error"),
    "404": _answer("The admin API is disabled (no admin key configured).", "Error"),
}
_STORE_DOWN = {"503": _answer("The quota store cannot be reached.", "Error")}
_KEY_PARAMS = [
    {
        "name": "provider",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "A provider name from the config.",
    },
    {
        "name": "key",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "A key name of that provider (never its secret).",
    },
]
_NOT_FOUND = {"404": _answer("Unknown provider or key, or the admin API is disabled.", "Error")}


def _key_action(summary: str, description: str, body: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "parameters": _KEY_PARAMS,
        "responses": {
            "200": _answer("The key's state after the action.", "KeyAction"),
            **_ERRORS,
            **_NOT_FOUND,
            **_STORE_DOWN,
        },
    }
    if body:
        operation["requestBody"] = {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"reason": {"type": "string", "maxLength": MAX_REASON_CHARS}},
                        "additionalProperties": False,
                    }
                }
            },
        }
        operation["responses"]["400"] = _answer("The body is not valid.", "Error")
    return operation


_NULLABLE_INT = {"type": ["integer", "null"], "minimum": 0}
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Moment": {
        "type": "object",
        "required": ["iso", "unix"],
        "properties": {
            "iso": {"type": "string", "format": "date-time", "description": "in quota.timezone"},
            "unix": {"type": "number", "description": "Unix time in seconds"},
        },
    },
    "Reset": {
        "allOf": [
            _ref("Moment"),
            {
                "type": "object",
                "required": ["in_seconds"],
                "properties": {"in_seconds": {"type": "integer", "minimum": 0}},
            },
        ]
    },
    "State": {"type": "string", "enum": ["available", "exhausted", "cooling", "disabled"]},
    "ModelQuota": {
        "type": "object",
        "required": ["model", "used", "limit", "remaining", "state", "until"],
        "properties": {
            "model": {"type": "string", "description": "the upstream model name"},
            "used": {"type": "integer", "minimum": 0},
            "limit": _NULLABLE_INT,
            "remaining": _NULLABLE_INT,
            "state": _ref("State"),
            "until": {"oneOf": [_ref("Moment"), {"type": "null"}], "description": "cooling"},
        },
    },
    "KeyQuota": {
        "type": "object",
        "required": ["name", "used", "limit", "remaining", "state", "reason", "until", "models"],
        "properties": {
            "name": {"type": "string"},
            "used": {"type": "integer", "minimum": 0},
            "limit": _NULLABLE_INT,
            "remaining": _NULLABLE_INT,
            "state": _ref("State"),
            "reason": {"type": ["string", "null"], "description": "disabled or exhausted"},
            "until": {"oneOf": [_ref("Moment"), {"type": "null"}], "description": "cooling"},
            "models": {"type": "array", "items": _ref("ModelQuota")},
        },
    },
    "ProviderQuota": {
        "type": "object",
        "required": ["name", "type", "paid", "strategy", "used", "limit", "remaining", "keys"],
        "properties": {
            "name": {"type": "string"},
            "type": {"type": "string"},
            "paid": {"type": "boolean"},
            "strategy": {"type": "string"},
            "used": {"type": "integer", "minimum": 0},
            "limit": _NULLABLE_INT,
            "remaining": {
                **_NULLABLE_INT,
                "description": "calls left on keys that are available or cooling",
            },
            "keys": {"type": "array", "items": _ref("KeyQuota")},
        },
    },
    "Quota": {
        "type": "object",
        "required": ["day", "timezone", "now", "next_reset", "providers"],
        "properties": {
            "day": {"type": "string", "format": "date", "description": "the quota day"},
            "timezone": {"type": "string"},
            "now": _ref("Moment"),
            "next_reset": _ref("Reset"),
            "providers": {"type": "array", "items": _ref("ProviderQuota")},
        },
    },
    "ClientDay": {
        "type": "object",
        "required": ["used", "free_used", "remaining", "fair_share"],
        "properties": {
            "used": {"type": "integer", "minimum": 0},
            "free_used": {"type": "integer", "minimum": 0},
            "remaining": {**_NULLABLE_INT, "description": "of the client's daily_limit"},
            "fair_share": {
                "type": "array",
                "description": "per free provider once its pool is shared out",
                "items": {
                    "type": "object",
                    "required": ["provider", "share", "used", "remaining"],
                    "properties": {
                        "provider": {"type": "string"},
                        "share": {"type": "integer"},
                        "used": {"type": "integer"},
                        "remaining": {"type": "integer"},
                    },
                },
            },
        },
    },
    "Client": {
        "type": "object",
        "required": ["name", "daily_limit", "share", "models", "fallback", "today", "yesterday"],
        "properties": {
            "name": {"type": "string"},
            "daily_limit": _NULLABLE_INT,
            "share": {"type": "number", "description": "weight in the fair share"},
            "models": {"type": ["array", "null"], "items": {"type": "string"}},
            "fallback": {"type": "boolean"},
            "today": _ref("ClientDay"),
            "yesterday": _ref("ClientDay"),
        },
    },
    "Clients": {
        "type": "object",
        "required": ["day", "yesterday", "timezone", "now", "next_reset", "open", "clients"],
        "properties": {
            "day": {"type": "string", "format": "date"},
            "yesterday": {"type": "string", "format": "date"},
            "timezone": {"type": "string"},
            "now": _ref("Moment"),
            "next_reset": _ref("Reset"),
            "open": {
                "type": "boolean",
                "description": "no clients configured: anyone may call, nobody is counted",
            },
            "fair_share": {"type": "object"},
            "clients": {"type": "array", "items": _ref("Client")},
        },
    },
    "KeyAction": {
        "type": "object",
        "required": ["status", "provider", "key"],
        "properties": {
            "status": {"type": "string", "enum": ["disabled", "enabled", "reset"]},
            "provider": {"type": "string"},
            "key": _ref("KeyQuota"),
            "changed": {"type": "boolean", "description": "disable: it was not disabled before"},
        },
    },
    "Reloaded": {
        "type": "object",
        "required": ["status", "providers", "keys", "clients"],
        "properties": {
            "status": {"const": "reloaded"},
            "providers": {"type": "integer"},
            "keys": {"type": "integer"},
            "clients": {"type": "integer"},
        },
    },
}


def openapi_document() -> Document:
    """The OpenAPI 3.1 description of the admin API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "modelscope-router admin API",
            "version": "1",
            "description": (
                "Quota and client status, key actions and live reload. Reads and writes go "
                "to the shared quota store: every replica sees them at once. Secrets never "
                "appear in an answer."
            ),
        },
        "security": [{"adminKey": []}, {"adminApiKey": []}],
        "paths": {
            "/admin/quota": {
                "get": {
                    "summary": "Usage, limits and state of every key and (key, model) today",
                    "responses": {
                        "200": _answer("The quota day.", "Quota"),
                        **_ERRORS,
                        **_STORE_DOWN,
                    },
                }
            },
            "/admin/clients": {
                "get": {
                    "summary": "Usage of every client today and yesterday",
                    "responses": {
                        "200": _answer("The clients.", "Clients"),
                        **_ERRORS,
                        **_STORE_DOWN,
                    },
                }
            },
            "/admin/keys/{provider}/{key}/disable": {
                "post": _key_action(
                    "Disable a key on every replica",
                    "The key serves nothing until enabled, or until its secret changes.",
                    body=True,
                )
            },
            "/admin/keys/{provider}/{key}/enable": {
                "post": _key_action("Enable a disabled key", "Forget that the key was disabled.")
            },
            "/admin/keys/{provider}/{key}/reset": {
                "post": _key_action(
                    "Clear a key's counters of today",
                    "Forget today's counts, exhaustion and cooldowns of the key (e.g. after "
                    "buying more quota).",
                )
            },
            "/admin/reload": {
                "post": {
                    "summary": "Load the config file again",
                    "description": (
                        "Requests in flight finish on the old configuration; today's counts "
                        "stay. 'server' and 'store' changes need a restart. SIGHUP does the same."
                    ),
                    "responses": {
                        "200": _answer("The new configuration serves.", "Reloaded"),
                        "400": _answer("The new config is invalid; the old one stays.", "Error"),
                        **_ERRORS,
                    },
                }
            },
            "/admin/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_ERRORS,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <admin.key>",
                },
                "adminApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
            "schemas": _SCHEMAS,
        },
    }
