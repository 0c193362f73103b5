"""What each kind of inbox item is parsed into, which handlers it is routed by, and
how logs and dead letters name it.

=================  ====================  =======================================
kind               handlers get          routed by
=================  ====================  =======================================
``EVENT``          :class:`Event`        its ``type``
``EPHEMERAL``      :class:`Event`        its ``type``
``TO_DEVICE``      :class:`ToDeviceEvent`  its ``type``
``DEVICE_LISTS``   :class:`DeviceListUpdate`  (every handler of the kind)
``OTK_COUNTS``     :class:`OtkCounts`    (every handler of the kind)
``REMOTE``         :class:`RemoteItem`   its ``type``
=================  ====================  =======================================
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from bridge_kit._json import decode_item
from bridge_kit.inbox.records import ItemKind
from bridge_kit.types import DeviceListUpdate, Event, OtkCounts, ToDeviceEvent
from bridge_kit.types.converter import converter

__all__ = ["Item", "RemoteItem", "describe_item", "item_event_id", "item_type", "parse_item"]


@attrs.frozen
class RemoteItem:
    """An event of a remote network, as a bridge (:mod:`bridge_kit.bridge`) stored it.

    ``type`` routes it to handlers; ``key`` names it for good (it keys the sends'
    transaction IDs, so a handler run twice posts once); ``content`` is the
    bridge's record of it, as JSON.
    """

    type: str
    key: str
    content: dict[str, Any]


#: What a handler gets: the parsed inbox item.
Item = Event | ToDeviceEvent | DeviceListUpdate | OtkCounts | RemoteItem

MODELS: Final[dict[ItemKind, type[Item]]] = {
    ItemKind.EVENT: Event,
    ItemKind.EPHEMERAL: Event,
    ItemKind.TO_DEVICE: ToDeviceEvent,
    ItemKind.DEVICE_LISTS: DeviceListUpdate,
    ItemKind.OTK_COUNTS: OtkCounts,
    ItemKind.REMOTE: RemoteItem,
}


def parse_item(kind: ItemKind, event_json: str) -> Item:
    """The item's model from its stored JSON text.

    Raises :class:`ValueError` (not JSON, or NaN/infinity), :class:`TypeError` or a
    cattrs validation error (see :func:`~bridge_kit.types.describe_error`).
    """
    data: Any = decode_item(event_json)
    item: Item = converter.structure(data, MODELS[kind])
    return item


def item_type(item: Item) -> str | None:
    """The event type handlers are chosen by; ``None`` for the kinds without one."""
    return item.type if isinstance(item, Event | ToDeviceEvent | RemoteItem) else None


def item_event_id(item: Item) -> str | None:
    """The event ID, for the kinds that have one (a remote item's key)."""
    if isinstance(item, RemoteItem):
        return item.key
    return item.event_id if isinstance(item, Event) else None


def describe_item(item: Item) -> str:
    """A few words naming the item in a log line."""
    if isinstance(item, Event):
        return item.event_id or item.type
    if isinstance(item, ToDeviceEvent):
        return f"{item.type} from {item.sender}"
    if isinstance(item, RemoteItem):
        return f"remote {item.type} {item.key}"
    if isinstance(item, OtkCounts):
        return f"one-time-key counts of {item.user_id}|{item.device_id}"
    return "device-list changes"
