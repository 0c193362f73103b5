"""The store: one appservice's persistent state, composed of one interface per
concern (see :mod:`bridge_kit.store.concerns`), and what the backends share."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from types import TracebackType

from bridge_kit.bridge.records import PortalKey
from bridge_kit.errors import StoreError
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
from bridge_kit.store.state_records import content_of
from bridge_kit.types.events import Event


class Store(
    PuppetStore,
    InboxStore,
    DeadLetterStore,
    ParkingStore,
    RetentionStore,
    RoomRecordStore,
    DeviceStore,
    CryptoStore,
    BridgeRecordStore,
    LoginLeaseStore,
    abc.ABC,
):
    """Persistent state of one appservice: every concern of
    :mod:`bridge_kit.store.concerns` on one database, with its lifecycle.

    Its public methods clean their input in front (:mod:`bridge_kit.store._clean`);
    a backend implements the underscored hooks and receives clean values only.
    """

    #: The schema version this code writes; :meth:`open` migrates older ones up to it.
    SCHEMA_VERSION: int = 6

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create the schema or migrate it to :attr:`SCHEMA_VERSION`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release connections. Safe to call twice."""

    async def lock_for_daemon(self) -> None:
        """Claim the store for this process's daemon, or raise
        :class:`~bridge_kit.errors.StoreError` if another daemon holds it.

        A store that several daemons may share (PostgreSQL: lanes are leased)
        does nothing; one that only a single process may work on (SQLite) takes
        a lock that :meth:`close` releases, and voids the lane leases an earlier,
        dead daemon left behind. Call it once, before serving.
        """

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version the open database is at."""


def profiles_of(rows: Iterable[tuple[str, str, str | None]]) -> dict[str, dict[str, str | None]]:
    """Stored ``(user, field, value)`` rows as profiles by user ID."""
    profiles: dict[str, dict[str, str | None]] = {}
    for user, field, value in rows:
        profiles.setdefault(user, {})[field] = value
    return profiles


def state_event_from(
    room_id: str, event_type: str, content_json: str, sender: str | None, ts: int
) -> Event:
    """A stored state row as an :class:`Event` (no event ID: the store keeps none)."""
    return Event(
        type=event_type,
        content=content_of(content_json),
        room_id=room_id,
        sender=sender,
        state_key="",
        origin_server_ts=ts,
    )


def pending_migrations(found: int, latest: int, where: str) -> range:
    """The migration steps (indices) that take a database from ``found`` to ``latest``.

    Step ``i`` migrates version ``i`` to ``i + 1``; version 0 is an empty database.
    A database written by a newer bridge_kit is refused rather than guessed at.
    """
    if found > latest:
        raise StoreError(
            f"{where}: database schema version {found} is newer than this bridge_kit "
            f"supports ({latest}); upgrade bridge_kit"
        )
    return range(found, latest)


def room_taken(room_id: str, owner: PortalKey) -> StoreError:
    """What every backend raises when a portal is given a room another portal has."""
    return StoreError(f"room {room_id} is already the room of portal {owner}")


def unique_chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size``, each free of duplicates, streamed.

    Duplicates are only dropped within a chunk, so memory stays bounded by ``size``.
    """
    chunk: list[str] = []
    seen: set[str] = set()
    for item in items:
        if item in seen:
            continue
        seen.add(item)
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
            seen = set()
    if chunk:
        yield chunk
