"""Shared fixtures: the gateway tests' settable clock and simulated upstreams; a private
redis-server and a fresh QuotaStore of each kind for the store tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from router.quota.memory_store import MemoryStore
from router.quota.redis_store import RedisStore
from router.quota.sqlite_store import SqliteStore
from router.quota.store import QuotaStore
from router.simulator import (
    BailianConfig,
    BailianKey,
    ModelScopeConfig,
    ModelScopeToken,
    Simulator,
    SimulatorConfig,
)
from tests.redis_server import LocalCluster, LocalSentinel, RedisServer

# -- the gateway tests: a clock both the gateway and the simulator read, the simulator ----------

MODEL = "Qwen/Qwen3-32B"
TOKENS = [("alice", "ms-test-alice"), ("bob", "ms-test-bob"), ("carol", "ms-test-carol")]


@dataclass
class GatewayClock:
    """A settable clock shared by the gateway (datetime) and the simulator (Unix seconds).

    Starts at 2026-11-29 06:00 UTC: 14:00 in Shanghai, ten hours to the quota reset."""

    now: datetime = field(default_factory=lambda: datetime(2026, 11, 29, 6, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def sim_config(limit: int, bailian_limit: int | None, **ms: Any) -> SimulatorConfig:
    """The simulator with TOKENS (``limit`` calls a day each) and Bailian's key "main"."""
    return SimulatorConfig(
        modelscope=ModelScopeConfig(
            tokens=[
                ModelScopeToken(secret=s, name=n, daily_limit=limit, model_daily_limit=limit)
                for n, s in TOKENS
            ],
            **ms,
        ),
        bailian=BailianConfig(
            keys=[BailianKey(secret="sk-test-bailian", name="main", daily_limit=bailian_limit)]
        ),
    )


@pytest.fixture
def gateway_clock() -> GatewayClock:
    return GatewayClock()


@pytest.fixture
async def sim(gateway_clock: GatewayClock) -> AsyncIterator[Simulator]:
    """Both simulated upstreams on loopback, on ``gateway_clock``: 2 calls a token, 2 on Bailian."""
    async with Simulator(sim_config(2, 2), clock=gateway_clock.seconds) as simulator:
        yield simulator


# -- the store tests ----------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 masters with a replica each, password-protected, once a session.

    Tests that kill a node restart it and wait until the cluster is whole again (see
    tests/test_redis_topologies.py), so the masters may have moved, never the service."""
    with LocalCluster(masters=3, replicas=1, node_timeout_ms=1000, password="cluster-pw") as c:
        yield c


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A master, a replica and 3 sentinels (quorum 2), once a session: the data nodes and the
    sentinels each with a password of their own."""
    with LocalSentinel(password="data-pw", sentinel_password="sentinel-pw") as s:
        yield s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster", "redis-sentinel"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[QuotaStore]:
    """A fresh, empty store on ``clock``: a tmp SQLite file, or a unique prefix on Redis (one
    server, a Cluster seeded by every node, or a Sentinel service)."""
    quota_store: QuotaStore
    prefix = f"test-{uuid.uuid4().hex}"
    if request.param == "memory":
        quota_store = MemoryStore(clock=clock)
    elif request.param == "sqlite":
        quota_store = SqliteStore(tmp_path / "quota.db", clock=clock)
    elif request.param == "redis-cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        quota_store = RedisStore(cluster.url(), prefix=prefix, clock=clock)
    elif request.param == "redis-sentinel":
        sentinel: LocalSentinel = request.getfixturevalue("redis_sentinel")
        quota_store = RedisStore(sentinel.url(), prefix=prefix, clock=clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        quota_store = RedisStore(server.url, prefix=prefix, clock=clock)
    yield quota_store
    await quota_store.aclose()
