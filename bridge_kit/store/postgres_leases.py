"""Login leases on PostgreSQL: a session advisory lock per login, all on one
connection of their own (one session holds any number of them).

PostgreSQL frees the locks itself when that connection ends, so a daemon that dies
lets go of its logins. A connection that drops while the daemon lives loses them
too; :meth:`PostgresLeases.check` notices (or the next statement on it fails), and
the leases read as not held from then on.

The locks use the two-``int4`` form of the advisory lock functions, a key space
apart from the one-``bigint`` keys of the crypto and migration locks, so a login's
lease never collides with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from bridge_kit.errors import StoreError
from bridge_kit.store.login_leases import LoginLease

__all__ = ["PostgresLeases", "login_lease_key"]

log = logging.getLogger(__name__)


def login_lease_key(login_id: str) -> tuple[int, int]:
    """The advisory lock key of one login's lease: two signed 32-bit numbers."""
    digest = hashlib.blake2b(
        login_id.encode("utf-8", "surrogatepass"), digest_size=8, person=b"bk-login-lease"
    ).digest()
    return (
        int.from_bytes(digest[:4], "big", signed=True),
        int.from_bytes(digest[4:], "big", signed=True),
    )


class PostgresLeases:
    """The login leases of one store, on a connection opened at the first lease."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        errors: Callable[[], contextlib.AbstractContextManager[None]],
        check_timeout: float,
    ) -> None:
        """``connect()`` opens a connection; ``errors()`` turns the driver's errors
        into :class:`~bridge_kit.errors.StoreError`."""
        self._connect = connect
        self._errors = errors
        self._check_timeout = check_timeout
        self._conn: Any = None
        self._held: dict[str, LoginLease] = {}
        self._lock = asyncio.Lock()

    def holds(self, lease: LoginLease) -> bool:
        return self._held.get(lease.login_id) is lease

    async def take(self, login_id: str) -> LoginLease | None:
        async with self._lock:
            if login_id in self._held:
                return None  # session locks nest: PostgreSQL would grant it twice
            with self._losing_on_failure():
                if self._conn is None:
                    self._conn = await self._connect()
                taken = await self._conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", *login_lease_key(login_id)
                )
            if not taken:
                return None
            lease = self._held[login_id] = LoginLease(self, login_id)
            return lease

    async def release(self, lease: LoginLease) -> None:
        async with self._lock:
            if not self.holds(lease):
                return
            del self._held[lease.login_id]
            # A broken connection has let go already (and is dropped with its leases).
            with contextlib.suppress(StoreError), self._losing_on_failure():
                await self._conn.fetchval(
                    "SELECT pg_advisory_unlock($1, $2)", *login_lease_key(lease.login_id)
                )

    async def check(self) -> None:
        """Ask the leases' connection whether it is alive; a dead one loses them all."""
        async with self._lock:
            if self._conn is None:
                return
            try:
                with self._errors():
                    await self._conn.fetchval("SELECT 1", timeout=self._check_timeout)
            except Exception as exc:
                log.warning("the login leases' connection failed; they are lost: %s", exc)
                await self._lose_all()

    async def close(self) -> None:
        """Let go of every lease (closing the connection frees its locks)."""
        async with self._lock:
            await self._lose_all()

    @contextlib.contextmanager
    def _losing_on_failure(self) -> Iterator[None]:
        try:
            with self._errors():
                yield
        except BaseException:
            # Whatever broke the statement (an error, a cancellation mid-statement)
            # leaves the session's locks unknown: drop them all, close the session.
            self._held.clear()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            raise

    async def _lose_all(self) -> None:
        self._held.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self._check_timeout)
            except Exception:
                conn.terminate()
