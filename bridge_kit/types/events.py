"""Events and the transactions the homeserver pushes to the appservice."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.errors import WrongType
from bridge_kit.types.converter import StructureHook, converter, keep_unknown_keys, refuse


@attrs.frozen
class Event:
    """A Matrix event as an appservice receives it (a client-format event).

    ``room_id`` is absent for some ephemeral events; unknown keys (``unsigned``,
    ``redacts``, ...) are kept in ``extra`` and re-emitted.

    ``encrypted`` is true for an event that arrived as ``m.room.encrypted`` and that
    bridge_kit decrypted (its ``type`` and ``content`` are then the inner event's);
    ``sender_device`` is the device that encrypted it, when bridge_kit knows it.
    Neither is part of the event's JSON.
    """

    type: str
    content: dict[str, Any] = attrs.field(factory=dict)
    room_id: str | None = None
    sender: str | None = None
    event_id: str | None = None
    state_key: str | None = None
    origin_server_ts: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)
    encrypted: bool = False
    sender_device: str | None = None

    @property
    def is_state(self) -> bool:
        """True for a state event (one with a ``state_key``, even an empty one)."""
        return self.state_key is not None


@attrs.frozen
class DeviceLists:
    """MSC3202 device-list changes: users whose devices ``changed`` or who ``left``."""

    changed: list[str] = attrs.field(factory=list)
    left: list[str] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Transaction:
    """The body of ``PUT /_matrix/app/v1/transactions/{txnId}``.

    Each optional part is read from its stable name or, failing that, its unstable
    (MSC) name: the first present wins, because Synapse sends the same ephemeral
    events under both names when a registration has both ephemeral flags.
    """

    events: list[Event]
    ephemeral: list[Event] = attrs.field(factory=list)
    to_device: list[dict[str, Any]] = attrs.field(factory=list)
    device_lists: DeviceLists | None = None
    device_one_time_keys_count: dict[str, Any] = attrs.field(factory=dict)
    device_unused_fallback_key_types: dict[str, Any] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Transaction:
        """Parse a transaction body, folding the unstable key names into the stable fields.

        Raises a cattrs validation error (see :func:`~bridge_kit.types.describe_error`)
        naming each key whose value has the wrong shape.
        """
        data = dict(body)
        for stable, unstable_names in _UNSTABLE_LISTS.items():
            parts = [(name, data.pop(name, None)) for name in (stable, *unstable_names)]
            name, part = next(((n, p) for n, p in parts if p is not None), (stable, []))
            if not isinstance(part, list):
                raise refuse(cls, name, WrongType("an array", part))
            data[stable] = part
        for stable, unstable_names in _UNSTABLE_MAPS.items():
            for name in unstable_names:
                if name in data and stable not in data:
                    data[stable] = data.pop(name)
                else:
                    data.pop(name, None)
        transaction: Transaction = converter.structure(data, cls)
        return transaction


_UNSTABLE_LISTS: dict[str, tuple[str, ...]] = {
    "ephemeral": ("de.sorunome.msc2409.ephemeral",),
    "to_device": ("de.sorunome.msc2409.to_device",),
}
_UNSTABLE_MAPS: dict[str, tuple[str, ...]] = {
    "device_lists": ("org.matrix.msc3202.device_lists",),
    "device_one_time_keys_count": (
        "org.matrix.msc3202.device_one_time_keys_count",
        "org.matrix.msc3202.device_one_time_key_counts",
    ),
    "device_unused_fallback_key_types": ("org.matrix.msc3202.device_unused_fallback_key_types",),
}

_EVENT_KEYS = frozenset(
    ("type", "content", "room_id", "sender", "event_id", "state_key", "origin_server_ts")
)


def _has_plain_fields(value: dict[str, Any]) -> bool:
    """True when every field of an event has its JSON type, as in almost every event.

    A transaction carries up to 100 events and this is the appservice's hot path,
    so the types are checked by hand. Anything else, including every mistake, goes
    to the converter's strict hook, which decides and names the offending field.
    """
    get = value.get
    content = get("content")
    room_id = get("room_id")
    sender = get("sender")
    event_id = get("event_id")
    state_key = get("state_key")
    origin_server_ts = get("origin_server_ts")
    return (
        get("type").__class__ is str
        and (content.__class__ is dict or (content is None and "content" not in value))
        and (room_id is None or room_id.__class__ is str)
        and (sender is None or sender.__class__ is str)
        and (event_id is None or event_id.__class__ is str)
        and (state_key is None or state_key.__class__ is str)
        and (origin_server_ts is None or origin_server_ts.__class__ is int)
    )


def _structure_event(value: Any, cls: type[Event], checked: StructureHook) -> Event:
    """Build an Event in one go when every field has its JSON type (see _has_plain_fields)."""
    if value.__class__ is dict and cls is Event and _has_plain_fields(value):
        content = value.get("content")
        return Event(
            value["type"],
            {} if content is None else content,
            value.get("room_id"),
            value.get("sender"),
            value.get("event_id"),
            value.get("state_key"),
            value.get("origin_server_ts"),
            {k: v for k, v in value.items() if k not in _EVENT_KEYS},
        )
    event: Event = checked(value, cls)
    return event


def checked_room_id(value: Any) -> str | None:
    """The ``room_id`` of decoded JSON that structures as an :class:`Event`; raises the
    converter's validation error, naming the wrong fields, when it does not.

    For accepting a transaction, which needs to know that each event is valid and
    which room it is in, not the Event itself: the inbox builds that when a handler
    needs it, and this skips building one per event on the hot path.
    """
    if value.__class__ is dict and _has_plain_fields(value):
        room_id: str | None = value.get("room_id")
        return room_id
    event: Event = converter.structure(value, Event)
    return event.room_id


def checked_event_hook(converter: cattrs.Converter) -> StructureHook:
    """The strict hook that names every wrong field: the fast path's fallback."""
    keep_unknown_keys(
        converter,
        Event,
        omit_if_default=True,
        strict=True,
        type=override(omit_if_default=False),
        # Set by the decryption layer, never read from or written to JSON.
        encrypted=override(omit=True),
        sender_device=override(omit=True),
    )
    return converter.get_structure_hook(Event)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    checked = checked_event_hook(converter)
    converter.register_structure_hook(
        Event, lambda value, cls: _structure_event(value, cls, checked)
    )
    keep_unknown_keys(converter, DeviceLists, strict=True)
    keep_unknown_keys(converter, Transaction, strict=True)
