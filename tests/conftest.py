"""Shared fixtures: a private redis-server and a fresh QuotaStore of each kind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router.quota.factory import open_store
from router.quota.store import QuotaStore
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QuotaStore]:
    """A fresh, empty store: a tmp SQLite file, or a unique key prefix on the test Redis."""
    if request.param == "memory":
        quota_store = open_store("memory://")
    elif request.param == "sqlite":
        quota_store = open_store(f"sqlite:///{tmp_path / 'quota.db'}")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        quota_store = open_store(server.url, prefix=f"test-{uuid.uuid4().hex}")
    yield quota_store
    await quota_store.aclose()
