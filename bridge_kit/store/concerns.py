"""The store's concerns, one interface each, composed into :class:`~bridge_kit.store.Store`.

Code that needs one concern is typed with its interface (the crypto state with
:class:`CryptoStore`, the bulk runs with :class:`PuppetStore`...). Each public
method here is the front door of every backend: it cleans and checks its input
with the named rules of :mod:`bridge_kit.store._clean`, then calls the backend's
hook of the same name with a leading underscore. A backend implements the hooks,
receives clean values only, and never cleans on its own, so the backends cannot
drift apart on what they store.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import ClassVar

import cattrs

from bridge_kit.bridge.records import (
    GhostRecord,
    LoginRecord,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)
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
from bridge_kit.store import _clean
from bridge_kit.store.login_leases import LocalLeases, LoginLease
from bridge_kit.store.state_records import CREATE, MemberRow, StateRow, known_room, rows_of
from bridge_kit.types.converter import converter
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member, PowerLevels, with_creators

__all__ = [
    "BridgeRecordStore",
    "CryptoStore",
    "DeadLetterStore",
    "DeviceStore",
    "InboxStore",
    "LoginLeaseStore",
    "ParkingStore",
    "PuppetStore",
    "RetentionStore",
    "RoomRecordStore",
]


class PuppetStore(abc.ABC):
    """Which puppets are registered, keyed by full user ID (``@alice:example.org``).

    Every method takes a batch: a bridge registers puppets by the hundred thousand
    and one round trip per puppet would dominate. A backend must not load the whole
    puppet table into memory.
    """

    async def registered_among(self, user_ids: Iterable[str]) -> set[str]:
        """The subset of ``user_ids`` known to be registered (one query per batch)."""
        return await self._registered_among(_clean.storable_user_ids(user_ids))

    async def is_registered(self, user_id: str) -> bool:
        """Whether one puppet is known to be registered."""
        return bool(await self.registered_among([user_id]))

    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        """Record puppets as registered, durably, in one batch (idempotent); a user ID
        holding NUL or a lone surrogate is refused with :class:`ValueError`."""
        await self._mark_registered(_clean.checked_user_ids(user_ids))

    async def forget_registered(self, user_ids: Iterable[str] | None = None) -> None:
        """Forget some puppets, or all with ``None`` (e.g. after a homeserver reset)."""
        chosen = None if user_ids is None else _clean.storable_user_ids(user_ids)
        await self._forget_registered(chosen)

    @abc.abstractmethod
    async def count_registered(self) -> int:
        """How many puppets the store knows as registered."""

    @abc.abstractmethod
    async def _registered_among(self, user_ids: Iterable[str]) -> set[str]:
        """The storable ``user_ids`` (possibly repeated, streamed) that are registered."""

    @abc.abstractmethod
    async def _mark_registered(self, user_ids: list[str]) -> None:
        """Record these checked, distinct user IDs."""

    @abc.abstractmethod
    async def _forget_registered(self, user_ids: Iterable[str] | None) -> None:
        """Forget these storable user IDs (streamed), or all with ``None``."""


class InboxStore(abc.ABC):
    """Which transactions are done, and the durable inbox of events waiting for
    their handlers.

    Events wait in the inbox, in lanes (a room each), until every handler returned
    for them. Several processes may share one database: a process works on a lane
    only while it holds the lane's lease, so each lane is worked on by one process
    at a time, in order. How a backend claims and leases lanes is its own.
    """

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

    async def prune_transactions(self, keep: int, max_age: float | None = None) -> int:
        """Delete all but the ``keep`` most recent transaction records, and (with
        ``max_age``) those recorded more than ``max_age`` seconds ago; return how many
        went."""
        return await self._prune_transactions(_clean.checked_count(keep, "keep"), max_age)

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
        return await self._accept_transaction(
            txn_id,
            [_clean.storable_item(item) for item in items],
            [_clean.storable_letter(letter) for letter in rejected],
            digest,
        )

    async def claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        """Take up to ``limit`` lanes whose oldest item is ready (``not_before`` has
        passed) and that no other owner holds a live lease on (``exclude`` aside),
        the lane with the oldest ready item first; ``owner`` now holds each for
        ``lease`` seconds (re-claiming a lane it holds renews it). A lane whose
        owner died is free once its lease ran out."""
        return await self._claim_lanes(
            _clean.storable_text(owner),
            lease,
            _clean.checked_count(limit),
            {_clean.storable_text(lane) for lane in exclude},
        )

    async def renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        """Extend ``owner``'s leases on ``lanes`` by ``lease`` seconds from now; return the
        lanes it still holds (one whose lease ran out and was taken is missing)."""
        cleaned = {_clean.storable_text(lane) for lane in lanes}
        return await self._renew_lanes(_clean.storable_text(owner), cleaned, lease)

    async def release_lane(self, owner: str, lane: str) -> None:
        """Give up ``owner``'s lease on ``lane`` (nothing happens if it holds none)."""
        await self._release_lane(_clean.storable_text(owner), _clean.storable_text(lane))

    async def lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        """The oldest ``limit`` items of ``lane``, in arrival order."""
        return await self._lane_items(_clean.storable_text(lane), _clean.checked_count(limit))

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

    async def bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        """Move an item out of the inbox into the dead letters, in one commit."""
        await self._bury_item(item_id, _clean.storable_letter(letter))

    @abc.abstractmethod
    async def inbox_stats(self) -> InboxStats:
        """The inbox depth, its oldest item's arrival time and the dead-letter count."""

    @abc.abstractmethod
    async def _prune_transactions(self, keep: int, max_age: float | None) -> int:
        """:meth:`prune_transactions` with a checked ``keep``."""

    @abc.abstractmethod
    async def _accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter],
        digest: bytes,
    ) -> Acceptance:
        """:meth:`accept_transaction` with clean items and letters."""

    @abc.abstractmethod
    async def _claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str]
    ) -> list[str]:
        """:meth:`claim_lanes` with a clean owner and lanes and a checked limit."""

    @abc.abstractmethod
    async def _renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        """:meth:`renew_lanes` with a clean owner and distinct clean lanes."""

    @abc.abstractmethod
    async def _release_lane(self, owner: str, lane: str) -> None:
        """:meth:`release_lane` with a clean owner and lane."""

    @abc.abstractmethod
    async def _lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        """:meth:`lane_items` with a clean lane and a checked limit."""

    @abc.abstractmethod
    async def _bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        """:meth:`bury_item` with a clean letter."""


class DeadLetterStore(abc.ABC):
    """The dead letters: items whose handlers gave up, kept for people to replay or drop."""

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        return await self._dead_letters(None if limit is None else _clean.checked_count(limit))

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

    @abc.abstractmethod
    async def _dead_letters(self, limit: int | None) -> list[DeadLetter]:
        """:meth:`dead_letters` with a checked limit."""


class ParkingStore(abc.ABC):
    """Items that wait for something (a room key) outside their lane, so the lane
    goes on; see :class:`bridge_kit.inbox.signals.Park`.

    Each method is one commit, and moves an item only if it is still where it was:
    of two processes that race, one wins.
    """

    async def park_item(self, item_id: int, parking: Parking) -> bool:
        """Move an item out of the inbox into the parked items; False (nothing written)
        when it is no longer in the inbox."""
        return await self._park_item(item_id, _clean.storable_parking(parking))

    async def unpark_items(self, key: str) -> int:
        """Put the items parked under ``key`` back at the end of their lanes, in the
        order they first arrived, ready at once, with their progress (attempts, done
        handlers, first failure) kept; return how many."""
        return await self._unpark_items(_clean.storable_text(key))

    async def parked_items(
        self, *, key: str | None = None, due_by: float | None = None, limit: int = 100
    ) -> list[ParkedItem]:
        """Up to ``limit`` parked items, oldest first: those under ``key`` and/or those
        whose ``give_up_at`` is at or before the Unix time ``due_by`` (all if neither)."""
        cleaned = None if key is None else _clean.storable_text(key)
        return await self._parked_items(cleaned, due_by, _clean.checked_count(limit))

    async def bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        """Move a parked item into the dead letters; False (nothing written) when it is
        no longer parked."""
        return await self._bury_parked(item_id, _clean.storable_letter(letter))

    @abc.abstractmethod
    async def count_parked(self) -> int:
        """How many items are parked."""

    @abc.abstractmethod
    async def _park_item(self, item_id: int, parking: Parking) -> bool:
        """:meth:`park_item` with a clean parking."""

    @abc.abstractmethod
    async def _unpark_items(self, key: str) -> int:
        """:meth:`unpark_items` with a clean key."""

    @abc.abstractmethod
    async def _parked_items(
        self, key: str | None, due_by: float | None, limit: int
    ) -> list[ParkedItem]:
        """:meth:`parked_items` with a clean key and a checked limit."""

    @abc.abstractmethod
    async def _bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        """:meth:`bury_parked` with a clean letter."""


class RetentionStore(abc.ABC):
    """What retention asks: old dead letters and crypto values go, and how old the
    to-device items still waiting are."""

    async def prune_dead_letters(self, keep: int, before: float) -> int:
        """Delete the dead letters that last failed before the Unix time ``before``,
        and all but the newest ``keep``; return how many went."""
        return await self._prune_dead_letters(_clean.checked_count(keep, "keep"), before)

    async def prune_crypto(self, kind: str, before: float) -> int:
        """Delete the crypto values of ``kind`` (every owner) last written before the
        Unix time ``before``; return how many went."""
        return await self._prune_crypto(_clean.checked_key(kind, "crypto kind"), before)

    @abc.abstractmethod
    async def to_device_since(self) -> float | None:
        """The arrival time of the oldest to-device item in the inbox or the dead
        letters (0 for a letter stored before version 5), ``None`` if there is none:
        what decrypting it again may need is at most this old."""

    @abc.abstractmethod
    async def _prune_dead_letters(self, keep: int, before: float) -> int:
        """:meth:`prune_dead_letters` with a checked ``keep``."""

    @abc.abstractmethod
    async def _prune_crypto(self, kind: str, before: float) -> int:
        """:meth:`prune_crypto` with a checked ``kind``."""


class RoomRecordStore(abc.ABC):
    """What the bridge knows of each room's state, fed from transactions and from
    the intents' own changes (see :mod:`bridge_kit.store.state_records` for the
    rows), and the profiles it set for its own users.

    Room and user IDs are kept cleaned (:func:`~bridge_kit.store._clean.storable_text`)
    and looked up the same way, so a hostile ID still finds its row.
    """

    async def apply_state(
        self, room_id: str, events: Iterable[Event], *, complete: bool = False
    ) -> None:
        """Record the tracked state events among ``events`` (one commit), each unless
        the stored row for its (room, type, state key) has a newer ``origin_server_ts``.

        ``complete`` says ``events`` hold every member of the room (a snapshot from
        the homeserver); an ``m.room.create`` event says the same, since the room's
        whole history follows it. Either makes :meth:`room_state_known` true.
        """
        members, states = rows_of(room_id, events)
        known = known_room(room_id, states, complete)
        if members or states or known is not None:  # no commit for untracked events
            await self._apply_state(members, states, known)

    async def membership(self, room_id: str, user_id: str) -> Member | None:
        """The stored membership of ``user_id`` in the room, or ``None`` if none is stored."""
        return await self._membership(_clean.storable_text(room_id), _clean.storable_text(user_id))

    async def members(self, room_id: str, membership: str = "join") -> dict[str, Member]:
        """The room's stored members with this ``membership``, by user ID."""
        room, wanted = _clean.storable_text(room_id), _clean.storable_text(membership)
        return await self._members(room, wanted)

    async def state_event(self, room_id: str, event_type: str) -> Event | None:
        """The stored room-wide state event of this type (content, sender, timestamp)."""
        room, kind = _clean.storable_text(room_id), _clean.storable_text(event_type)
        return await self._state_event(room, kind)

    async def room_state_known(self, room_id: str) -> bool:
        """Whether the store saw the room's whole membership (see :meth:`apply_state`)."""
        return await self._room_state_known(_clean.storable_text(room_id))

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

    async def profile(self, user_id: str) -> dict[str, str | None]:
        """The profile fields (``displayname``, ``avatar_url``) this bridge last set for
        its own user ``user_id``; a field never set is absent (``None``: removed)."""
        return await self._profile(_clean.storable_text(user_id))

    async def set_profile(self, user_id: str, field: str, value: str | None) -> None:
        """Record that ``user_id``'s profile ``field`` is now ``value``."""
        await self._set_profiles(_clean.storable_profile_rows([(user_id, field, value)]))

    async def joined_among(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The ``(room_id, user_id)`` pairs among ``pairs`` whose stored membership is
        join (one query per batch)."""
        wanted = _clean.storable_pairs(pairs)
        return {wanted[pair] for pair in await self._joined_among(list(wanted))}

    async def profiles_among(self, user_ids: Iterable[str]) -> dict[str, dict[str, str | None]]:
        """:meth:`profile` of each of ``user_ids`` that has a stored field, by user ID."""
        wanted = _clean.storable_ids(user_ids)
        found = await self._profiles_among(list(wanted))
        return {wanted[user]: fields for user, fields in found.items()}

    async def set_profiles(self, values: Iterable[tuple[str, str, str | None]]) -> None:
        """:meth:`set_profile` for each ``(user_id, field, value)``, in one commit."""
        rows = _clean.storable_profile_rows(values)
        if rows:
            await self._set_profiles(rows)

    @abc.abstractmethod
    async def _apply_state(
        self, members: list[MemberRow], states: list[StateRow], known: str | None
    ) -> None:
        """Write these clean rows (each unless a newer one is stored) and mark ``known``
        as a room whose whole membership is stored, in one commit."""

    @abc.abstractmethod
    async def _membership(self, room_id: str, user_id: str) -> Member | None:
        """:meth:`membership` with clean IDs."""

    @abc.abstractmethod
    async def _members(self, room_id: str, membership: str) -> dict[str, Member]:
        """:meth:`members` with clean arguments."""

    @abc.abstractmethod
    async def _state_event(self, room_id: str, event_type: str) -> Event | None:
        """:meth:`state_event` with clean arguments."""

    @abc.abstractmethod
    async def _room_state_known(self, room_id: str) -> bool:
        """:meth:`room_state_known` with a clean room ID."""

    @abc.abstractmethod
    async def _profile(self, user_id: str) -> dict[str, str | None]:
        """:meth:`profile` with a clean user ID."""

    async def _joined_among(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The clean ``(room_id, user_id)`` pairs among ``pairs`` that are joined.

        The SQL backends answer in one query; this default, one call per pair, keeps
        any other backend correct."""
        found: set[tuple[str, str]] = set()
        for room_id, user_id in pairs:
            member = await self._membership(room_id, user_id)
            if member is not None and member.membership == "join":
                found.add((room_id, user_id))
        return found

    async def _profiles_among(self, user_ids: list[str]) -> dict[str, dict[str, str | None]]:
        """The stored profiles of these clean, distinct user IDs (default: one call each)."""
        profiles: dict[str, dict[str, str | None]] = {}
        for user_id in user_ids:
            profile = await self._profile(user_id)
            if profile:
                profiles[user_id] = profile
        return profiles

    @abc.abstractmethod
    async def _set_profiles(self, rows: list[tuple[str, str, str | None]]) -> None:
        """Write these clean ``(user_id, field, value)`` rows, in one commit."""


class DeviceStore(abc.ABC):
    """The devices this bridge made for its users (MSC4190).

    IDs holding NUL or a lone surrogate are refused with :class:`ValueError`
    (:func:`~bridge_kit.store._clean.checked_key`): no homeserver issues them.
    """

    async def remember_device(self, user_id: str, device_id: str, display_name: str | None) -> None:
        """Record that the bridge made ``device_id`` for ``user_id``.

        A repeat with a name renames it; with ``None`` it keeps the name, as the
        homeserver does for MSC4190's ``PUT /devices/{deviceId}`` without one."""
        user, device = _device_key(user_id, device_id)
        await self._remember_device(user, device, _clean.optional_storable_text(display_name))

    async def forget_device(self, user_id: str, device_id: str) -> None:
        """Forget one of ``user_id``'s devices (nothing happens if it is not known)."""
        await self._forget_device(*_device_key(user_id, device_id))

    async def known_devices(self, user_id: str) -> dict[str, str | None]:
        """The devices the bridge made for ``user_id``: device ID -> display name."""
        return await self._known_devices(_clean.checked_key(user_id, "user ID"))

    @abc.abstractmethod
    async def _remember_device(
        self, user_id: str, device_id: str, display_name: str | None
    ) -> None:
        """:meth:`remember_device` with checked IDs and a clean name."""

    @abc.abstractmethod
    async def _forget_device(self, user_id: str, device_id: str) -> None:
        """:meth:`forget_device` with checked IDs."""

    @abc.abstractmethod
    async def _known_devices(self, user_id: str) -> dict[str, str | None]:
        """:meth:`known_devices` with a checked user ID."""


def _device_key(user_id: str, device_id: str) -> tuple[str, str]:
    return _clean.checked_key(user_id, "user ID"), _clean.checked_key(device_id, "device ID")


class CryptoStore(abc.ABC):
    """The opaque state of the encryption layer: one bytes table keyed by
    ``(owner, kind, key)``.

    The store never looks into the values (the encryption layer encrypts them
    itself); ``owner`` is whose state it is (a user or a device), ``kind`` what
    sort (sessions, keys...), ``key`` which one. Keys holding NUL or a lone
    surrogate are refused with :class:`ValueError`.
    """

    async def crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        """One stored value, or ``None``."""
        return await self._crypto_get(*_crypto_scope(owner, kind), _crypto_key(key))

    async def crypto_put(self, owner: str, kind: str, key: str, value: bytes) -> None:
        """Store one value, replacing what was there."""
        await self.crypto_put_many(owner, kind, {key: value})

    async def crypto_put_many(self, owner: str, kind: str, items: Mapping[str, bytes]) -> None:
        """Store several values of one owner and kind, replacing theirs, in one commit."""
        scope, batch = _crypto_scope(owner, kind), _clean.checked_crypto_items(items)
        if batch:
            await self._crypto_put_many(*scope, batch)

    async def crypto_put_new(self, owner: str, kind: str, key: str, value: bytes) -> bytes | None:
        """Store ``value`` unless a value is there already, in one step that no other
        writer comes between: ``None`` if ``value`` is stored now (committed), else
        the value found, which stays as it was."""
        scope, checked = _crypto_scope(owner, kind), _crypto_key(key)
        return await self._crypto_put_new(*scope, checked, _clean.checked_bytes(value))

    async def crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        """Every value of this owner and kind, by key."""
        return await self._crypto_items(*_crypto_scope(owner, kind))

    async def crypto_delete(self, owner: str, kind: str, key: str) -> None:
        """Delete one value (nothing happens if there is none)."""
        await self._crypto_delete(*_crypto_scope(owner, kind), _crypto_key(key))

    async def crypto_delete_many(self, owner: str, kind: str, keys: Iterable[str]) -> None:
        """Delete several values of one owner and kind (those that exist), in one commit."""
        scope, checked = _crypto_scope(owner, kind), [_crypto_key(key) for key in keys]
        if checked:
            await self._crypto_delete_many(*scope, checked)

    #: Whether another process may change the crypto state while this one runs
    #: (PostgreSQL, which several daemons share): what was read before
    #: :meth:`crypto_lock` was taken may be stale.
    crypto_shared: ClassVar[bool] = False

    def crypto_lock(self, owner: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold ``owner``'s crypto lock for the ``async with`` block: a second process
        that takes it waits until the block ends. The state of one device (its
        account, Olm and Megolm sessions) changes only under its lock, so two
        daemons never encrypt with one ratchet state (a reused Megolm message index).

        A store that one process works on (SQLite, which
        :meth:`~bridge_kit.store.Store.lock_for_daemon` keeps to one daemon; memory)
        has nothing to wait for."""
        return self._crypto_lock(_clean.checked_key(owner, "crypto owner"))

    def _crypto_lock(self, owner: str) -> contextlib.AbstractAsyncContextManager[None]:
        """:meth:`crypto_lock` with a checked owner; by default no lock at all."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    async def _crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        """:meth:`crypto_get` with checked keys."""

    @abc.abstractmethod
    async def _crypto_put_many(self, owner: str, kind: str, items: dict[str, bytes]) -> None:
        """:meth:`crypto_put_many` with checked keys and a non-empty batch of bytes."""

    async def _crypto_put_new(self, owner: str, kind: str, key: str, value: bytes) -> bytes | None:
        """:meth:`crypto_put_new` with checked keys and bytes; by default a read, then a
        write if nothing was there: one step only in a store whose methods never wait
        (memory), so a store with a database does it in one statement of its own."""
        found = await self._crypto_get(owner, kind, key)
        if found is None:
            await self._crypto_put_many(owner, kind, {key: value})
        return found

    @abc.abstractmethod
    async def _crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        """:meth:`crypto_items` with checked keys."""

    @abc.abstractmethod
    async def _crypto_delete(self, owner: str, kind: str, key: str) -> None:
        """:meth:`crypto_delete` with checked keys."""

    async def _crypto_delete_many(self, owner: str, kind: str, keys: list[str]) -> None:
        """:meth:`crypto_delete_many` with checked keys (a non-empty list); by default
        one :meth:`_crypto_delete` each (a store without commits: memory)."""
        for key in keys:
            await self._crypto_delete(owner, kind, key)


def _crypto_scope(owner: str, kind: str) -> tuple[str, str]:
    return _clean.checked_key(owner, "crypto owner"), _clean.checked_key(kind, "crypto kind")


def _crypto_key(key: str) -> str:
    return _clean.checked_key(key, "crypto key")


class LoginLeaseStore:
    """Which daemon connects each bridge login: the one holding its lease.

    Several daemons on one store (PostgreSQL) would otherwise each connect every
    login. A lease is taken without waiting; a daemon that does not get it leaves
    the login to the holder and tries again later (the bridge layer's
    :class:`~bridge_kit.bridge.logins.Logins`).
    """

    #: Whether other daemons may hold leases of this store (PostgreSQL). A store one
    #: daemon works on (memory; SQLite, which
    #: :meth:`~bridge_kit.store.Store.lock_for_daemon` keeps to one) grants each
    #: lease that this process does not hold already.
    login_leases_shared: ClassVar[bool] = False

    async def take_login_lease(self, login_id: str) -> LoginLease | None:
        """The lease of ``login_id``, taken now, or ``None`` if someone holds it: another
        daemon, or a lease of this process not released yet."""
        return await self._take_login_lease(_clean.checked_key(login_id, "login ID"))

    async def check_login_leases(self) -> None:
        """Make sure the held leases still hold: a lease whose database connection
        died (a PostgreSQL restart, a dropped network) is lost, its
        :attr:`~bridge_kit.store.login_leases.LoginLease.held` False from now on,
        since another daemon may have taken it. Nothing to check by default."""

    async def _take_login_lease(self, login_id: str) -> LoginLease | None:
        """:meth:`take_login_lease` with a checked id; by default granted unless held here."""
        leases: LocalLeases | None = getattr(self, "_local_login_leases", None)
        if leases is None:
            leases = LocalLeases()
            # A mixin has no __init__ of its own; the leases live on the store.
            self._local_login_leases = leases
        return leases.take(login_id)


class BridgeRecordStore(abc.ABC):
    """The bridge layer's records (:mod:`bridge_kit.bridge.records`): portals,
    ghosts, logins, and the message map of messages and reactions.

    Upserts replace the whole record. Ids holding NUL or a lone surrogate are
    refused with :class:`ValueError` (:func:`~bridge_kit.store._clean.checked_key`),
    names have them replaced (:func:`~bridge_kit.store._clean.storable_text`), and
    metadata must be a JSON object: it reads back as JSON does (a tuple as a list).

    A *pending* message (a Matrix event claimed with :meth:`claim_event`, not yet
    sent) has no remote id yet: it is found by its event id only, and
    :meth:`messages`, :meth:`latest_messages` and :meth:`delete_messages` leave it
    out, so many can wait at once in one portal.
    """

    # -- portals ----------------------------------------------------------------

    async def portal(self, key: PortalKey) -> PortalRecord | None:
        """The portal of remote chat ``key``, or ``None``."""
        return await self._portal(_clean.checked_portal_key(key))

    async def portal_by_room(self, room_id: str) -> PortalRecord | None:
        """The portal whose room is ``room_id``, or ``None``."""
        return await self._portal_by_room(_clean.checked_key(room_id, "room ID"))

    async def portals(self) -> list[PortalRecord]:
        """Every portal, in key order."""
        return await self._portals()

    async def put_portal(self, record: PortalRecord) -> None:
        """Insert or replace the portal of ``record.key`` (its ``room_id`` included);
        a room that is already another portal's is refused with
        :class:`~bridge_kit.errors.StoreError`."""
        await self._put_portal(_clean.storable_portal(record))

    async def claim_portal_room(self, key: PortalKey, room_id: str) -> str:
        """Make ``room_id`` the room of ``key`` unless it has one already, in one
        atomic step (two daemons may race); return the room that won. A portal
        record for ``key`` is created if there is none.

        A room that is already another portal's is refused with
        :class:`~bridge_kit.errors.StoreError`."""
        return await self._claim_portal_room(
            _clean.checked_portal_key(key), _clean.checked_key(room_id, "room ID")
        )

    async def put_roomless_portal(self, record: PortalRecord) -> bool:
        """Insert or replace the portal of ``record.key`` (a record without a room)
        unless it has a room by now, in one atomic step; return whether it was
        written. A room another daemon claimed meanwhile is never erased."""
        if record.room_id is not None:
            raise ValueError("put_roomless_portal takes a record without a room")
        return await self._put_roomless_portal(_clean.storable_portal(record))

    async def delete_portal(self, key: PortalKey) -> None:
        """Forget a portal and its message map (messages and reactions)."""
        await self._delete_portal(_clean.checked_portal_key(key))

    # -- ghosts -----------------------------------------------------------------

    async def ghosts_among(self, ids: Iterable[str]) -> dict[str, GhostRecord]:
        """The known ghosts among remote user ``ids``, by id."""
        storable = (ghost_id for ghost_id in ids if _clean.is_storable_key(ghost_id))
        return await self._ghosts_among(list(dict.fromkeys(storable)))

    async def put_ghosts(self, records: Iterable[GhostRecord]) -> None:
        """Insert or replace ghosts, in one commit."""
        await self._put_ghosts(_clean.storable_ghosts(records))

    # -- logins -----------------------------------------------------------------

    async def login(self, login_id: str) -> LoginRecord | None:
        """The login ``login_id``, or ``None``."""
        return await self._login(_clean.checked_key(login_id, "login ID"))

    async def logins(self, user_id: str | None = None) -> list[LoginRecord]:
        """Every login (of Matrix user ``user_id`` only, when given), by id."""
        return await self._logins(_clean.optional_checked_key(user_id, "user ID"))

    async def put_login(self, record: LoginRecord) -> None:
        """Insert or replace a login (its sealed credentials included)."""
        await self._put_login(_clean.storable_login(record))

    async def delete_login(self, login_id: str) -> None:
        """Forget a login (nothing happens if it is not known)."""
        await self._delete_login(_clean.checked_key(login_id, "login ID"))

    # -- the message map --------------------------------------------------------

    async def messages(self, portal: PortalKey, remote_id: str) -> list[MessageRecord]:
        """Every part of remote message ``remote_id`` in ``portal``, by part."""
        return await self._messages(
            _clean.checked_portal_key(portal), _clean.checked_key(remote_id, "remote message ID")
        )

    async def message_by_event(self, event_id: str) -> MessageRecord | None:
        """The message (part) bridged as or from Matrix event ``event_id``."""
        return await self._message_by_event(_clean.checked_key(event_id, "event ID"))

    async def put_messages(self, records: Iterable[MessageRecord]) -> None:
        """Insert or replace message parts (keyed by event id), in one commit. A remote
        part that another event stood for is the new event's: the older mapping goes."""
        await self._put_messages([_clean.storable_message(record) for record in records])

    async def claim_event(self, record: MessageRecord) -> bool:
        """Insert ``record`` (a Matrix event about to go to the remote side, with
        ``pending`` set) unless its event id is in the map already; return whether
        it was inserted. A handler that runs twice sends only once. (A record that
        is not pending is not inserted either when its remote part is mapped.)"""
        return await self._claim_event(_clean.storable_message(record))

    async def release_event(self, event_id: str) -> None:
        """Forget the claim of Matrix event ``event_id`` while it is still pending (its
        send failed: the inbox's retry of the handler may claim and send it again); a
        mapping completed by :meth:`put_messages` stays."""
        await self._release_event(_clean.checked_key(event_id, "event ID"))

    async def delete_messages(self, portal: PortalKey, remote_id: str) -> None:
        """Forget every part of a remote message (and the reactions to it)."""
        await self._delete_messages(
            _clean.checked_portal_key(portal), _clean.checked_key(remote_id, "remote message ID")
        )

    async def latest_messages(self, portal: PortalKey, limit: int) -> list[MessageRecord]:
        """The ``limit`` newest messages of ``portal`` by timestamp, oldest first."""
        return await self._latest_messages(
            _clean.checked_portal_key(portal), _clean.checked_count(limit)
        )

    async def reaction(
        self, portal: PortalKey, remote_id: str, part: str, sender: str, key: str
    ) -> ReactionRecord | None:
        """``sender``'s reaction ``key`` to a message part, or ``None``."""
        return await self._reaction(
            _clean.checked_portal_key(portal),
            _clean.checked_key(remote_id, "remote message ID"),
            _clean.checked_key(part, "message part"),
            _clean.checked_key(sender, "remote sender"),
            _clean.checked_key(key, "reaction key"),
        )

    async def reaction_by_event(self, event_id: str) -> ReactionRecord | None:
        """The reaction bridged as or from Matrix event ``event_id``."""
        return await self._reaction_by_event(_clean.checked_key(event_id, "event ID"))

    async def put_reaction(self, record: ReactionRecord) -> None:
        """Insert or replace a reaction (keyed by message part, sender and key)."""
        await self._put_reaction(_clean.storable_reaction(record))

    async def delete_reaction(self, event_id: str) -> None:
        """Forget the reaction of Matrix event ``event_id``."""
        await self._delete_reaction(_clean.checked_key(event_id, "event ID"))

    # -- the backend's hooks ----------------------------------------------------

    @abc.abstractmethod
    async def _portal(self, key: PortalKey) -> PortalRecord | None: ...

    @abc.abstractmethod
    async def _portal_by_room(self, room_id: str) -> PortalRecord | None: ...

    @abc.abstractmethod
    async def _portals(self) -> list[PortalRecord]: ...

    @abc.abstractmethod
    async def _put_portal(self, record: PortalRecord) -> None: ...

    @abc.abstractmethod
    async def _claim_portal_room(self, key: PortalKey, room_id: str) -> str: ...

    @abc.abstractmethod
    async def _put_roomless_portal(self, record: PortalRecord) -> bool: ...

    @abc.abstractmethod
    async def _delete_portal(self, key: PortalKey) -> None: ...

    @abc.abstractmethod
    async def _ghosts_among(self, ids: list[str]) -> dict[str, GhostRecord]: ...

    @abc.abstractmethod
    async def _put_ghosts(self, records: list[GhostRecord]) -> None: ...

    @abc.abstractmethod
    async def _login(self, login_id: str) -> LoginRecord | None: ...

    @abc.abstractmethod
    async def _logins(self, user_id: str | None) -> list[LoginRecord]: ...

    @abc.abstractmethod
    async def _put_login(self, record: LoginRecord) -> None: ...

    @abc.abstractmethod
    async def _delete_login(self, login_id: str) -> None: ...

    @abc.abstractmethod
    async def _messages(self, portal: PortalKey, remote_id: str) -> list[MessageRecord]: ...

    @abc.abstractmethod
    async def _message_by_event(self, event_id: str) -> MessageRecord | None: ...

    @abc.abstractmethod
    async def _put_messages(self, records: list[MessageRecord]) -> None: ...

    @abc.abstractmethod
    async def _claim_event(self, record: MessageRecord) -> bool: ...

    @abc.abstractmethod
    async def _release_event(self, event_id: str) -> None: ...

    @abc.abstractmethod
    async def _delete_messages(self, portal: PortalKey, remote_id: str) -> None: ...

    @abc.abstractmethod
    async def _latest_messages(self, portal: PortalKey, limit: int) -> list[MessageRecord]: ...

    @abc.abstractmethod
    async def _reaction(
        self, portal: PortalKey, remote_id: str, part: str, sender: str, key: str
    ) -> ReactionRecord | None: ...

    @abc.abstractmethod
    async def _reaction_by_event(self, event_id: str) -> ReactionRecord | None: ...

    @abc.abstractmethod
    async def _put_reaction(self, record: ReactionRecord) -> None: ...

    @abc.abstractmethod
    async def _delete_reaction(self, event_id: str) -> None: ...
