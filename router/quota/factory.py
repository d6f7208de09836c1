"""Open the QuotaStore a URL names."""

from __future__ import annotations

from router.quota.keys import DEFAULT_PREFIX
from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.resilient_store import ResilientStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore

_SCHEMES = "redis://, rediss://, unix://, sqlite:///relative.db, sqlite:////abs/path.db, memory://"


def open_store(
    url: str, *, prefix: str = DEFAULT_PREFIX, on_error: str = "fail_closed"
) -> QuotaStore:
    """A store for ``url``; ``prefix`` namespaces the Redis keys (other stores ignore it).

    ``on_error`` (store.on_error) applies to Redis only: "fail_open" wraps it in a
    ResilientStore; the default "fail_closed" answers 503 while Redis is away.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"quota store URL has no scheme; expected one of: {_SCHEMES}")
    if scheme in ("redis", "rediss", "unix"):
        redis = RedisStore(url, prefix=prefix)
        return ResilientStore(redis) if on_error == "fail_open" else redis
    if scheme == "sqlite":
        # sqlite:///relative.db -> "relative.db" (from the CWD); sqlite:////abs.db -> "/abs.db"
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                "sqlite store URL must be sqlite:///relative.db or sqlite:////abs/path.db"
            )
        return SqliteStore(rest[1:])
    if scheme == "memory":
        return MemoryStore()
    raise ValueError(f"unknown quota store scheme {scheme!r}; expected one of: {_SCHEMES}")
