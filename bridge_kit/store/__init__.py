"""Where bridge_kit remembers registered puppets and processed transactions.

Pick a backend by URL with :func:`open_store`::

    async with open_store("sqlite:///bridge_kit.db") as store:
        await store.mark_registered(["@_bk_alice:example.org"])
"""

from __future__ import annotations

from bridge_kit.errors import StoreError
from bridge_kit.store.base import Store
from bridge_kit.store.memory import MemoryStore
from bridge_kit.store.postgres import PostgresStore, redact_dsn
from bridge_kit.store.sqlite import SQLiteStore

__all__ = ["MemoryStore", "PostgresStore", "SQLiteStore", "Store", "open_store"]

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str) -> Store:
    """The store a URL names, not yet opened (use ``async with`` or ``await store.open()``).

    - ``memory://``: in this process only, for tests;
    - ``sqlite:///relative/path.db`` (from the current directory) or ``sqlite:////abs/path.db``;
    - ``postgresql://user@host:port/dbname`` (or ``postgres://``).

    Raises :class:`~bridge_kit.errors.StoreError` for any other URL.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _unsupported(url, "it has no scheme")
    if scheme == "memory":
        if rest:
            raise _unsupported(url, "memory:// takes no path")
        return MemoryStore()
    if scheme == "sqlite":
        return SQLiteStore(_sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    raise _unsupported(url, f"unknown scheme {scheme!r}")


def _sqlite_path(url: str) -> str:
    if not url.lower().startswith(_SQLITE_PREFIX):
        raise _unsupported(url, "a SQLite URL has three slashes before the path (sqlite:///x.db)")
    path = url[len(_SQLITE_PREFIX) :]
    if not path:
        raise _unsupported(url, "the SQLite path is empty")
    return path


def _unsupported(url: str, reason: str) -> StoreError:
    return StoreError(
        f"unsupported store URL {redact_dsn(url)!r}: {reason}; expected memory://, "
        "sqlite:///path.db or postgresql://user@host/dbname"
    )
