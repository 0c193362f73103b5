"""Login leases: which daemon connects a bridge login (see
:class:`~bridge_kit.store.concerns.LoginLeaseStore`).

A lease is a handle: :attr:`LoginLease.held` says whether it still holds, and
:meth:`LoginLease.release` lets go. A store that one daemon works on (memory,
SQLite) grants every lease that this process does not hold already
(:class:`LocalLeases`); PostgreSQL takes a session advisory lock per login
(:mod:`bridge_kit.store.postgres_leases`).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["LeaseKeeper", "LocalLeases", "LoginLease"]


class LeaseKeeper(Protocol):
    """What hands leases out (:class:`LocalLeases`, PostgreSQL's advisory locks)."""

    def holds(self, lease: LoginLease) -> bool:
        """Whether ``lease`` still holds."""

    async def release(self, lease: LoginLease) -> None:
        """Let ``lease`` go (nothing happens if it does not hold)."""


class LoginLease:
    """The right to connect one login, held by this process until released or lost."""

    def __init__(self, keeper: LeaseKeeper, login_id: str) -> None:
        self._keeper = keeper
        self.login_id = login_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.login_id!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """False once released, or once the store found the lease lost (its database
        connection died: another daemon may hold it now)."""
        return self._keeper.holds(self)

    async def release(self) -> None:
        """Let go (nothing happens if it is not held any more)."""
        await self._keeper.release(self)


class LocalLeases:
    """Leases of a store one process works on: granted unless held here already."""

    def __init__(self) -> None:
        self._held: dict[str, LoginLease] = {}

    def take(self, login_id: str) -> LoginLease | None:
        if login_id in self._held:
            return None
        lease = self._held[login_id] = LoginLease(self, login_id)
        return lease

    def holds(self, lease: LoginLease) -> bool:
        return self._held.get(lease.login_id) is lease

    async def release(self, lease: LoginLease) -> None:
        if self.holds(lease):
            del self._held[lease.login_id]

    def clear(self) -> None:
        """Every lease lets go (the store closed)."""
        self._held.clear()
