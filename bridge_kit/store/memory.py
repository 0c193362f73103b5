"""A store that lives in a Python process and forgets everything on exit; for tests."""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Collection, Iterable, Sequence
from typing import TypeVar

import attrs

from bridge_kit.bridge.records import (
    GhostRecord,
    LoginRecord,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)
from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import (
    Acceptance,
    DeadLetter,
    InboxItem,
    InboxStats,
    ItemKind,
    NewDeadLetter,
    NewInboxItem,
    ParkedItem,
    Parking,
)
from bridge_kit.store.base import Store, room_taken, state_event_from
from bridge_kit.store.state_records import MemberRow, StateRow
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member


class MemoryStore(Store):
    """The :class:`Store` interface over sets and dicts (its hooks; the cleaning is
    the :class:`Store`'s, as for the SQL stores).

    Nothing survives :meth:`close`; use it in tests and dry runs only. No method
    awaits between reading and writing its state, so each is atomic on the loop.
    """

    def __init__(self) -> None:
        self._puppets: set[str] = set()
        # txnId -> (body digest or None, done at); dicts keep insertion order, which is
        # the order transactions were done in (a reused txnId moves to the end).
        self._transactions: dict[str, tuple[bytes | None, float]] = {}
        # lane -> its items by id; ids only grow, so insertion order is arrival order.
        # A lane whose last item went is removed, so every lane here has a head.
        self._lanes: dict[str, dict[int, InboxItem]] = {}
        self._item_lane: dict[int, str] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # lane -> (owner, lease_until)
        self._letters: dict[int, DeadLetter] = {}
        self._parked: dict[int, ParkedItem] = {}  # by the item's inbox id
        self._last_id = 0  # shared by items and letters: ids are never reused
        self._member_rows: dict[tuple[str, str], MemberRow] = {}  # (room, user) -> row
        self._room_state: dict[tuple[str, str], StateRow] = {}  # (room, type) -> row
        self._known_rooms: set[str] = set()
        self._profiles: dict[tuple[str, str], str | None] = {}  # (user, field) -> value
        self._devices: dict[str, dict[str, str | None]] = {}  # user -> device -> name
        self._crypto: dict[tuple[str, str], dict[str, bytes]] = {}  # (owner, kind) -> key -> value
        self._crypto_written: dict[tuple[str, str, str], float] = {}  # (owner, kind, key) -> time
        self._bridge = _BridgeRecords()
        self._open = False

    def __repr__(self) -> str:
        return "MemoryStore()"

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        self._puppets.clear()
        self._transactions.clear()
        self._lanes.clear()
        self._item_lane.clear()
        self._leases.clear()
        self._letters.clear()
        self._parked.clear()
        self._member_rows.clear()
        self._room_state.clear()
        self._known_rooms.clear()
        self._profiles.clear()
        self._devices.clear()
        self._crypto.clear()
        self._crypto_written.clear()
        self._bridge = _BridgeRecords()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("memory store is not open")

    async def _registered_among(self, user_ids: Iterable[str]) -> set[str]:
        self._check_open()
        return self._puppets.intersection(user_ids)

    async def _mark_registered(self, user_ids: list[str]) -> None:
        self._check_open()
        self._puppets.update(user_ids)

    async def _forget_registered(self, user_ids: Iterable[str] | None) -> None:
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
        self._transactions.setdefault(txn_id, (None, time.time()))

    async def _prune_transactions(self, keep: int, max_age: float | None) -> int:
        self._check_open()
        excess = max(len(self._transactions) - keep, 0)
        gone = list(self._transactions)[:excess]
        if max_age is not None:
            cutoff = time.time() - max_age
            # Oldest first, so the aged-out records are a prefix.
            aged = itertools.takewhile(
                lambda txn_id: self._transactions[txn_id][1] < cutoff,
                list(self._transactions)[excess:],
            )
            gone += aged
        for txn_id in gone:
            del self._transactions[txn_id]
        return len(gone)

    async def schema_version(self) -> int:
        self._check_open()
        return self.SCHEMA_VERSION

    # -- the inbox -----------------------------------------------------------

    def _next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def _append(self, new: NewInboxItem, now: float, done: tuple[str, ...] = ()) -> None:
        item_id = self._next_id()
        item = InboxItem(
            item_id, new.lane, new.kind, new.event_json, received_at=now, done_handlers=done
        )
        self._lanes.setdefault(new.lane, {})[item_id] = item
        self._item_lane[item_id] = new.lane

    def _remove(self, item_id: int) -> InboxItem | None:
        lane = self._item_lane.pop(item_id, None)
        if lane is None:
            return None
        items = self._lanes[lane]
        item = items.pop(item_id)
        if not items:
            del self._lanes[lane]
        return item

    def _add_letter(
        self,
        letter: NewDeadLetter,
        first_failed_at: float | None,
        now: float,
        received_at: float | None = None,
    ) -> None:
        letter_id = self._next_id()
        self._letters[letter_id] = DeadLetter(
            id=letter_id,
            lane=letter.lane,
            kind=letter.kind,
            event_json=letter.event_json,
            error=letter.error,
            handler=letter.handler,
            attempts=letter.attempts,
            first_failed_at=first_failed_at if first_failed_at is not None else now,
            last_failed_at=now,
            event_id=letter.event_id,
            event_type=letter.event_type,
            done_handlers=letter.done_handlers,
            received_at=now if received_at is None else received_at,
        )

    async def _accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter],
        digest: bytes,
    ) -> Acceptance:
        self._check_open()
        record = self._transactions.get(txn_id)
        if record is not None and record[0] in (None, digest):
            return Acceptance.DUPLICATE
        now = time.time()
        # A reused txnId is the newest record now: deleted first, it goes to the end.
        self._transactions.pop(txn_id, None)
        self._transactions[txn_id] = (digest, now)
        for item in items:
            if item.kind is ItemKind.OTK_COUNTS:
                self._supersede_counts(item.lane)
            self._append(item, now)
        for letter in rejected:
            self._add_letter(letter, letter.first_failed_at, now)
        return Acceptance.NEW if record is None else Acceptance.REUSED_ID

    def _holder(self, lane: str) -> str | None:
        lease = self._leases.get(lane)
        return None if lease is None else lease[0]

    def _held_by_other(self, lane: str, owner: str, now: float) -> bool:
        lease = self._leases.get(lane)
        return lease is not None and lease[0] != owner and lease[1] > now

    async def _claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str]
    ) -> list[str]:
        self._check_open()
        now = time.time()
        ready: list[tuple[int, str]] = []
        for lane, items in self._lanes.items():
            head = next(iter(items.values()))
            if head.not_before > now or lane in exclude:
                continue
            if not self._held_by_other(lane, owner, now):
                ready.append((head.id, lane))
        claimed = [lane for _, lane in sorted(ready)[:limit]]
        for lane in claimed:
            self._leases[lane] = (owner, now + lease)
        return claimed

    async def _renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        self._check_open()
        until = time.time() + lease
        held = {lane for lane in lanes if self._holder(lane) == owner}
        for lane in held:
            self._leases[lane] = (owner, until)
        return held

    async def _release_lane(self, owner: str, lane: str) -> None:
        self._check_open()
        if self._holder(lane) == owner:
            del self._leases[lane]

    async def _lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        self._check_open()
        return list(self._lanes.get(lane, {}).values())[:limit]

    async def complete_item(self, item_id: int) -> None:
        self._check_open()
        self._remove(item_id)

    async def complete_items(self, item_ids: Collection[int]) -> None:
        self._check_open()
        for item_id in item_ids:
            self._remove(item_id)

    async def fail_item(
        self,
        item_id: int,
        done_handlers: Sequence[str],
        not_before: float,
        *,
        count_attempt: bool = True,
    ) -> None:
        self._check_open()
        lane = self._item_lane.get(item_id)
        if lane is None:
            return
        item = self._lanes[lane][item_id]
        first = item.first_failed_at if item.first_failed_at is not None else time.time()
        self._lanes[lane][item_id] = attrs.evolve(
            item,
            attempts=item.attempts + count_attempt,
            done_handlers=tuple(done_handlers),
            not_before=not_before,
            first_failed_at=first,
        )

    async def _bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        self._check_open()
        item = self._remove(item_id)
        if item is None:
            return  # completed or buried already, by a worker whose lease ran out
        first = letter.first_failed_at
        first = first if first is not None else item.first_failed_at
        self._add_letter(letter, first, time.time(), item.received_at)

    async def _dead_letters(self, limit: int | None) -> list[DeadLetter]:
        self._check_open()
        letters = list(self._letters.values())
        return letters if limit is None else letters[:limit]

    def _letter_ids(self, ids: Collection[int] | None) -> list[int]:
        if ids is None:
            return list(self._letters)
        return sorted(set(ids) & self._letters.keys())

    async def replay_dead_letters(
        self, ids: Collection[int] | None = None, *, all_handlers: bool = False
    ) -> int:
        self._check_open()
        now = time.time()
        chosen = self._letter_ids(ids)
        for letter_id in chosen:
            letter = self._letters.pop(letter_id)
            arrived = now if letter.received_at is None else letter.received_at
            done = () if all_handlers else letter.done_handlers
            self._append(NewInboxItem(letter.lane, letter.kind, letter.event_json), arrived, done)
        return len(chosen)

    async def drop_dead_letters(self, ids: Collection[int] | None = None) -> int:
        self._check_open()
        chosen = self._letter_ids(ids)
        for letter_id in chosen:
            del self._letters[letter_id]
        return len(chosen)

    def _supersede_counts(self, lane: str) -> None:
        """A device's new key counts replace its older ones still waiting."""
        for item_id, item in list(self._lanes.get(lane, {}).items()):
            if item.kind is ItemKind.OTK_COUNTS:
                self._remove(item_id)

    async def _prune_dead_letters(self, keep: int, before: float) -> int:
        self._check_open()
        newest = set(list(self._letters)[-keep:]) if keep else set()
        gone = [
            letter_id
            for letter_id, letter in self._letters.items()
            if letter.last_failed_at < before or letter_id not in newest
        ]
        for letter_id in gone:
            del self._letters[letter_id]
        return len(gone)

    async def _prune_crypto(self, kind: str, before: float) -> int:
        self._check_open()
        old = [
            (owner, what, key)
            for (owner, what, key), written in self._crypto_written.items()
            if what == kind and written < before
        ]
        for owner, what, key in old:
            await self._crypto_delete(owner, what, key)
        return len(old)

    async def to_device_since(self) -> float | None:
        self._check_open()
        kind = ItemKind.TO_DEVICE
        items = (item for lane in self._lanes.values() for item in lane.values())
        times = [item.received_at for item in items if item.kind is kind]
        times += [
            letter.received_at or 0.0 for letter in self._letters.values() if letter.kind is kind
        ]
        return min(times, default=None)

    async def inbox_stats(self) -> InboxStats:
        self._check_open()
        items = (item for lane in self._lanes.values() for item in lane.values())
        oldest = min((item.received_at for item in items), default=None)
        return InboxStats(len(self._item_lane), oldest, len(self._letters))

    # -- parked items --------------------------------------------------------

    async def _park_item(self, item_id: int, parking: Parking) -> bool:
        self._check_open()
        item = self._remove(item_id)
        if item is None:
            return False
        self._parked[item_id] = ParkedItem(item, parking)
        return True

    async def _unpark_items(self, key: str) -> int:
        self._check_open()
        ids = sorted(i for i, parked in self._parked.items() if parked.parking.key == key)
        for item_id in ids:
            parked = self._parked.pop(item_id)
            self._return_to_lane(parked)
        return len(ids)

    def _return_to_lane(self, parked: ParkedItem) -> None:
        new_id = self._next_id()
        item = attrs.evolve(
            parked.item,
            id=new_id,
            done_handlers=parked.parking.done_handlers,
            not_before=0.0,
            first_failed_at=parked.parking.first_failed_at,
        )
        self._lanes.setdefault(item.lane, {})[new_id] = item
        self._item_lane[new_id] = item.lane

    async def _parked_items(
        self, key: str | None, due_by: float | None, limit: int
    ) -> list[ParkedItem]:
        self._check_open()
        chosen = [
            parked
            for _, parked in sorted(self._parked.items())
            if (key is None or parked.parking.key == key)
            and (due_by is None or parked.parking.give_up_at <= due_by)
        ]
        return chosen[:limit]

    async def count_parked(self) -> int:
        self._check_open()
        return len(self._parked)

    async def _bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        self._check_open()
        parked = self._parked.pop(item_id, None)
        if parked is None:
            return False
        first = letter.first_failed_at
        first = first if first is not None else parked.parking.first_failed_at
        self._add_letter(letter, first, time.time(), parked.item.received_at)
        return True

    # -- room state ----------------------------------------------------------

    async def _apply_state(
        self, members: list[MemberRow], states: list[StateRow], known: str | None
    ) -> None:
        self._check_open()
        for member in members:
            old = self._member_rows.get((member.room_id, member.user_id))
            if old is None or member.origin_ts >= old.origin_ts:  # the stale-state rule
                self._member_rows[member.room_id, member.user_id] = member
        for state in states:
            old_state = self._room_state.get((state.room_id, state.event_type))
            if old_state is None or state.origin_ts >= old_state.origin_ts:
                self._room_state[state.room_id, state.event_type] = state
        if known is not None:
            self._known_rooms.add(known)

    async def _membership(self, room_id: str, user_id: str) -> Member | None:
        self._check_open()
        row = self._member_rows.get((room_id, user_id))
        return None if row is None else row.member

    async def _members(self, room_id: str, membership: str) -> dict[str, Member]:
        self._check_open()
        # A scan: this store is for tests, where rooms hold a handful of members.
        return {
            user: row.member
            for (row_room, user), row in self._member_rows.items()
            if row_room == room_id and row.member.membership == membership
        }

    async def _state_event(self, room_id: str, event_type: str) -> Event | None:
        self._check_open()
        row = self._room_state.get((room_id, event_type))
        if row is None:
            return None
        return state_event_from(
            row.room_id, event_type, row.content_json, row.sender, row.origin_ts
        )

    async def _room_state_known(self, room_id: str) -> bool:
        self._check_open()
        return room_id in self._known_rooms

    async def _profile(self, user_id: str) -> dict[str, str | None]:
        self._check_open()
        return {field: value for (who, field), value in self._profiles.items() if who == user_id}

    async def _set_profiles(self, rows: list[tuple[str, str, str | None]]) -> None:
        self._check_open()
        self._profiles.update({(user, field): value for user, field, value in rows})

    # -- devices and crypto state -------------------------------------------

    async def _remember_device(
        self, user_id: str, device_id: str, display_name: str | None
    ) -> None:
        self._check_open()
        devices = self._devices.setdefault(user_id, {})
        if display_name is not None or device_id not in devices:
            devices[device_id] = display_name

    async def _forget_device(self, user_id: str, device_id: str) -> None:
        self._check_open()
        devices = self._devices.get(user_id, {})
        devices.pop(device_id, None)
        if not devices:
            self._devices.pop(user_id, None)

    async def _known_devices(self, user_id: str) -> dict[str, str | None]:
        self._check_open()
        return dict(self._devices.get(user_id, {}))

    async def _crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        self._check_open()
        return self._crypto.get((owner, kind), {}).get(key)

    async def _crypto_put_many(self, owner: str, kind: str, items: dict[str, bytes]) -> None:
        self._check_open()
        self._crypto.setdefault((owner, kind), {}).update(items)
        now = time.time()
        self._crypto_written.update({(owner, kind, key): now for key in items})

    async def _crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        self._check_open()
        return dict(self._crypto.get((owner, kind), {}))

    async def _crypto_delete(self, owner: str, kind: str, key: str) -> None:
        self._check_open()
        values = self._crypto.get((owner, kind), {})
        values.pop(key, None)
        self._crypto_written.pop((owner, kind, key), None)
        if not values:
            self._crypto.pop((owner, kind), None)

    async def _joined_among(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        self._check_open()
        return {
            pair
            for pair in pairs
            if (row := self._member_rows.get(pair)) is not None and row.member.membership == "join"
        }

    async def _profiles_among(self, user_ids: list[str]) -> dict[str, dict[str, str | None]]:
        self._check_open()
        wanted = set(user_ids)
        profiles: dict[str, dict[str, str | None]] = {}
        # A scan, as members() does: this store is for tests.
        for (who, field), value in self._profiles.items():
            if who in wanted:
                profiles.setdefault(who, {})[field] = value
        return profiles

    # -- the bridge layer's records ------------------------------------------------

    async def _portal(self, key: PortalKey) -> PortalRecord | None:
        self._check_open()
        return _fresh_or_none(self._bridge.portals.get(key))

    async def _portal_by_room(self, room_id: str) -> PortalRecord | None:
        self._check_open()
        key = self._bridge.portal_rooms.get(room_id)
        return None if key is None else _fresh(self._bridge.portals[key])

    async def _portals(self) -> list[PortalRecord]:
        self._check_open()
        return [_fresh(self._bridge.portals[key]) for key in sorted(self._bridge.portals)]

    async def _put_portal(self, record: PortalRecord) -> None:
        self._check_open()
        self._bridge.put_portal(record)

    async def _claim_portal_room(self, key: PortalKey, room_id: str) -> str:
        self._check_open()
        portal = self._bridge.portals.get(key)
        if portal is not None and portal.room_id is not None:
            return portal.room_id
        self._bridge.put_portal(attrs.evolve(portal or PortalRecord(key), room_id=room_id))
        return room_id

    async def _put_roomless_portal(self, record: PortalRecord) -> bool:
        self._check_open()
        portal = self._bridge.portals.get(record.key)
        if portal is not None and portal.room_id is not None:
            return False
        self._bridge.put_portal(record)
        return True

    async def _delete_portal(self, key: PortalKey) -> None:
        self._check_open()
        self._bridge.delete_portal(key)

    async def _ghosts_among(self, ids: list[str]) -> dict[str, GhostRecord]:
        self._check_open()
        ghosts = self._bridge.ghosts
        return {ghost_id: _fresh(ghosts[ghost_id]) for ghost_id in ids if ghost_id in ghosts}

    async def _put_ghosts(self, records: list[GhostRecord]) -> None:
        self._check_open()
        self._bridge.ghosts.update((record.id, record) for record in records)

    async def _login(self, login_id: str) -> LoginRecord | None:
        self._check_open()
        return _fresh_or_none(self._bridge.logins.get(login_id))

    async def _logins(self, user_id: str | None) -> list[LoginRecord]:
        self._check_open()
        logins = self._bridge.logins
        return [
            _fresh(logins[login_id])
            for login_id in sorted(logins)
            if user_id is None or logins[login_id].user_id == user_id
        ]

    async def _put_login(self, record: LoginRecord) -> None:
        self._check_open()
        self._bridge.logins[record.id] = record

    async def _delete_login(self, login_id: str) -> None:
        self._check_open()
        self._bridge.logins.pop(login_id, None)

    async def _messages(self, portal: PortalKey, remote_id: str) -> list[MessageRecord]:
        self._check_open()
        return sorted(self._bridge.messages_of(portal, remote_id), key=lambda m: m.part)

    async def _message_by_event(self, event_id: str) -> MessageRecord | None:
        self._check_open()
        return self._bridge.messages.get(event_id)

    async def _put_messages(self, records: list[MessageRecord]) -> None:
        self._check_open()
        for record in records:
            self._bridge.put_message(record)

    async def _claim_event(self, record: MessageRecord) -> bool:
        self._check_open()
        bridge = self._bridge
        if record.event_id in bridge.messages:
            return False
        if not record.pending and bridge.mapped_event(record) is not None:
            return False
        bridge.put_message(record)
        return True

    async def _release_event(self, event_id: str) -> None:
        self._check_open()
        claim = self._bridge.messages.get(event_id)
        if claim is not None and claim.pending:
            self._bridge.delete_message(claim)

    async def _delete_messages(self, portal: PortalKey, remote_id: str) -> None:
        self._check_open()
        self._bridge.delete_messages(portal, remote_id)

    async def _latest_messages(self, portal: PortalKey, limit: int) -> list[MessageRecord]:
        self._check_open()
        mapped = (
            message
            for message in self._bridge.messages.values()
            if message.portal == portal and not message.pending
        )
        # Newest first, ties broken by event id as the SQL stores do, then oldest first.
        newest = sorted(mapped, key=lambda m: (m.timestamp, m.event_id), reverse=True)[:limit]
        return newest[::-1]

    async def _reaction(
        self, portal: PortalKey, remote_id: str, part: str, sender: str, key: str
    ) -> ReactionRecord | None:
        self._check_open()
        return self._bridge.reactions.get((portal, remote_id, part, sender, key))

    async def _reaction_by_event(self, event_id: str) -> ReactionRecord | None:
        self._check_open()
        reaction_key = self._bridge.reaction_events.get(event_id)
        return None if reaction_key is None else self._bridge.reactions[reaction_key]

    async def _put_reaction(self, record: ReactionRecord) -> None:
        self._check_open()
        self._bridge.put_reaction(record)

    async def _delete_reaction(self, event_id: str) -> None:
        self._check_open()
        reaction_key = self._bridge.reaction_events.pop(event_id, None)
        if reaction_key is not None:
            del self._bridge.reactions[reaction_key]


#: A remote message's place in the map: (portal, remote id).
_RemoteKey = tuple[PortalKey, str]
#: A reaction's place: (portal, remote id, part, sender, key).
_ReactionKey = tuple[PortalKey, str, str, str, str]

_WithMetadata = TypeVar("_WithMetadata", PortalRecord, GhostRecord, LoginRecord)


def _fresh(record: _WithMetadata) -> _WithMetadata:
    """``record`` with its own copy of the metadata, so a caller changing it does not
    change the store (the SQL stores hand out fresh dicts too)."""
    if not record.metadata:
        return record
    return attrs.evolve(record, metadata=copy.deepcopy(record.metadata))


def _fresh_or_none(record: _WithMetadata | None) -> _WithMetadata | None:
    return None if record is None else _fresh(record)


def _remote_of(message: MessageRecord) -> _RemoteKey:
    return (message.portal, message.remote_id)


def _reacted_to(reaction: ReactionRecord) -> _ReactionKey:
    return (reaction.portal, reaction.remote_id, reaction.part, reaction.sender, reaction.key)


@attrs.define
class _BridgeRecords:
    """The bridge layer's records and their indexes, each kept in step with the
    others as the SQL stores' unique indexes keep their tables."""

    portals: dict[PortalKey, PortalRecord] = attrs.field(factory=dict)
    portal_rooms: dict[str, PortalKey] = attrs.field(factory=dict)
    ghosts: dict[str, GhostRecord] = attrs.field(factory=dict)
    logins: dict[str, LoginRecord] = attrs.field(factory=dict)
    messages: dict[str, MessageRecord] = attrs.field(factory=dict)  # by event id
    # The parts that are not pending: (portal, remote id) -> part -> event id.
    remote_parts: dict[_RemoteKey, dict[str, str]] = attrs.field(factory=dict)
    reactions: dict[_ReactionKey, ReactionRecord] = attrs.field(factory=dict)
    reaction_events: dict[str, _ReactionKey] = attrs.field(factory=dict)

    def put_portal(self, record: PortalRecord) -> None:
        owner = self.portal_rooms.get(record.room_id) if record.room_id is not None else None
        if owner is not None and owner != record.key:
            raise room_taken(record.room_id or "", owner)
        old = self.portals.get(record.key)
        if old is not None and old.room_id is not None:
            del self.portal_rooms[old.room_id]
        self.portals[record.key] = record
        if record.room_id is not None:
            self.portal_rooms[record.room_id] = record.key

    def delete_portal(self, key: PortalKey) -> None:
        old = self.portals.pop(key, None)
        if old is not None and old.room_id is not None:
            del self.portal_rooms[old.room_id]
        for message in [m for m in self.messages.values() if m.portal == key]:
            self.delete_message(message)
        for reaction in [r for r in self.reactions.values() if r.portal == key]:
            self.delete_reaction(reaction)

    def messages_of(self, portal: PortalKey, remote_id: str) -> list[MessageRecord]:
        parts = self.remote_parts.get((portal, remote_id), {})
        return [self.messages[event_id] for event_id in parts.values()]

    def mapped_event(self, record: MessageRecord) -> str | None:
        """The event the remote part of ``record`` maps to, if any."""
        return self.remote_parts.get(_remote_of(record), {}).get(record.part)

    def put_message(self, record: MessageRecord) -> None:
        """Insert or replace by event id; a mapped part another event had is the new
        event's now (the SQL stores' unique index on parts that are not pending)."""
        old = self.messages.get(record.event_id)
        if old is not None:
            self.delete_message(old)
        if not record.pending:
            other = self.mapped_event(record)
            if other is not None:
                self.delete_message(self.messages[other])
            self.remote_parts.setdefault(_remote_of(record), {})[record.part] = record.event_id
        self.messages[record.event_id] = record

    def delete_message(self, message: MessageRecord) -> None:
        del self.messages[message.event_id]
        if message.pending:
            return
        parts = self.remote_parts[_remote_of(message)]
        del parts[message.part]
        if not parts:
            del self.remote_parts[_remote_of(message)]

    def delete_messages(self, portal: PortalKey, remote_id: str) -> None:
        """Every part of a remote message, and every reaction to one of its parts."""
        for message in self.messages_of(portal, remote_id):
            self.delete_message(message)
        for reaction in list(self.reactions.values()):
            if reaction.portal == portal and reaction.remote_id == remote_id:
                self.delete_reaction(reaction)

    def put_reaction(self, record: ReactionRecord) -> None:
        old_key = self.reaction_events.get(record.event_id)
        if old_key is not None:
            del self.reactions[old_key]
        old = self.reactions.get(_reacted_to(record))
        if old is not None:
            del self.reaction_events[old.event_id]
        self.reactions[_reacted_to(record)] = record
        self.reaction_events[record.event_id] = _reacted_to(record)

    def delete_reaction(self, reaction: ReactionRecord) -> None:
        del self.reactions[_reacted_to(reaction)]
        del self.reaction_events[reaction.event_id]
