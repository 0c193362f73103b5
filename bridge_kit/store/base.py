"""The store interface: which puppets are registered, which transactions are done,
and the durable inbox of events waiting for their handlers."""

from __future__ import annotations

import abc
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Final

import cattrs

from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import (
    Acceptance,
    DeadLetter,
    InboxItem,
    InboxStats,
    NewDeadLetter,
    NewInboxItem,
    ParkedItem,
    Parking,
)
from bridge_kit.store.inbox_rows import clean_text
from bridge_kit.store.state_records import CREATE, content_of
from bridge_kit.types.converter import converter
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member, PowerLevels, with_creators


class Store(abc.ABC):
    """Persistent state of one appservice.

    Puppets are keyed by full user ID (``@alice:example.org``). Every method
    takes and returns batches, because a bridge registers puppets by the
    hundred thousand and one round trip per puppet would dominate.
    Implementations must not load the whole puppet table into memory.
    """

    #: The schema version this code writes; :meth:`open` migrates older ones up to it.
    SCHEMA_VERSION: int = 5

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create the schema or migrate it to :attr:`SCHEMA_VERSION`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release connections. Safe to call twice."""

    async def lock_for_daemon(self) -> None:  # noqa: B027 (a no-op unless overridden)
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

    # -- puppets -------------------------------------------------------------

    @abc.abstractmethod
    async def registered_among(self, user_ids: Iterable[str]) -> set[str]:
        """The subset of ``user_ids`` known to be registered (one query per batch)."""

    async def is_registered(self, user_id: str) -> bool:
        """Whether one puppet is known to be registered."""
        return bool(await self.registered_among([user_id]))

    @abc.abstractmethod
    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        """Record puppets as registered, durably, in one batch (idempotent)."""

    @abc.abstractmethod
    async def forget_registered(self, user_ids: Iterable[str] | None = None) -> None:
        """Forget some puppets, or all with ``None`` (e.g. after a homeserver reset)."""

    @abc.abstractmethod
    async def count_registered(self) -> int:
        """How many puppets the store knows as registered."""

    # -- transactions --------------------------------------------------------

    @abc.abstractmethod
    async def is_transaction_done(self, txn_id: str) -> bool:
        """Whether this transaction id was processed successfully before."""

    @abc.abstractmethod
    async def mark_transaction_done(self, txn_id: str) -> None:
        """Record a transaction as processed, before it is acknowledged.

        The record is committed when this returns and survives a crash of the
        process; whether it also survives a power cut is the backend's choice
        (SQLite: no, see :meth:`SQLiteStore.mark_transaction_done`).
        """

    @abc.abstractmethod
    async def prune_transactions(self, keep: int, max_age: float | None = None) -> int:
        """Delete all but the ``keep`` most recent transaction records, and (with
        ``max_age``) those recorded more than ``max_age`` seconds ago; return how many
        went."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version the open database is at."""

    # -- the inbox -----------------------------------------------------------
    #
    # Events wait in the inbox, in lanes (a room each), until every handler
    # returned for them. Several processes may share one database: a process
    # works on a lane only while it holds the lane's lease, so each lane is
    # worked on by one process at a time, in order.

    @abc.abstractmethod
    async def accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter] = (),
        *,
        digest: bytes = b"",
    ) -> Acceptance:
        """Record ``txn_id`` with the body's ``digest``, append ``items`` to the inbox and
        ``rejected`` to the dead letters, all in one commit.

        Returns :attr:`~Acceptance.DUPLICATE` (false), writing nothing, when ``txn_id``
        was accepted before with the same ``digest``, or marked done (a record without
        a digest matches any). The same ``txn_id`` with another digest is a new
        transaction, stored as :attr:`~Acceptance.REUSED_ID`; its record now holds the
        new digest and counts as the newest.
        """

    @abc.abstractmethod
    async def claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        """Take up to ``limit`` lanes whose oldest item is ready (``not_before`` has
        passed) and that no other owner holds a live lease on (``exclude`` aside),
        the lane with the oldest ready item first; ``owner`` now holds each for
        ``lease`` seconds (re-claiming a lane it holds renews it). A lane whose
        owner died is free once its lease ran out."""

    @abc.abstractmethod
    async def renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        """Extend ``owner``'s leases on ``lanes`` by ``lease`` seconds from now; return the
        lanes it still holds (one whose lease ran out and was taken is missing)."""

    @abc.abstractmethod
    async def release_lane(self, owner: str, lane: str) -> None:
        """Give up ``owner``'s lease on ``lane`` (nothing happens if it holds none)."""

    @abc.abstractmethod
    async def lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        """The oldest ``limit`` items of ``lane``, in arrival order."""

    @abc.abstractmethod
    async def complete_item(self, item_id: int) -> None:
        """Every handler returned for this item: remove it from the inbox."""

    @abc.abstractmethod
    async def complete_items(self, item_ids: Collection[int]) -> None:
        """Every handler returned for these items: remove them from the inbox, in one
        commit (all or none). Ids no longer in the inbox are skipped."""

    @abc.abstractmethod
    async def fail_item(
        self,
        item_id: int,
        done_handlers: Sequence[str],
        not_before: float,
        *,
        count_attempt: bool = True,
    ) -> None:
        """An attempt failed: count it, remember which handlers succeeded, and do not
        try again before the Unix time ``not_before``. The first failure's time is
        kept. ``count_attempt=False``: the item was only not ready yet (a deferral)."""

    @abc.abstractmethod
    async def bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        """Move an item out of the inbox into the dead letters, in one commit."""

    @abc.abstractmethod
    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters, oldest first."""

    @abc.abstractmethod
    async def replay_dead_letters(
        self, ids: Collection[int] | None = None, *, all_handlers: bool = False
    ) -> int:
        """Put these dead letters (all with ``None``) back at the end of their lanes,
        with no attempts counted and their arrival time kept; return how many.

        The handlers that had succeeded for a letter are not run again, unless
        ``all_handlers``."""

    @abc.abstractmethod
    async def drop_dead_letters(self, ids: Collection[int] | None = None) -> int:
        """Delete these dead letters (all with ``None``); return how many."""

    # -- retention (version 5) ---------------------------------------------------

    @abc.abstractmethod
    async def prune_dead_letters(self, keep: int, before: float) -> int:
        """Delete the dead letters that last failed before the Unix time ``before``,
        and all but the newest ``keep``; return how many went."""

    @abc.abstractmethod
    async def prune_crypto(self, kind: str, before: float) -> int:
        """Delete the crypto values of ``kind`` (every owner) last written before the
        Unix time ``before``; return how many went."""

    @abc.abstractmethod
    async def to_device_since(self) -> float | None:
        """The arrival time of the oldest to-device item in the inbox or the dead
        letters (0 for a letter stored before version 5), ``None`` if there is none:
        what decrypting it again may need is at most this old."""

    @abc.abstractmethod
    async def inbox_stats(self) -> InboxStats:
        """The inbox depth, its oldest item's arrival time and the dead-letter count."""

    # -- parked items (version 5) ---------------------------------------------
    #
    # Items that wait for something (a room key) outside their lane, so the lane
    # goes on; see bridge_kit.inbox.signals.Park. Each method is one commit, and moves an
    # item only if it is still where it was: of two processes that race, one wins.

    @abc.abstractmethod
    async def park_item(self, item_id: int, parking: Parking) -> bool:
        """Move an item out of the inbox into the parked items; False (nothing written)
        when it is no longer in the inbox."""

    @abc.abstractmethod
    async def unpark_items(self, key: str) -> int:
        """Put the items parked under ``key`` back at the end of their lanes, in the
        order they first arrived, ready at once, with their progress (attempts, done
        handlers, first failure) kept; return how many."""

    @abc.abstractmethod
    async def parked_items(
        self, *, key: str | None = None, due_by: float | None = None, limit: int = 100
    ) -> list[ParkedItem]:
        """Up to ``limit`` parked items, oldest first: those under ``key`` and/or those
        whose ``give_up_at`` is at or before the Unix time ``due_by`` (all if neither)."""

    @abc.abstractmethod
    async def bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        """Move a parked item into the dead letters; False (nothing written) when it is
        no longer parked."""

    @abc.abstractmethod
    async def count_parked(self) -> int:
        """How many items are parked."""

    # -- room state (version 3) ----------------------------------------------
    #
    # What the bridge knows of each room's state, fed from transactions and from
    # the intents' own changes; see bridge_kit.store.state_records for the rows.

    @abc.abstractmethod
    async def apply_state(
        self, room_id: str, events: Iterable[Event], *, complete: bool = False
    ) -> None:
        """Record the tracked state events among ``events`` (one commit), each unless
        the stored row for its (room, type, state key) has a newer ``origin_server_ts``.

        ``complete`` says ``events`` hold every member of the room (a snapshot from
        the homeserver); an ``m.room.create`` event says the same, since the room's
        whole history follows it. Either makes :meth:`room_state_known` true.
        """

    @abc.abstractmethod
    async def membership(self, room_id: str, user_id: str) -> Member | None:
        """The stored membership of ``user_id`` in the room, or ``None`` if none is stored."""

    @abc.abstractmethod
    async def members(self, room_id: str, membership: str = "join") -> dict[str, Member]:
        """The room's stored members with this ``membership``, by user ID."""

    @abc.abstractmethod
    async def state_event(self, room_id: str, event_type: str) -> Event | None:
        """The stored room-wide state event of this type (content, sender, timestamp)."""

    @abc.abstractmethod
    async def room_state_known(self, room_id: str) -> bool:
        """Whether the store saw the room's whole membership (see :meth:`apply_state`)."""

    async def power_levels(self, room_id: str) -> PowerLevels | None:
        """The stored power levels (creators filled in from ``m.room.create``), or ``None``."""
        event = await self.state_event(room_id, "m.room.power_levels")
        if event is None:
            return None
        try:
            levels = converter.structure(event.content, PowerLevels)
        except (cattrs.BaseValidationError, ValueError, TypeError):
            return None  # a malformed event: as good as none, the homeserver is asked
        create = await self.state_event(room_id, CREATE)
        return levels if create is None else with_creators(levels, create)

    async def is_encrypted(self, room_id: str) -> bool | None:
        """True when ``m.room.encryption`` is stored; False when the room's state is
        known without it; ``None`` when the store cannot tell."""
        if await self.state_event(room_id, "m.room.encryption") is not None:
            return True
        return False if await self.room_state_known(room_id) else None

    @abc.abstractmethod
    async def profile(self, user_id: str) -> dict[str, str | None]:
        """The profile fields (``displayname``, ``avatar_url``) this bridge last set for
        its own user ``user_id``; a field never set is absent (``None``: removed)."""

    @abc.abstractmethod
    async def set_profile(self, user_id: str, field: str, value: str | None) -> None:
        """Record that ``user_id``'s profile ``field`` is now ``value``."""

    # -- batches for bulk runs (over the tables above) ---------------------------
    #
    # The backends answer each batch in one query or one commit; these defaults,
    # one call per item, keep any other Store subclass correct.

    async def joined_among(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The ``(room_id, user_id)`` pairs among ``pairs`` whose stored membership is join."""
        found: set[tuple[str, str]] = set()
        for room_id, user_id in pairs:
            member = await self.membership(room_id, user_id)
            if member is not None and member.membership == "join":
                found.add((room_id, user_id))
        return found

    async def profiles_among(self, user_ids: Iterable[str]) -> dict[str, dict[str, str | None]]:
        """:meth:`profile` of each of ``user_ids`` that has a stored field, by user ID."""
        profiles: dict[str, dict[str, str | None]] = {}
        for user_id in set(user_ids):
            profile = await self.profile(user_id)
            if profile:
                profiles[user_id] = profile
        return profiles

    async def set_profiles(self, values: Iterable[tuple[str, str, str | None]]) -> None:
        """:meth:`set_profile` for each ``(user_id, field, value)``, in one commit."""
        for user_id, field, value in values:
            await self.set_profile(user_id, field, value)

    # -- devices and crypto state (version 4) --------------------------------
    #
    # The devices this bridge made for its users (MSC4190), and the opaque state of
    # the encryption layer. Crypto values are bytes the store never looks into (the
    # encryption layer encrypts them itself); ``owner`` is whose state it is (a user
    # or a device), ``kind`` what sort (sessions, keys...), ``key`` which one.

    @abc.abstractmethod
    async def remember_device(self, user_id: str, device_id: str, display_name: str | None) -> None:
        """Record that the bridge made ``device_id`` for ``user_id``.

        A repeat with a name renames it; with ``None`` it keeps the name, as the
        homeserver does for MSC4190's ``PUT /devices/{deviceId}`` without one."""

    @abc.abstractmethod
    async def forget_device(self, user_id: str, device_id: str) -> None:
        """Forget one of ``user_id``'s devices (nothing happens if it is not known)."""

    @abc.abstractmethod
    async def known_devices(self, user_id: str) -> dict[str, str | None]:
        """The devices the bridge made for ``user_id``: device ID -> display name."""

    @abc.abstractmethod
    async def crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        """One stored value, or ``None``."""

    @abc.abstractmethod
    async def crypto_put(self, owner: str, kind: str, key: str, value: bytes) -> None:
        """Store one value, replacing what was there."""

    @abc.abstractmethod
    async def crypto_put_many(self, owner: str, kind: str, items: Mapping[str, bytes]) -> None:
        """Store several values of one owner and kind, replacing theirs, in one commit."""

    @abc.abstractmethod
    async def crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        """Every value of this owner and kind, by key."""

    @abc.abstractmethod
    async def crypto_delete(self, owner: str, kind: str, key: str) -> None:
        """Delete one value (nothing happens if there is none)."""


def checked_text(value: str, what: str) -> str:
    """``value``, or :class:`ValueError` if it holds NUL or a lone surrogate.

    For the keys of devices and crypto state: cleaning them (as :func:`clean_text`
    does lane names) could make two keys one, and a lookup find the wrong value.
    """
    if _NOT_AN_ID.search(value):
        raise ValueError(f"{what} holds NUL or a lone surrogate: {value[:100]!r}")
    return value


def crypto_scope(owner: str, kind: str) -> tuple[str, str]:
    """``owner`` and ``kind``, checked with :func:`checked_text`."""
    return checked_text(owner, "crypto owner"), checked_text(kind, "crypto kind")


def checked_items(items: Mapping[str, bytes]) -> dict[str, bytes]:
    """``items`` with every key checked and every value as :class:`bytes`."""
    return {checked_text(key, "crypto key"): checked_bytes(value) for key, value in items.items()}


def checked_bytes(value: bytes) -> bytes:
    """``value`` as :class:`bytes`; :class:`TypeError` for anything that is not bytes-like."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"crypto values are bytes, not {type(value).__name__}")
    return bytes(value)


def cleaned_pairs(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """``(room_id, user_id)`` pairs by the keys the store keeps them under (see
    :func:`~bridge_kit.store.inbox_rows.clean_text`), so an answer maps back to the asker's."""
    # clean_text inlined for the usual ASCII IDs, which it leaves alone: a bulk run's
    # re-run asks about every pair of its input, and the calls were a fifth of its time.
    return {
        (
            (room, user)
            if room.isascii() and user.isascii() and "\x00" not in room and "\x00" not in user
            else (clean_text(room), clean_text(user))
        ): (room, user)
        for room, user in pairs
    }


def cleaned_ids(user_ids: Iterable[str]) -> dict[str, str]:
    """User IDs by the key the store keeps them under (see :func:`cleaned_pairs`)."""
    return {clean_text(user_id): user_id for user_id in user_ids}


def profiles_by_user(
    rows: Iterable[tuple[str, str, str | None]], wanted: dict[str, str]
) -> dict[str, dict[str, str | None]]:
    """Stored ``(user, field, value)`` rows as profiles by the asker's user IDs."""
    profiles: dict[str, dict[str, str | None]] = {}
    for user, field, value in rows:
        profiles.setdefault(wanted[user], {})[field] = value
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


def check_limit(limit: int, name: str = "limit") -> None:
    """Refuse a negative row count, which SQL backends would read differently."""
    if limit < 0:
        raise ValueError(f"{name} must be >= 0, not {limit}")


#: No Matrix user ID holds NUL or a lone surrogate, and neither database could store
#: one (PostgreSQL refuses NUL in text, no UTF-8 encoder takes a lone surrogate).
_NOT_AN_ID: Final = re.compile("[\x00\ud800-\udfff]")


def storable_ids(user_ids: Iterable[str]) -> Iterator[str]:
    """The user IDs a store can hold; the others cannot have been stored, so a
    lookup or a removal just skips them."""
    return (user_id for user_id in user_ids if not _NOT_AN_ID.search(user_id))


def checked_ids(user_ids: Iterable[str]) -> list[str]:
    """``user_ids`` without duplicates, or :class:`ValueError` for one that holds NUL
    or a lone surrogate: recording it would only fail deeper down (every backend
    behaves the same, whether or not its database would have taken it)."""
    batch = list(set(user_ids))
    for user_id in batch:
        if _NOT_AN_ID.search(user_id):
            raise ValueError(
                f"not a user ID a store can hold (NUL or a lone surrogate): {user_id[:100]!r}"
            )
    return batch


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
