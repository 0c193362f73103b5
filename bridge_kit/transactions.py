"""Transactions the homeserver pushes: processed once, with dedup that survives restarts.

:class:`TransactionProcessor` runs each new transaction through a handler and
records its txnId in the store only after the handler returned, so a failure
is retried by the homeserver and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bridge_kit import defaults
from bridge_kit.errors import TransactionFailed
from bridge_kit.metrics import Metrics
from bridge_kit.store.base import Store
from bridge_kit.types import Transaction

__all__ = ["TransactionHandler", "TransactionProcessor"]

log = logging.getLogger(__name__)

TransactionHandler = Callable[[Transaction], Awaitable[None]]


class TransactionProcessor:
    """Runs transactions through a handler exactly once, with dedup in the store.

    A txnId already done is not processed again. A duplicate that arrives while
    the first copy is in flight waits for it and shares its outcome. A
    transaction is marked done only after its handler returned, so a failure
    is retried by the homeserver and nothing is lost. Every ``prune_every``
    successful transactions (and on the first one after start) the store's
    dedup records are pruned to ``prune_keep``, in the background.
    """

    def __init__(
        self,
        store: Store,
        handler: TransactionHandler,
        *,
        metrics: Metrics | None = None,
        prune_every: int = defaults.DEDUP_PRUNE_EVERY,
        prune_keep: int = defaults.DEDUP_KEEP,
    ) -> None:
        if prune_every < 1 or prune_keep < 0:
            raise ValueError("prune_every must be >= 1 and prune_keep >= 0")
        self._store = store
        self._handler = handler
        self._metrics = metrics
        self._prune_every = prune_every
        self._prune_keep = prune_keep
        self._in_flight: dict[str, asyncio.Future[bool]] = {}
        self._waiting = 0
        self._since_prune = prune_every - 1
        self._prune_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """How many transactions are being processed right now."""
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        """How many duplicates are waiting for the first copy of their transaction."""
        return self._waiting

    async def process(self, txn_id: str, transaction: Transaction) -> bool:
        """Process ``transaction`` unless ``txn_id`` is done; True if it was processed now.

        Raises :class:`TransactionFailed` if the handler (or the dedup record) failed,
        also for a duplicate that waited on a failing first copy.
        """
        pending = self._in_flight.get(txn_id)
        if pending is not None:
            self._waiting += 1
            try:
                # shield: a cancelled waiter must not cancel the outcome the others share.
                succeeded = await asyncio.shield(pending)
            finally:
                self._waiting -= 1
            if not succeeded:
                raise TransactionFailed(txn_id)
            self._count_duplicate()
            return False
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._in_flight[txn_id] = outcome
        succeeded = False
        try:
            if await self._store.is_transaction_done(txn_id):
                succeeded = True
                self._count_duplicate()
                return False
            await self._run(txn_id, transaction)
            succeeded = True
            return True
        finally:
            del self._in_flight[txn_id]
            outcome.set_result(succeeded)

    async def _run(self, txn_id: str, transaction: Transaction) -> None:
        started = time.perf_counter()
        try:
            await self._handler(transaction)
            await self._store.mark_transaction_done(txn_id)
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.count_handler_failure()
            event_ids = [event.event_id for event in transaction.events]
            log.exception(
                "transaction %s failed (not acknowledged, the homeserver will retry); events: %s",
                txn_id,
                event_ids,
            )
            raise TransactionFailed(txn_id) from exc
        if self._metrics is not None:
            self._metrics.count_transaction(len(transaction.events), time.perf_counter() - started)
        self._maybe_prune()

    def _count_duplicate(self) -> None:
        if self._metrics is not None:
            self._metrics.count_duplicate()

    def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune < self._prune_every:
            return
        if self._prune_task is not None and not self._prune_task.done():
            return
        self._since_prune = 0
        self._prune_task = asyncio.create_task(self._prune())

    async def _prune(self) -> None:
        try:
            removed = await self._store.prune_transactions(self._prune_keep)
        except Exception:
            log.exception("pruning transaction dedup records failed; will try again later")
            return
        log.debug("pruned %d transaction dedup records", removed)

    async def wait_idle(self) -> None:
        """Wait for a background prune, if one runs (for shutdown and tests)."""
        if self._prune_task is not None:
            await self._prune_task
