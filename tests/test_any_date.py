"""The gateway counts exactly whatever today's date is, and whatever date its clock says.

Tests inject a clock into the gateway and the simulator, but Redis, SQLite and the file system
keep the machine's own. A store that compared the two (an expiry *instant* in Redis, a purge
cutoff from the machine's date) lost the counts as soon as the calendar moved past the test's
fixed date. These run the gateway on Redis with its clock years before and years after today.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import aiohttp
import pytest
from redis.asyncio import Redis

from router.app import create_app
from router.config import Settings
from router.demo import running
from router.pool import KeyPool
from router.quota.days import quota_day, to_ms
from router.quota.redis_store import RedisStore
from router.simulator import Simulator
from router.state import LEDGER
from tests.conftest import MODEL, TOKENS, GatewayClock, sim_config
from tests.redis_server import RedisServer
from tests.support import CLIENT_KEY, gateway_config
from tests.test_store import _eval_calls


@pytest.mark.parametrize(
    "now",
    [datetime(2001, 2, 3, 6, 0, tzinfo=UTC), datetime(2097, 6, 5, 6, 0, tzinfo=UTC)],
    ids=["years-before-today", "years-after-today"],
)
async def test_the_gateway_counts_every_call_once_with_one_round_trip_each(
    redis_server: RedisServer, now: datetime
) -> None:
    clock = GatewayClock(now)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with Simulator(sim_config(1000, None), clock=clock.seconds) as sim:
        config = gateway_config(
            sim.modelscope_url,
            sim.bailian_url,
            tokens=[(n, s, 1000) for n, s in TOKENS],
            model_daily_limit=1000,  # as the simulator's: its headers then never look lower
            store_url=redis_server.url,
            prefix=prefix,
        )
        settings = Settings.model_validate(config)
        store = RedisStore(redis_server.url, prefix=prefix)
        admin = Redis.from_url(redis_server.url, decode_responses=True)
        app = create_app(settings, clock=clock, store=store, fetch_catalog=False)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        provider = settings.providers[0]
        specs = KeyPool(settings).default_specs(provider)
        day = quota_day(clock(), settings.quota.tz, settings.quota.reset_time)

        async def counted() -> dict[str, int]:
            usages = await store.snapshot(provider.name, specs, day, to_ms(clock()))
            return {u.key: u.used for u in usages}

        try:
            async with running(app) as url, aiohttp.ClientSession() as http:

                async def ask() -> None:
                    async with http.post(
                        f"{url}/v1/chat/completions", json=body, headers=auth
                    ) as response:
                        assert response.status == 200, await response.text()

                async def batches() -> int:
                    await app[LEDGER].caught_up()
                    marks = admin.scan_iter(f"{{{prefix}}}:usage-batch:*")
                    return len([mark async for mark in marks])

                await ask()  # warm: the script loaded
                batches_before = await batches()
                before = await _eval_calls(admin)
                for _ in range(20):
                    await ask()
                # one reservation per request, and no settle: the upstream's remaining headers
                # never say less than the store counted; the answers' usage in batches of its
                # own (router.ledger), each marked once in Redis
                written = await batches() - batches_before
                assert 1 <= written <= 20
                assert await _eval_calls(admin) - before == 20 + written
                served = sim.state.stats("modelscope")["by_token"]
                simulated = {n: t["used"] for n, t in served.items()}  # type: ignore[attr-defined]
                assert await counted() == simulated
                assert sum(simulated.values()) == 21
            # stopped: nothing was counted ahead of a real call, nothing is given back
            assert sum((await counted()).values()) == 21
        finally:
            await admin.aclose()
            await store.aclose()
