"""A store that lives in a Python process and forgets everything on exit; for tests."""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Iterable, Mapping, Sequence

import attrs

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
from bridge_kit.store.base import (
    Store,
    check_limit,
    checked_ids,
    checked_items,
    checked_text,
    cleaned_ids,
    cleaned_pairs,
    crypto_scope,
    state_event_from,
    storable_ids,
)
from bridge_kit.store.inbox_rows import clean_text, optional_text
from bridge_kit.store.state_records import MemberRow, StateRow, known_room, rows_of
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member


class MemoryStore(Store):
    """The :class:`Store` interface over sets and dicts.

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
        self._members: dict[tuple[str, str], MemberRow] = {}  # (room, user) -> row
        self._room_state: dict[tuple[str, str], StateRow] = {}  # (room, type) -> row
        self._known_rooms: set[str] = set()
        self._profiles: dict[tuple[str, str], str | None] = {}  # (user, field) -> value
        self._devices: dict[str, dict[str, str | None]] = {}  # user -> device -> name
        self._crypto: dict[tuple[str, str], dict[str, bytes]] = {}  # (owner, kind) -> key -> value
        self._crypto_written: dict[tuple[str, str, str], float] = {}  # (owner, kind, key) -> time
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
        self._members.clear()
        self._room_state.clear()
        self._known_rooms.clear()
        self._profiles.clear()
        self._devices.clear()
        self._crypto.clear()
        self._crypto_written.clear()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("memory store is not open")

    async def registered_among(self, user_ids: Iterable[str]) -> set[str]:
        self._check_open()
        return self._puppets.intersection(storable_ids(user_ids))

    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        self._check_open()
        self._puppets.update(checked_ids(user_ids))

    async def forget_registered(self, user_ids: Iterable[str] | None = None) -> None:
        self._check_open()
        if user_ids is None:
            self._puppets.clear()
        else:
            self._puppets.difference_update(storable_ids(user_ids))

    async def count_registered(self) -> int:
        self._check_open()
        return len(self._puppets)

    async def is_transaction_done(self, txn_id: str) -> bool:
        self._check_open()
        return txn_id in self._transactions

    async def mark_transaction_done(self, txn_id: str) -> None:
        self._check_open()
        self._transactions.setdefault(txn_id, (None, time.time()))

    async def prune_transactions(self, keep: int, max_age: float | None = None) -> int:
        self._check_open()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
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

    async def accept_transaction(
        self,
        txn_id: str,
        items: Sequence[NewInboxItem],
        rejected: Sequence[NewDeadLetter] = (),
        *,
        digest: bytes = b"",
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

    async def claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        self._check_open()
        check_limit(limit)
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

    async def renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        self._check_open()
        until = time.time() + lease
        held = {lane for lane in lanes if self._holder(lane) == owner}
        for lane in held:
            self._leases[lane] = (owner, until)
        return held

    async def release_lane(self, owner: str, lane: str) -> None:
        self._check_open()
        if self._holder(lane) == owner:
            del self._leases[lane]

    async def lane_items(self, lane: str, limit: int) -> list[InboxItem]:
        self._check_open()
        check_limit(limit)
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

    async def bury_item(self, item_id: int, letter: NewDeadLetter) -> None:
        self._check_open()
        item = self._remove(item_id)
        if item is None:
            return  # completed or buried already, by a worker whose lease ran out
        first = letter.first_failed_at
        first = first if first is not None else item.first_failed_at
        self._add_letter(letter, first, time.time(), item.received_at)

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        self._check_open()
        letters = list(self._letters.values())
        if limit is not None:
            check_limit(limit)
            letters = letters[:limit]
        return letters

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

    async def prune_dead_letters(self, keep: int, before: float) -> int:
        self._check_open()
        check_limit(keep, "keep")
        newest = set(list(self._letters)[-keep:]) if keep else set()
        gone = [
            letter_id
            for letter_id, letter in self._letters.items()
            if letter.last_failed_at < before or letter_id not in newest
        ]
        for letter_id in gone:
            del self._letters[letter_id]
        return len(gone)

    async def prune_crypto(self, kind: str, before: float) -> int:
        self._check_open()
        old = [
            (owner, what, key)
            for (owner, what, key), written in self._crypto_written.items()
            if what == kind and written < before
        ]
        for owner, what, key in old:
            await self.crypto_delete(owner, what, key)
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

    async def park_item(self, item_id: int, parking: Parking) -> bool:
        self._check_open()
        item = self._remove(item_id)
        if item is None:
            return False
        self._parked[item_id] = ParkedItem(item, parking)
        return True

    async def unpark_items(self, key: str) -> int:
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

    async def parked_items(
        self, *, key: str | None = None, due_by: float | None = None, limit: int = 100
    ) -> list[ParkedItem]:
        self._check_open()
        check_limit(limit)
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

    async def bury_parked(self, item_id: int, letter: NewDeadLetter) -> bool:
        self._check_open()
        parked = self._parked.pop(item_id, None)
        if parked is None:
            return False
        first = letter.first_failed_at
        first = first if first is not None else parked.parking.first_failed_at
        self._add_letter(letter, first, time.time(), parked.item.received_at)
        return True

    # -- room state ----------------------------------------------------------

    async def apply_state(
        self, room_id: str, events: Iterable[Event], *, complete: bool = False
    ) -> None:
        self._check_open()
        members, states = rows_of(room_id, events)
        for member in members:
            old = self._members.get((member.room_id, member.user_id))
            if old is None or member.origin_ts >= old.origin_ts:  # the stale-state rule
                self._members[member.room_id, member.user_id] = member
        for state in states:
            old_state = self._room_state.get((state.room_id, state.event_type))
            if old_state is None or state.origin_ts >= old_state.origin_ts:
                self._room_state[state.room_id, state.event_type] = state
        known = known_room(room_id, states, complete)
        if known is not None:
            self._known_rooms.add(known)

    async def membership(self, room_id: str, user_id: str) -> Member | None:
        self._check_open()
        row = self._members.get((clean_text(room_id), clean_text(user_id)))
        return None if row is None else row.member

    async def members(self, room_id: str, membership: str = "join") -> dict[str, Member]:
        self._check_open()
        room = clean_text(room_id)
        # A scan: this store is for tests, where rooms hold a handful of members.
        return {
            user: row.member
            for (row_room, user), row in self._members.items()
            if row_room == room and row.member.membership == membership
        }

    async def state_event(self, room_id: str, event_type: str) -> Event | None:
        self._check_open()
        row = self._room_state.get((clean_text(room_id), event_type))
        if row is None:
            return None
        return state_event_from(
            row.room_id, event_type, row.content_json, row.sender, row.origin_ts
        )

    async def room_state_known(self, room_id: str) -> bool:
        self._check_open()
        return clean_text(room_id) in self._known_rooms

    async def profile(self, user_id: str) -> dict[str, str | None]:
        self._check_open()
        user = clean_text(user_id)
        return {field: value for (who, field), value in self._profiles.items() if who == user}

    async def set_profile(self, user_id: str, field: str, value: str | None) -> None:
        self._check_open()
        self._profiles[clean_text(user_id), field] = None if value is None else clean_text(value)

    # -- devices and crypto state -------------------------------------------

    async def remember_device(self, user_id: str, device_id: str, display_name: str | None) -> None:
        self._check_open()
        user, device = checked_text(user_id, "user ID"), checked_text(device_id, "device ID")
        devices = self._devices.setdefault(user, {})
        if display_name is not None or device not in devices:
            devices[device] = optional_text(display_name)

    async def forget_device(self, user_id: str, device_id: str) -> None:
        self._check_open()
        user, device = checked_text(user_id, "user ID"), checked_text(device_id, "device ID")
        devices = self._devices.get(user, {})
        devices.pop(device, None)
        if not devices:
            self._devices.pop(user, None)

    async def known_devices(self, user_id: str) -> dict[str, str | None]:
        self._check_open()
        return dict(self._devices.get(checked_text(user_id, "user ID"), {}))

    async def crypto_get(self, owner: str, kind: str, key: str) -> bytes | None:
        self._check_open()
        return self._crypto.get(crypto_scope(owner, kind), {}).get(checked_text(key, "crypto key"))

    async def crypto_put(self, owner: str, kind: str, key: str, value: bytes) -> None:
        await self.crypto_put_many(owner, kind, {key: value})

    async def crypto_put_many(self, owner: str, kind: str, items: Mapping[str, bytes]) -> None:
        self._check_open()
        scope, batch = crypto_scope(owner, kind), checked_items(items)
        if batch:
            self._crypto.setdefault(scope, {}).update(batch)
            now = time.time()
            self._crypto_written.update({(*scope, key): now for key in batch})

    async def crypto_items(self, owner: str, kind: str) -> dict[str, bytes]:
        self._check_open()
        return dict(self._crypto.get(crypto_scope(owner, kind), {}))

    async def crypto_delete(self, owner: str, kind: str, key: str) -> None:
        self._check_open()
        scope = crypto_scope(owner, kind)
        values = self._crypto.get(scope, {})
        which = checked_text(key, "crypto key")
        values.pop(which, None)
        self._crypto_written.pop((*scope, which), None)
        if not values:
            self._crypto.pop(scope, None)

    async def joined_among(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        self._check_open()
        found: set[tuple[str, str]] = set()
        for key, pair in cleaned_pairs(pairs).items():
            row = self._members.get(key)
            if row is not None and row.member.membership == "join":
                found.add(pair)
        return found

    async def profiles_among(self, user_ids: Iterable[str]) -> dict[str, dict[str, str | None]]:
        self._check_open()
        wanted = cleaned_ids(user_ids)
        profiles: dict[str, dict[str, str | None]] = {}
        # A scan, as members() does: this store is for tests.
        for (who, field), value in self._profiles.items():
            if who in wanted:
                profiles.setdefault(wanted[who], {})[field] = value
        return profiles

    async def set_profiles(self, values: Iterable[tuple[str, str, str | None]]) -> None:
        for user_id, field, value in values:
            await self.set_profile(user_id, field, value)
