"""Megolm room keys: inbound sessions from ``m.room_key`` to decrypt room events,
and the outbound session of each room, with the room's rotation settings.

Inbound sessions are keyed by (room, sender key, session id), as the spec does:
anyone who got a room key can share the same session as their own, and that copy
(kept under its sender's key) neither replaces nor blocks the real sender's.
Releases before kept them by (room, session id); such a record moves to its new
key the first time it is looked up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import vodozemac

from bridge_kit._json import decode_json
from bridge_kit.crypto.account import MEGOLM_ALGORITHM, OlmAccount
from bridge_kit.crypto.olm import OlmPayload
from bridge_kit.crypto.payloads import MegolmEncryptedContent, MegolmPlaintext, RoomKeyContent
from bridge_kit.crypto.records import (
    InboundSessionRecord,
    OutboundSessionRecord,
    ReservedIndexes,
)
from bridge_kit.crypto.signing import canonical_json
from bridge_kit.crypto.vault import CryptoVault
from bridge_kit.errors import NoRoomKey, UndecryptableEvent
from bridge_kit.store.retention import REPLAY_RECORDS
from bridge_kit.types.converter import converter

__all__ = [
    "DecryptedRoomEvent",
    "InboundGroupSessions",
    "OutboundGroupSessions",
    "OutboundSession",
    "RotationSettings",
]

_INBOUND: Final = "megolm_inbound"
#: The sender keys that shared each (room, session id): for an event without a sender_key.
_SHARERS: Final = "megolm_sharers"
_SEEN: Final = REPLAY_RECORDS  # pruned by age (bridge_kit.store.retention)
_OUTBOUND: Final = "megolm_outbound"
#: The longest jump over reserved indexes a loaded session makes; a record asking
#: for more is not believed: the session rotates instead.
_MAX_SKIP: Final = 10_000
_RELATION: Final = "m.relates_to"
#: Inbound sessions kept in memory (each a few hundred bytes of ratchet state).
_CACHED_SESSIONS: Final = 10_000


@attrs.frozen
class DecryptedRoomEvent:
    """The inner event of a room ``m.room.encrypted`` and where its key came from."""

    type: str
    content: dict[str, Any]
    sender_key: str
    """The curve25519 key of the device that shared the room key."""
    sender_ed25519: str
    session_id: str
    message_index: int


@attrs.frozen
class _Inbound:
    session: vodozemac.InboundGroupSession
    sender: str
    sender_key: str
    sender_ed25519: str
    own: bool = False
    """Our own outbound session: any of our users (puppets) may have sent with it."""


def _reserved_key(room_id: str) -> str:
    """Where a room's promised indexes are kept: beside its outbound session (the same
    kind, so both go in one commit), joined with ``|`` as every key here."""
    return f"{room_id}|reserved"


def _stored_key(room_id: str, sender_key: str, session_id: str) -> str:
    return f"{room_id}|{sender_key}|{session_id}"


def _room_key_fields(content: Mapping[str, Any]) -> tuple[str, str, str]:
    if content.get("algorithm") != MEGOLM_ALGORITHM:
        raise UndecryptableEvent(f"room key of unsupported algorithm {content.get('algorithm')!r}")
    fields = content.get("room_id"), content.get("session_id"), content.get("session_key")
    if not all(isinstance(f, str) for f in fields):
        raise UndecryptableEvent("the room key has no room_id, session_id or session_key")
    return fields  # type: ignore[return-value]


class InboundGroupSessions:
    """Room keys others shared with us, by room, sender key and session id.

    ``ours(user_id)`` says whether a user sends with our own sessions (the bridge's
    puppets and bot); by default only the account's own user does.
    """

    def __init__(self, vault: CryptoVault, ours: Callable[[str], bool] | None = None) -> None:
        self.vault = vault
        self.ours = ours
        # The recently used sessions; the rest are read back from the store.
        self._cache: OrderedDict[tuple[str, str, str], _Inbound] = OrderedDict()
        # Whose copy :meth:`find` last found, by (room, session, sender): a session's
        # list of sharers only grows, so the first copy that fits stays the first.
        self._found: OrderedDict[tuple[str, str, str | None], str] = OrderedDict()

    async def get(self, room_id: str, sender_key: str, session_id: str) -> _Inbound | None:
        """The session ``session_id`` as the device of ``sender_key`` shared it."""
        key = (room_id, sender_key, session_id)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        record = await self.vault.get_record(
            _INBOUND, _stored_key(room_id, sender_key, session_id), InboundSessionRecord
        )
        if record is None:
            record = await self._migrated(room_id, session_id, sender_key)
        if record is None:
            return None
        session = self.vault.unseal(
            vodozemac.InboundGroupSession.from_pickle,
            record.pickle.encode("ascii"),
            "Megolm session",
        )
        inbound = _Inbound(session, record.sender, record.sender_key, record.ed25519, record.own)
        self._remember(key, inbound)
        return inbound

    async def find(
        self, room_id: str, session_id: str, sender: str | None = None
    ) -> _Inbound | None:
        """The session ``session_id`` as one of ``sender``'s devices shared it (or our
        own, for our users); any copy when ``sender`` is None. For an event that names
        no sender key, and for the events waiting for a sender's key."""
        found_key = (room_id, session_id, sender)
        known = self._found.get(found_key)
        if known is not None:
            inbound = await self.get(room_id, known, session_id)
            if inbound is not None and (sender is None or self._may_send(inbound, sender)):
                self._found.move_to_end(found_key)
                return inbound
        sharers = await self._sharers(room_id, session_id)
        if not sharers:
            legacy = await self._migrated(room_id, session_id)
            sharers = [] if legacy is None else [legacy.sender_key]
        for sender_key in sharers:
            inbound = await self.get(room_id, sender_key, session_id)
            if inbound is not None and (sender is None or self._may_send(inbound, sender)):
                self._found[found_key] = sender_key
                if len(self._found) > _CACHED_SESSIONS:
                    self._found.popitem(last=False)
                return inbound
        return None

    async def _sharers(self, room_id: str, session_id: str) -> list[str]:
        found = await self.vault.get_record(_SHARERS, f"{room_id}|{session_id}", list[str])
        return found or []

    async def _migrated(
        self, room_id: str, session_id: str, sender_key: str | None = None
    ) -> InboundSessionRecord | None:
        """A session stored by (room, session id) only, by an earlier release, moved to
        its (room, sender key, session id) key; None if there is none (for ``sender_key``)."""
        legacy = f"{room_id}|{session_id}"
        record = await self.vault.get_record(_INBOUND, legacy, InboundSessionRecord)
        if record is None or sender_key not in (None, record.sender_key):
            return None
        await self._put(room_id, session_id, record)
        await self.vault.delete(_INBOUND, legacy)
        return record

    def _remember(self, key: tuple[str, str, str], inbound: _Inbound) -> None:
        self._cache[key] = inbound
        self._cache.move_to_end(key)
        if len(self._cache) > _CACHED_SESSIONS:
            self._cache.popitem(last=False)

    async def add_room_key(self, payload: OlmPayload) -> tuple[str, str] | None:
        """Take in an ``m.room_key`` that arrived over Olm; return its (room, session)
        ids if it is new from its sender device, or starts at an earlier index than
        the copy known from that device."""
        room_id, session_id, session_key = _room_key_fields(payload.content)
        try:
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key))
        except ValueError as exc:
            raise UndecryptableEvent(f"invalid room key: {exc}") from None
        if session.session_id != session_id:
            raise UndecryptableEvent("the room key's session_id does not match its key")
        if self.vault.store.crypto_shared:
            # Another daemon may have stored a better copy than the one cached here,
            # which this one must not write over.
            self._cache.pop((room_id, payload.sender_key, session_id), None)
        known = await self.get(room_id, payload.sender_key, session_id)
        if known is not None and known.session.first_known_index <= session.first_known_index:
            return None
        await self.add(room_id, session, payload.sender, payload.sender_key, payload.sender_ed25519)
        return room_id, session_id

    async def add(
        self,
        room_id: str,
        session: vodozemac.InboundGroupSession,
        sender: str,
        sender_key: str,
        sender_ed25519: str,
        *,
        own: bool = False,
    ) -> None:
        pickle = self.vault.seal(session).decode("ascii")
        record = InboundSessionRecord(pickle, sender, sender_key, sender_ed25519, own)
        await self._put(room_id, session.session_id, record)
        self._remember(
            (room_id, sender_key, session.session_id),
            _Inbound(session, sender, sender_key, sender_ed25519, own),
        )

    async def _put(self, room_id: str, session_id: str, record: InboundSessionRecord) -> None:
        key = _stored_key(room_id, record.sender_key, session_id)
        await self.vault.put_record(_INBOUND, key, record)
        sharers = await self._sharers(room_id, session_id)
        if record.sender_key not in sharers:
            sharers.append(record.sender_key)
            await self.vault.put_record(_SHARERS, f"{room_id}|{session_id}", sharers)

    async def decrypt(
        self, room_id: str, event_id: str, sender: str, content: Mapping[str, Any]
    ) -> DecryptedRoomEvent:
        """Decrypt a room event's ``m.megolm.v1.aes-sha2`` content; :class:`NoRoomKey`
        when its session is unknown, :class:`UndecryptableEvent` for anything wrong."""
        if content.get("algorithm") != MEGOLM_ALGORITHM:
            raise UndecryptableEvent(f"unsupported algorithm {content.get('algorithm')!r}")
        session_id, ciphertext = content.get("session_id"), content.get("ciphertext")
        if not isinstance(session_id, str) or not isinstance(ciphertext, str):
            raise UndecryptableEvent("no session_id or ciphertext")
        # The spec deprecates sender_key in events: without one, the sender's copy.
        claimed_key = content.get("sender_key")
        if claimed_key is not None and not isinstance(claimed_key, str):
            raise UndecryptableEvent("the sender_key is not a string")
        inbound = (
            await self.find(room_id, session_id, sender)
            if claimed_key is None
            else await self.get(room_id, claimed_key, session_id)
        )
        if inbound is None:
            raise NoRoomKey(room_id, session_id)
        if not self._may_send(inbound, sender):
            raise UndecryptableEvent("the room key belongs to another user than the sender")
        try:
            message = vodozemac.MegolmMessage.from_base64(ciphertext)
        except ValueError as exc:
            raise UndecryptableEvent(f"cannot decrypt: {exc}") from None
        try:
            decrypted = inbound.session.decrypt(message)
        except ValueError as exc:
            fresher = await self._fresher(room_id, session_id, inbound, message.message_index())
            if fresher is None:
                raise UndecryptableEvent(f"cannot decrypt: {exc}") from None
            inbound, decrypted = fresher, _decrypted(fresher, message)
        await self._refuse_replay(room_id, session_id, decrypted.message_index, event_id)
        return self._inner_event(room_id, content, inbound, session_id, decrypted)

    async def _fresher(
        self, room_id: str, session_id: str, cached: _Inbound, index: int
    ) -> _Inbound | None:
        """The stored copy of a session, if ``cached`` starts after ``index`` and the
        stored one starts earlier: on a store daemons share, another one may have taken
        in a better copy of the key since this one cached its own (in one process,
        :meth:`add` replaces it here). Garbage at a known index reads nothing."""
        if not self.vault.store.crypto_shared or index >= cached.session.first_known_index:
            return None
        key = (room_id, cached.sender_key, session_id)
        self._cache.pop(key, None)
        stored = await self.get(room_id, cached.sender_key, session_id)
        first = cached.session.first_known_index
        if stored is None or stored.session.first_known_index >= first:
            # Another daemon may have stored a worse copy over ours (it compared with
            # its own cached one): ours still opens what it opened.
            self._remember(key, cached)
            return None
        return stored

    def _may_send(self, inbound: _Inbound, sender: str) -> bool:
        if sender == inbound.sender:
            return True
        return inbound.own and self.ours is not None and self.ours(sender)

    async def _refuse_replay(
        self, room_id: str, session_id: str, index: int, event_id: str
    ) -> None:
        """A message index decrypts once: the same ciphertext under another event id
        is a replay (the spec's check; the same event again is a redelivery)."""
        key = f"{room_id}|{session_id}|{index}"
        # A replay record is the bare event ID, as a JSON string. One step, not a read
        # then a write: two events of one index decrypted at once cannot both pass.
        seen = await self.vault.put_new_record(_SEEN, key, event_id, str)
        if seen is not None and seen != event_id:
            raise UndecryptableEvent(f"replayed message index {index} (first in {seen})")

    async def forget_replays(self, room_id: str, session_id: str, count: int) -> None:
        """Drop the replay records of a session's first ``count`` message indices: our
        own outbound session's, once it rotated (only our own users may send with it,
        so nobody else could replay its messages; a redelivery records them again)."""
        keys = (f"{room_id}|{session_id}|{index}" for index in range(count))
        await self.vault.delete_many(_SEEN, keys)

    @staticmethod
    def _inner_event(
        room_id: str,
        content: Mapping[str, Any],
        inbound: _Inbound,
        session_id: str,
        decrypted: Any,
    ) -> DecryptedRoomEvent:
        try:
            payload = decode_json(bytes(decrypted.plaintext).decode("utf-8"))
        except ValueError:
            raise UndecryptableEvent("the plaintext is not JSON") from None
        if not isinstance(payload, Mapping) or payload.get("room_id") != room_id:
            raise UndecryptableEvent("the plaintext is for another room")
        event_type, inner = payload.get("type"), payload.get("content")
        if not isinstance(event_type, str) or not isinstance(inner, dict):
            raise UndecryptableEvent("the plaintext has no type or content")
        relation = content.get(_RELATION)
        if isinstance(relation, dict) and _RELATION not in inner:
            inner = {**inner, _RELATION: relation}
        return DecryptedRoomEvent(
            event_type,
            inner,
            inbound.sender_key,
            inbound.sender_ed25519,
            session_id,
            decrypted.message_index,
        )


def _decrypted(inbound: _Inbound, message: vodozemac.MegolmMessage) -> Any:
    try:
        return inbound.session.decrypt(message)
    except ValueError as exc:
        raise UndecryptableEvent(f"cannot decrypt: {exc}") from None


_WEEK_MS: Final = 604_800_000
_MESSAGES: Final = 100


@attrs.frozen
class RotationSettings:
    """When to replace a room's outbound session (``m.room.encryption``; the spec's
    defaults: a week or 100 messages)."""

    period_ms: int = _WEEK_MS
    period_msgs: int = _MESSAGES

    @classmethod
    def from_content(cls, content: Mapping[str, Any] | None) -> RotationSettings:
        content = content or {}
        period_ms, period_msgs = (
            content.get("rotation_period_ms"),
            content.get("rotation_period_msgs"),
        )
        valid_ms = isinstance(period_ms, int) and not isinstance(period_ms, bool) and period_ms > 0
        valid_msgs = (
            isinstance(period_msgs, int) and not isinstance(period_msgs, bool) and period_msgs > 0
        )
        return cls(
            period_ms if valid_ms else _WEEK_MS,  # type: ignore[arg-type]
            period_msgs if valid_msgs else _MESSAGES,  # type: ignore[arg-type]
        )


@attrs.define
class OutboundSession:
    """Our current Megolm session in one room, and who got its key."""

    room_id: str
    session: vodozemac.GroupSession
    created_ms: int
    shared_with: dict[str, dict[str, str]] = attrs.field(factory=dict)
    """user id -> device id -> curve25519 key of each device that got the key."""
    reserved_until: int = 0
    """The message indexes below this are reserved in the store (see ``reserve``)."""

    def expired(self, settings: RotationSettings, now_ms: int) -> bool:
        return (
            self.session.message_index >= settings.period_msgs
            or now_ms - self.created_ms >= settings.period_ms
        )


class OutboundGroupSessions:
    """Our outbound session per room: created on demand, rotated by the room's
    settings or on request (a member left).

    With ``reserve`` 1 the session is saved after every message. With more, the
    store gets a promise first (:class:`ReservedIndexes`: the next ``reserve``
    indexes) and the ratchet once per promise, not once per message; a session
    loaded after a crash jumps past every index promised, so none is used twice
    (recipients skip the gap, as Megolm allows). Only for a store one process
    works on: a daemon sharing the store would jump on every turn."""

    def __init__(
        self,
        account: OlmAccount,
        vault: CryptoVault,
        inbound: InboundGroupSessions,
        reserve: int = 1,
    ):
        self.account = account
        self.vault = vault
        self.inbound = inbound
        self.reserve = reserve
        self._cache: dict[str, OutboundSession] = {}

    async def current(
        self, room_id: str, settings: RotationSettings, now_ms: int | None = None
    ) -> OutboundSession:
        """The session to encrypt the next message with: a new one if there was none
        or the last one expired."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        session = self._cache.get(room_id) or await self._load(room_id)
        if session is None or session.expired(settings, now_ms):
            rotated, session = session, await self._create(room_id, now_ms)
            await self._forget_replays(rotated)
        return session

    async def discard(self, room_id: str) -> None:
        """Rotate: the next message in ``room_id`` starts a new session."""
        rotated = self._cache.pop(room_id, None) or await self._load(room_id)
        self._cache.pop(room_id, None)
        await self.vault.delete_many(_OUTBOUND, [room_id, _reserved_key(room_id)])
        await self._forget_replays(rotated)

    async def _forget_replays(self, rotated: OutboundSession | None) -> None:
        if rotated is not None:
            group = rotated.session
            await self.inbound.forget_replays(
                rotated.room_id, group.session_id, group.message_index
            )

    async def save(self, session: OutboundSession, promise: ReservedIndexes | None = None) -> None:
        """Store the session where its ratchet is (and ``promise``, in the same commit)."""
        pickle = self.vault.seal(session.session).decode("ascii")
        record = OutboundSessionRecord(pickle, session.created_ms, session.shared_with)
        records: dict[str, Any] = {session.room_id: record}
        if promise is not None:
            records[_reserved_key(session.room_id)] = promise
        await self.vault.put_records(_OUTBOUND, records)
        self._cache[session.room_id] = session

    async def _reserve(self, session: OutboundSession) -> None:
        """Promise the next ``reserve`` indexes, then save the ratchet where it is."""
        until = session.session.message_index + self.reserve
        await self.save(session, ReservedIndexes(session.session.session_id, until))
        session.reserved_until = until

    async def _load(self, room_id: str) -> OutboundSession | None:
        record = await self.vault.get_record(_OUTBOUND, room_id, OutboundSessionRecord)
        if record is None:
            return None
        group = self.vault.unseal(
            vodozemac.GroupSession.from_pickle, record.pickle.encode("ascii"), "Megolm session"
        )
        reserved = await self.vault.get_record(_OUTBOUND, _reserved_key(room_id), ReservedIndexes)
        if reserved is not None and reserved.session_id == group.session_id:
            if reserved.until - group.message_index > _MAX_SKIP:
                return None  # not believable: a new session
            while group.message_index < reserved.until:
                group.encrypt(b"")  # indexes a crashed run may have sent: never again
        # Its own copy of shared_with: the session adds to it as it shares the key.
        shared_with = {user: dict(devices) for user, devices in record.shared_with.items()}
        session = OutboundSession(room_id, group, record.created_ms, shared_with)
        self._cache[room_id] = session
        return session

    async def _create(self, room_id: str, now_ms: int) -> OutboundSession:
        group = vodozemac.GroupSession()
        # Our own copy, so the bridge can read back what its puppets sent.
        own = vodozemac.InboundGroupSession(group.session_key)
        account = self.account
        await self.inbound.add(
            room_id, own, account.user_id, account.curve25519, account.ed25519, own=True
        )
        session = OutboundSession(room_id, group, now_ms)
        await self.save(session)
        return session

    def room_key_content(self, session: OutboundSession) -> dict[str, Any]:
        """The ``m.room_key`` content that shares ``session``."""
        key = RoomKeyContent(
            algorithm=MEGOLM_ALGORITHM,
            room_id=session.room_id,
            session_id=session.session.session_id,
            session_key=session.session.session_key.to_base64(),
        )
        content: dict[str, Any] = converter.unstructure(key)
        return content

    async def encrypt(
        self, session: OutboundSession, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for one room event; its index is in the
        store (the session saved with its ratchet moved on, or within the indexes
        promised) before the content is returned."""
        plaintext = MegolmPlaintext(event_type, dict(content), session.room_id)
        if self.reserve > 1 and session.session.message_index >= session.reserved_until:
            await self._reserve(session)
        message = session.session.encrypt(canonical_json(converter.unstructure(plaintext)))
        if self.reserve == 1:
            await self.save(session)
        encrypted: dict[str, Any] = converter.unstructure(
            MegolmEncryptedContent(
                algorithm=MEGOLM_ALGORITHM,
                sender_key=self.account.curve25519,
                ciphertext=message.to_base64(),
                session_id=session.session.session_id,
                device_id=self.account.device_id,
            )
        )
        # The spec keeps relations readable by the server (threads, edits, reactions).
        relation = content.get(_RELATION)
        if isinstance(relation, Mapping):
            encrypted[_RELATION] = dict(relation)
        return encrypted
