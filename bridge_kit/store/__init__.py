"""Where bridge_kit remembers registered puppets, processed transactions, the
events waiting in the durable inbox, and the bridge layer's records (portals,
ghosts, logins and the message map).

Pick a backend by URL with :func:`open_store`::

    async with open_store("sqlite:///bridge_kit.db") as store:
        await store.mark_registered(["@_bk_alice:example.org"])

A :class:`Store` is composed of one interface per concern (:class:`PuppetStore`,
:class:`InboxStore`, :class:`DeadLetterStore`, :class:`ParkingStore`,
:class:`RetentionStore`, :class:`RoomRecordStore`, :class:`DeviceStore`,
:class:`CryptoStore`, :class:`BridgeRecordStore`, :class:`LoginLeaseStore`); code
that needs one concern is typed with it.
"""

from __future__ import annotations

import os

from bridge_kit import defaults
from bridge_kit.store.base import Store
from bridge_kit.store.concerns import (
    BridgeRecordStore,
    CryptoStore,
    DeadLetterStore,
    DeviceStore,
    InboxStore,
    LoginLeaseStore,
    ParkingStore,
    PuppetStore,
    RetentionStore,
    RoomRecordStore,
)
from bridge_kit.store.memory import MemoryStore
from bridge_kit.store.postgres import PostgresStore
from bridge_kit.store.sqlite import SQLiteStore
from bridge_kit.store.url import StoreURL, parse_store_url, redact_store_url

__all__ = [
    "BridgeRecordStore",
    "CryptoStore",
    "DeadLetterStore",
    "DeviceStore",
    "InboxStore",
    "LoginLeaseStore",
    "MemoryStore",
    "ParkingStore",
    "PostgresStore",
    "PuppetStore",
    "RetentionStore",
    "RoomRecordStore",
    "SQLiteStore",
    "Store",
    "StoreURL",
    "open_store",
    "parse_store_url",
    "redact_store_url",
]


def open_store(
    url: str | StoreURL,
    base_dir: str | os.PathLike[str] | None = None,
    *,
    sync: str = defaults.STORE_SYNC,
) -> Store:
    """The store a URL names, not yet opened (use ``async with`` or ``await store.open()``).

    - ``memory://``: in this process only, for tests;
    - ``sqlite:///relative/path.db`` (from ``base_dir``, default the current
      directory) or ``sqlite:////abs/path.db``;
    - ``postgresql://user@host:port/dbname`` (or ``postgres://``).

    ``sync`` is SQLite's durability, ``normal`` or ``full`` (see :class:`SQLiteStore`);
    the other stores ignore it. Raises :class:`~bridge_kit.errors.StoreError` for any
    other URL.
    """
    parsed = url if isinstance(url, StoreURL) else parse_store_url(url, base_dir)
    if parsed.kind == "memory":
        return MemoryStore()
    if parsed.kind == "sqlite":
        return SQLiteStore(parsed.target, sync=sync)
    return PostgresStore(parsed.target)
