"""Answers' tokens and cost, on their way to the quota store: one writer task, in batches.

A request adds its ``UsageRecord`` when its answer ends (``add``, no I/O) and goes on. The writer
sends everything added in the last ``FLUSH_DELAY_S`` (or since its last write) in one
``record_usage`` call. So usage costs the hot path no store round trip of its own (the
benchmark reports what it costs).

Exactness. A batch carries a token, and a store applies a token once: a batch whose reply was
lost is sent again, as it was, and never counts twice. While the store fails, the batch waits
(and new answers queue behind it, up to ``MAX_PENDING``) and is sent again with backoff.

Budgets. A reservation checked against a budget, a daily token limit or a tpm first waits
(``caught_up``) until this replica's answers that ended before it are in the store. So what one
replica overshoots a budget by is bounded by the calls in flight when the budget is reached
(each reserved while the budget still had room, and each costing what its answer costs);
another replica adds at most the answers of its last ``FLUSH_DELAY_S`` not yet written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from router.quota.store import QuotaStore, StoreError
from router.quota.types import UsageRecord

log = logging.getLogger("router.ledger")

# Answers gather this long before a write (usage.flush_seconds), unless a budget check is
# waiting (caught_up) or a batch is full: requests one at a time then cost one store round
# trip each (the reserve), not two. The batches the issue asks for; bench/ reports their cost.
FLUSH_DELAY_S = 0.2
MAX_BATCH = 1000
MAX_PENDING = 100_000  # answers waiting for the store; past this the oldest are dropped (logged)
BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # between attempts while the store fails
CAUGHT_UP_TIMEOUT_S = 2.0  # a budget check waits no longer for the writer (the store is slow)


class Ledger:
    """One app's usage writer (it outlives configuration reloads, as the store does)."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        flush_seconds: float = FLUSH_DELAY_S,
        token: Callable[[], str] | None = None,
    ) -> None:
        self._store = store
        self._flush_seconds = flush_seconds
        self._token = token or (lambda: uuid.uuid4().hex)
        self._pending: list[UsageRecord] = []
        # The batch being written, with its token: kept until the store took it, so a write
        # cut short (a failure, or the writer cancelled at shutdown) goes again as it was.
        self._batch: tuple[str, list[UsageRecord]] | None = None
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # write now: a budget check waits, or a batch is full
        self._added = 0  # records ever added
        self._written = 0  # records ever written (or dropped): the first ``_written`` are done
        self._progress = asyncio.Condition()
        self._failures = 0
        self.waiting = 0  # reservations waiting in caught_up now

    def __repr__(self) -> str:
        return f"Ledger(pending={len(self._pending)})"

    @property
    def pending(self) -> int:
        return self._added - self._written

    def add(self, record: UsageRecord) -> None:
        """Queue one answer's usage (no I/O)."""
        if len(self._pending) >= MAX_PENDING:
            dropped = self._pending.pop(0)
            self._written += 1
            log.error(
                "usage not recorded: the store has been failing and %d answers wait; dropped "
                "the oldest (%s on %s)",
                MAX_PENDING,
                dropped.model,
                dropped.provider,
            )
        self._pending.append(record)
        self._added += 1
        self._wake.set()
        if len(self._pending) >= MAX_BATCH:
            self._urgent.set()

    async def caught_up(self, within: float = CAUGHT_UP_TIMEOUT_S) -> None:
        """Wait until every answer added before now is in the store (at most ``within`` s:
        a store that does not answer is the reservation's own error to report)."""
        target = self._added
        if self._written >= target:
            return
        self.waiting += 1
        self._urgent.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within), self._progress:
                    await self._progress.wait_for(lambda: self._written >= target)
        finally:
            self.waiting -= 1

    async def run(self) -> None:
        """The writer: forever, each batch in one store call (cancelled at shutdown)."""
        while True:
            await self._wake.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), self._flush_seconds)
            self._urgent.clear()
            await self._write_once()

    async def _write_once(self) -> None:
        self._wake.clear()
        if self._batch is None:
            self._batch = (self._token(), self._pending)
            self._pending = []
        token, batch = self._batch
        while True:
            try:
                await self._store.record_usage(token, batch)
            except StoreError as exc:
                pause = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
                self._failures += 1
                log.warning(
                    "usage of %d answers not written yet (%s); again in %.1f s",
                    len(batch),
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)  # backoff (not synchronisation): the store is down
                continue
            self._failures = 0
            break
        self._batch = None
        async with self._progress:
            self._written += len(batch)
            self._progress.notify_all()

    async def flush(self, within: float) -> None:
        """Write what is pending (at shutdown), giving up after ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while self._pending or self._batch is not None:
                    await self._write_once()
        except TimeoutError:
            log.error("usage of %d answers could not be written at shutdown", self.pending)
