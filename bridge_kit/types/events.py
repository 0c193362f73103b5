"""Events and the transactions the homeserver pushes to the appservice."""

from __future__ import annotations

from typing import Any

import attrs
from cattrs.gen import override

from bridge_kit.types.converter import keep_unknown_keys


@attrs.frozen
class Event:
    """A Matrix event as an appservice receives it (a client-format event).

    ``room_id`` is absent for some ephemeral events; unknown keys (``unsigned``,
    ``redacts``, ...) are kept in ``extra`` and re-emitted.
    """

    type: str
    content: dict[str, Any] = attrs.field(factory=dict)
    room_id: str | None = None
    sender: str | None = None
    event_id: str | None = None
    state_key: str | None = None
    origin_server_ts: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_state(self) -> bool:
        """True for a state event (one with a ``state_key``, even an empty one)."""
        return self.state_key is not None


@attrs.frozen
class DeviceLists:
    """MSC3202 device-list changes: users whose devices ``changed`` or who ``left``."""

    changed: list[str] = attrs.field(factory=list)
    left: list[str] = attrs.field(factory=list)


@attrs.frozen
class Transaction:
    """The body of ``PUT /_matrix/app/v1/transactions/{txnId}``.

    Each optional part is read from its stable name or its unstable (MSC) name;
    ``ephemeral`` and ``to_device`` are merged from both so a bridge reads one list.
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
        """Parse a transaction body, folding the unstable key names into the stable fields."""
        from bridge_kit.types.converter import converter

        data = dict(body)
        for stable, unstable_names in _UNSTABLE_LISTS.items():
            merged = list(data.pop(stable, None) or [])
            for name in unstable_names:
                merged.extend(data.pop(name, None) or [])
            data[stable] = merged
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

keep_unknown_keys(Event, omit_if_default=True, type=override(omit_if_default=False))
keep_unknown_keys(DeviceLists)
keep_unknown_keys(Transaction)
