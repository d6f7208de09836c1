"""Shared fixtures: a private redis-server and a fresh QuotaStore of each kind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore
from tests.redis_server import RedisServer

# 2099-12-30 02:00 UTC: far from any real date. Stores must never compare an injected time with
# their server's own clock (Redis TTLs are durations from the caller's now, SQLite purges by the
# newest day on record), so the suite passes whatever today's date is.
FIXED_NOW_MS = 4_102_279_200_000


class FakeClock:
    """A store's wall clock (Unix ms) that only moves when a test moves it."""

    def __init__(self, ms: int = FIXED_NOW_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[QuotaStore]:
    """A fresh, empty store on ``clock``: a tmp SQLite file, or a unique prefix on Redis."""
    quota_store: QuotaStore
    if request.param == "memory":
        quota_store = MemoryStore(clock=clock)
    elif request.param == "sqlite":
        quota_store = SqliteStore(tmp_path / "quota.db", clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        quota_store = RedisStore(server.url, prefix=f"test-{uuid.uuid4().hex}", clock=clock)
    yield quota_store
    await quota_store.aclose()
