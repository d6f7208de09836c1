"""router/ledger.py: usage reaches the store once per answer, through failures and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from router.ledger import Ledger
from router.quota.memory_store import MemoryStore
from router.quota.store import ForwardingStore, StoreError
from router.quota.types import UsageRecord

DAY = "20991230"


def record(total: int) -> UsageRecord:
    return UsageRecord(DAY, 0, "bob", "bailian", "main", "m", total, 0, total, 10 * total, 0)


class LostReplies(ForwardingStore):
    """Adds a batch, then fails as if its reply were lost, ``failures`` times."""

    def __init__(self, failures: int) -> None:
        super().__init__(MemoryStore())
        self.failures = failures
        self.tokens: list[str] = []

    async def record_usage(self, token: str, records: Sequence[UsageRecord]) -> None:
        self.tokens.append(token)
        await super().record_usage(token, records)
        if self.failures:
            self.failures -= 1
            raise StoreError("reply lost")


async def test_a_batch_whose_reply_was_lost_is_sent_again_and_counted_once() -> None:
    store = LostReplies(failures=2)
    ledger = Ledger(store, flush_seconds=0)
    writer = asyncio.create_task(ledger.run())
    try:
        ledger.add(record(5))
        ledger.add(record(7))
        await ledger.caught_up(within=10)
    finally:
        writer.cancel()
    assert len(store.tokens) == 3
    assert len(set(store.tokens)) == 1  # the same batch, the same token, three times
    [row] = await store.usage(DAY)
    assert (row.total, row.cost, row.answers) == (12, 120, 2)
    assert ledger.pending == 0


async def test_what_is_pending_is_written_at_shutdown() -> None:
    store = MemoryStore()
    ledger = Ledger(store, flush_seconds=60)  # the writer would wait a minute
    writer = asyncio.create_task(ledger.run())
    ledger.add(record(3))
    writer.cancel()  # shutdown: the writer goes, the flush writes
    await ledger.flush(within=5)
    [row] = await store.usage(DAY)
    assert (row.total, row.answers) == (3, 1)
    assert ledger.pending == 0


async def test_a_budget_check_does_not_wait_for_the_flush_delay() -> None:
    store = MemoryStore()
    ledger = Ledger(store, flush_seconds=60)
    writer = asyncio.create_task(ledger.run())
    try:
        ledger.add(record(4))
        await ledger.caught_up(within=10)  # at once, not after 60 s (the test's timeout is 60)
        [row] = await store.usage(DAY)
        assert row.total == 4
    finally:
        writer.cancel()
