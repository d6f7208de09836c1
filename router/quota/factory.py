"""Open the QuotaStore a URL names."""

from __future__ import annotations

from router.quota.keys import DEFAULT_PREFIX
from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.resilient_store import ResilientStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore
from router.quota.urls import REDIS_SCHEMES, mask_url, split_scheme, store_url_problem


def open_store(
    url: str, *, prefix: str = DEFAULT_PREFIX, on_error: str = "fail_closed"
) -> QuotaStore:
    """A store for ``url``; ``prefix`` namespaces the Redis keys (other stores ignore it).

    Redis: one server (redis://, rediss://, unix://), a Cluster (redis+cluster://) or a
    Sentinel service (redis+sentinel://); see router.quota.urls for the forms.

    ``on_error`` (store.on_error) applies to Redis only: "fail_open" wraps it in a
    ResilientStore; the default "fail_closed" answers 503 while Redis is away.
    The schemes are router.quota.urls.STORE_SCHEMES, which the config checks too.
    """
    problem = store_url_problem(url)
    if problem is not None:
        raise ValueError(f"quota store URL {mask_url(url)}: {problem}")
    scheme, rest = split_scheme(url)
    if scheme in REDIS_SCHEMES:
        # redis-py wants its scheme in lower case.
        redis = RedisStore(f"{scheme}://{rest}", prefix=prefix)
        return ResilientStore(redis) if on_error == "fail_open" else redis
    if scheme == "sqlite":
        # sqlite:///relative.db -> "relative.db" (from the CWD); sqlite:////abs.db -> "/abs.db"
        return SqliteStore(rest[1:])
    if scheme == "memory":
        return MemoryStore()
    raise AssertionError(f"STORE_SCHEMES has {scheme!r}, which opens no store here")
