"""Login leases: which daemon connects a bridge login (see
:class:`~bridge_kit.store.concerns.LoginLeaseStore`).

A lease is a handle: :attr:`LoginLease.held` says whether it still holds, and
:meth:`LoginLease.release` lets go. A store that one daemon works on (memory,
SQLite) grants every lease that this process does not hold already
(:class:`LocalLeases`); PostgreSQL takes a session advisory lock per login
(:mod:`bridge_kit.store.postgres_leases`).
"""

from __future__ import annotations

import abc

__all__ = ["LocalLeases", "LoginLease"]


class LoginLease(abc.ABC):
    """The right to connect one login, held by this process until released or lost."""

    def __init__(self, login_id: str) -> None:
        self.login_id = login_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.login_id!r}, held={self.held})"

    @property
    @abc.abstractmethod
    def held(self) -> bool:
        """False once released, or once the store found the lease lost (its database
        connection died: another daemon may hold it now)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Let go (nothing happens if it is not held any more)."""


class LocalLeases:
    """Leases of a store one process works on: granted unless held here already."""

    def __init__(self) -> None:
        self._held: dict[str, _LocalLease] = {}

    def take(self, login_id: str) -> LoginLease | None:
        if login_id in self._held:
            return None
        lease = self._held[login_id] = _LocalLease(self, login_id)
        return lease

    def holds(self, lease: _LocalLease) -> bool:
        return self._held.get(lease.login_id) is lease

    def drop(self, lease: _LocalLease) -> None:
        if self.holds(lease):
            del self._held[lease.login_id]

    def clear(self) -> None:
        """Every lease lets go (the store closed)."""
        self._held.clear()


class _LocalLease(LoginLease):
    def __init__(self, leases: LocalLeases, login_id: str) -> None:
        super().__init__(login_id)
        self._leases = leases

    @property
    def held(self) -> bool:
        return self._leases.holds(self)

    async def release(self) -> None:
        self._leases.drop(self)
