"""A store that lives in a Python process and forgets everything on exit; for tests."""

from __future__ import annotations

from collections.abc import Iterable

from bridge_kit.errors import StoreError
from bridge_kit.store.base import Store


class MemoryStore(Store):
    """The :class:`Store` interface over a set and a dict.

    Nothing survives :meth:`close`; use it in tests and dry runs only.
    """

    def __init__(self) -> None:
        self._puppets: set[str] = set()
        # dicts keep insertion order, which is the order transactions were done in.
        self._transactions: dict[str, None] = {}
        self._open = False

    def __repr__(self) -> str:
        return "MemoryStore()"

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        self._puppets.clear()
        self._transactions.clear()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("memory store is not open")

    async def registered_among(self, user_ids: Iterable[str]) -> set[str]:
        self._check_open()
        return self._puppets.intersection(user_ids)

    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        self._check_open()
        self._puppets.update(user_ids)

    async def forget_registered(self, user_ids: Iterable[str] | None = None) -> None:
        self._check_open()
        if user_ids is None:
            self._puppets.clear()
        else:
            self._puppets.difference_update(user_ids)

    async def count_registered(self) -> int:
        self._check_open()
        return len(self._puppets)

    async def is_transaction_done(self, txn_id: str) -> bool:
        self._check_open()
        return txn_id in self._transactions

    async def mark_transaction_done(self, txn_id: str) -> None:
        self._check_open()
        self._transactions.setdefault(txn_id, None)

    async def prune_transactions(self, keep: int) -> int:
        self._check_open()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        excess = max(len(self._transactions) - keep, 0)
        for txn_id in list(self._transactions)[:excess]:
            del self._transactions[txn_id]
        return excess

    async def schema_version(self) -> int:
        self._check_open()
        return self.SCHEMA_VERSION
