"""The one place that cleans and checks what goes into a store, whatever the backend.

Every public :class:`~bridge_kit.store.Store` method passes its input through the
helpers here before the backend sees it, so the three backends store the same value
for the same input and none of them cleans on its own. One helper per rule:

- :func:`storable_text`: NUL and lone surrogates become U+FFFD (lanes, owners, room
  IDs, descriptive columns), where merging two such values is harmless;
- :func:`escaped_json`: the same characters as ``\\uXXXX`` escapes in JSON text
  (lossless);
- :func:`checked_key`: refuse such a key outright (devices, crypto state), where
  merging two keys could hand out the wrong value;
- :func:`checked_user_ids` / :func:`storable_user_ids`: the same for puppets'
  user IDs, refused on write and skipped on lookup;
- :func:`checked_bytes`: crypto values are bytes;
- :func:`checked_count`: a row count is not negative;
- :func:`checked_portal_key`, :func:`checked_metadata`, :func:`checked_timestamp` and
  the ``storable_*`` record rules after them: the bridge layer's records (ids checked,
  names cleaned, metadata as the JSON it will be read back as).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import attrs

from bridge_kit.bridge.records import (
    GhostRecord,
    LoginRecord,
    LoginState,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)
from bridge_kit.inbox.records import NewDeadLetter, NewInboxItem, Parking

#: What neither database takes in a text column: NUL (PostgreSQL) and lone surrogates,
#: which a str gets from a JSON escape such as "\ud800" and no UTF-8 encoder takes (both).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def _is_plain(value: str) -> bool:
    """Whether ``value`` surely holds nothing to clean: the cheap test for usual ASCII text."""
    return value.isascii() and "\x00" not in value


def storable_text(value: str) -> str:
    """``value`` with NUL and lone surrogates as U+FFFD, so any database stores it.

    Not one-to-one, which is harmless where it is used: two lanes that differ only
    there become one (still in order), owners and the dead letters' descriptive
    columns are compared with themselves or read by people, and every lookup cleans
    its key the same way. Cheap for the usual ASCII text.
    """
    return value if _is_plain(value) else _UNSTORABLE.sub("\ufffd", value)


def optional_storable_text(value: str | None) -> str | None:
    """:func:`storable_text`, passing ``None`` through."""
    return None if value is None else storable_text(value)


def escaped_json(value: str) -> str:
    """JSON text with NUL and lone surrogates written as ``\\uXXXX`` escapes.

    Lossless: in JSON text such characters can only stand inside a string, where
    the escape means the same character, so the event a handler gets is unchanged.
    """
    if _is_plain(value):
        return value
    return _UNSTORABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", value)


def checked_key(value: str, what: str) -> str:
    """``value``, or :class:`ValueError` if it holds NUL or a lone surrogate.

    For the keys of devices and crypto state: cleaning them (as :func:`storable_text`
    does lane names) could make two keys one, and a lookup find the wrong value.
    """
    if _UNSTORABLE.search(value):
        raise ValueError(f"{what} holds NUL or a lone surrogate: {value[:100]!r}")
    return value


def checked_bytes(value: bytes, what: str = "crypto values") -> bytes:
    """``value`` as :class:`bytes`; :class:`TypeError` for anything that is not bytes-like."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{what} are bytes, not {type(value).__name__}")
    return bytes(value)


def checked_count(count: int, name: str = "limit") -> int:
    """``count``, or :class:`ValueError` for a negative row count, which the SQL
    backends would read differently (SQLite as no limit)."""
    if count < 0:
        raise ValueError(f"{name} must be >= 0, not {count}")
    return count


def storable_user_ids(user_ids: Iterable[str]) -> Iterator[str]:
    """The user IDs a store can hold; the others cannot have been stored, so a
    lookup or a removal just skips them."""
    return (user_id for user_id in user_ids if not _UNSTORABLE.search(user_id))


def checked_user_ids(user_ids: Iterable[str]) -> list[str]:
    """``user_ids`` without duplicates, or :class:`ValueError` for one that holds NUL
    or a lone surrogate: recording it would only fail deeper down (every backend
    behaves the same, whether or not its database would have taken it)."""
    batch = list(set(user_ids))
    for user_id in batch:
        if _UNSTORABLE.search(user_id):
            raise ValueError(
                f"not a user ID a store can hold (NUL or a lone surrogate): {user_id[:100]!r}"
            )
    return batch


def checked_crypto_items(items: Mapping[str, bytes]) -> dict[str, bytes]:
    """``items`` with every key checked and every value as :class:`bytes`."""
    return {checked_key(key, "crypto key"): checked_bytes(value) for key, value in items.items()}


def storable_item(item: NewInboxItem) -> NewInboxItem:
    """``item`` with its lane and event JSON cleaned (itself when nothing needs it)."""
    lane, event_json = storable_text(item.lane), escaped_json(item.event_json)
    if lane is item.lane and event_json is item.event_json:
        return item
    return attrs.evolve(item, lane=lane, event_json=event_json)


def storable_letter(letter: NewDeadLetter) -> NewDeadLetter:
    """``letter`` with every text field cleaned (itself when nothing needs it)."""
    cleaned = attrs.evolve(
        letter,
        lane=storable_text(letter.lane),
        event_json=escaped_json(letter.event_json),
        error=storable_text(letter.error),
        handler=optional_storable_text(letter.handler),
        event_id=optional_storable_text(letter.event_id),
        event_type=optional_storable_text(letter.event_type),
    )
    return letter if cleaned == letter else cleaned


def storable_parking(parking: Parking) -> Parking:
    """``parking`` with its key and reason cleaned."""
    return attrs.evolve(
        parking, key=storable_text(parking.key), reason=storable_text(parking.reason)
    )


def storable_pairs(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """``(room_id, user_id)`` pairs by the keys the store keeps them under (see
    :func:`storable_text`), so an answer maps back to the asker's."""
    # storable_text inlined for the usual ASCII IDs, which it leaves alone: a bulk run's
    # re-run asks about every pair of its input, and the calls were a fifth of its time.
    return {
        (
            (room, user)
            if room.isascii() and user.isascii() and "\x00" not in room and "\x00" not in user
            else (storable_text(room), storable_text(user))
        ): (room, user)
        for room, user in pairs
    }


def storable_ids(ids: Iterable[str]) -> dict[str, str]:
    """IDs by the key the store keeps them under (see :func:`storable_pairs`)."""
    return {storable_text(value): value for value in ids}


def storable_profile_rows(
    values: Iterable[tuple[str, str, str | None]],
) -> list[tuple[str, str, str | None]]:
    """``(user_id, field, value)`` rows with each text cleaned."""
    return [
        (storable_text(user), storable_text(field), optional_storable_text(value))
        for user, field, value in values
    ]


# -- the bridge layer's records ---------------------------------------------------


def optional_checked_key(value: str | None, what: str) -> str | None:
    """:func:`checked_key`, passing ``None`` through."""
    return None if value is None else checked_key(value, what)


def checked_portal_key(key: PortalKey) -> PortalKey:
    """``key``, or :class:`ValueError` if its id or receiver could not be a key."""
    checked_key(key.id, "portal ID")
    checked_key(key.receiver, "portal receiver")
    return key


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """``metadata`` as the JSON text the SQL stores keep (compact, NUL and lone
    surrogates escaped); :class:`ValueError` for what is no JSON object."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"metadata is not JSON: {error}") from None
    return escaped_json(text)


def checked_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` as it reads back from any store: through JSON (a tuple becomes a
    list, an int key a string), and a copy, so the caller's dict stays the caller's."""
    loaded: dict[str, Any] = json.loads(metadata_json(metadata))
    return loaded


def checked_timestamp(timestamp: float) -> float:
    """``timestamp`` as a float, or :class:`ValueError` if it is not finite (a NaN
    would sort differently in each database)."""
    value = float(timestamp)
    if not math.isfinite(value):
        raise ValueError(f"timestamp must be a finite number, not {timestamp!r}")
    return value


def storable_portal(record: PortalRecord) -> PortalRecord:
    """``record`` with its ids checked, its texts cleaned and its metadata as JSON."""
    return attrs.evolve(
        record,
        key=checked_portal_key(record.key),
        room_id=optional_checked_key(record.room_id, "room ID"),
        name=optional_storable_text(record.name),
        topic=optional_storable_text(record.topic),
        avatar_mxc=optional_storable_text(record.avatar_mxc),
        is_direct=bool(record.is_direct),
        relay_login=optional_checked_key(record.relay_login, "login ID"),
        metadata=checked_metadata(record.metadata),
    )


def storable_ghost(record: GhostRecord) -> GhostRecord:
    """``record`` with its ids checked, its texts cleaned and its metadata as JSON."""
    return attrs.evolve(
        record,
        id=checked_key(record.id, "ghost ID"),
        user_id=checked_key(record.user_id, "user ID"),
        name=optional_storable_text(record.name),
        avatar_mxc=optional_storable_text(record.avatar_mxc),
        metadata=checked_metadata(record.metadata),
    )


def storable_login(record: LoginRecord) -> LoginRecord:
    """``record`` with its ids checked, its state a :class:`LoginState`, its
    credentials bytes and its metadata as JSON."""
    credentials = record.credentials
    return attrs.evolve(
        record,
        id=checked_key(record.id, "login ID"),
        user_id=checked_key(record.user_id, "user ID"),
        remote_name=storable_text(record.remote_name),
        state=LoginState(record.state),
        credentials=None if credentials is None else checked_bytes(credentials, "credentials"),
        metadata=checked_metadata(record.metadata),
    )


def storable_message(record: MessageRecord) -> MessageRecord:
    """``record`` with its ids checked and its timestamp a finite float."""
    return attrs.evolve(
        record,
        portal=checked_portal_key(record.portal),
        remote_id=checked_key(record.remote_id, "remote message ID"),
        event_id=checked_key(record.event_id, "event ID"),
        room_id=checked_key(record.room_id, "room ID"),
        part=checked_key(record.part, "message part"),
        sender=checked_key(record.sender, "remote sender"),
        sender_mxid=checked_key(record.sender_mxid, "sender's user ID"),
        timestamp=checked_timestamp(record.timestamp),
        pending=bool(record.pending),
    )


def storable_reaction(record: ReactionRecord) -> ReactionRecord:
    """``record`` with its ids (the reaction's key too) checked and its timestamp a
    finite float."""
    return attrs.evolve(
        record,
        portal=checked_portal_key(record.portal),
        remote_id=checked_key(record.remote_id, "remote message ID"),
        sender=checked_key(record.sender, "remote sender"),
        key=checked_key(record.key, "reaction key"),
        event_id=checked_key(record.event_id, "event ID"),
        room_id=checked_key(record.room_id, "room ID"),
        part=checked_key(record.part, "message part"),
        sender_mxid=checked_key(record.sender_mxid, "sender's user ID"),
        timestamp=checked_timestamp(record.timestamp),
    )


def is_storable_key(value: str) -> bool:
    """Whether ``value`` could be a stored key (see :func:`checked_key`): a lookup
    skips one that could not, as nothing can be stored under it."""
    return _UNSTORABLE.search(value) is None


def storable_ghosts(records: Iterable[GhostRecord]) -> list[GhostRecord]:
    """``records`` cleaned (see :func:`storable_ghost`), the last of each id kept, so a
    batch writes each ghost once."""
    by_id = {record.id: storable_ghost(record) for record in records}
    return list(by_id.values())
