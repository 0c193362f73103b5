"""Limits of the stores: statement timeouts, file modes (issue 10, defects 11 and 13)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from bridge_kit.errors import StoreError
from bridge_kit.store import PostgresStore
from tests.test_store import emptied


@pytest.fixture
async def quick_store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(await emptied(postgres_dsn), command_timeout=0.5)
    async with store:
        yield store


@contextlib.asynccontextmanager
async def locked(dsn: str, table: str) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``table`` from another connection."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


@pytest.mark.parametrize("table", ["bridge_kit_puppets", "bridge_kit_transactions"])
async def test_a_blocked_statement_times_out_as_a_store_error(
    quick_store: PostgresStore, postgres_dsn: str, table: str
) -> None:
    async with locked(postgres_dsn, table):
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"no answer within 0\.5 s") as excinfo:
            # wait_for: without the timeout this would hang; fail instead.
            if table == "bridge_kit_puppets":
                await asyncio.wait_for(quick_store.mark_registered(["@a:test.local"]), 10)
            else:
                await asyncio.wait_for(quick_store.accept_transaction("t1", []), 10)
        assert time.monotonic() - started < 5
        assert "\n" not in str(excinfo.value)
    # Once the lock is gone, the store works again.
    await quick_store.mark_registered(["@a:test.local"])
    assert await quick_store.accept_transaction("t1", [])
