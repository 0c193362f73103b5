"""The device parts of a transaction as inbox items: to-device events (MSC2409),
device-list changes and one-time-key counts (MSC3202).

:func:`~bridge_kit.inbox.transactions.split_transaction` calls :func:`split_device_items`;
the items go into the inbox in the same commit as the txnId and the events, and
are handled there like events (retries, dead letters, replay). Each is ordered
in a lane of its own kind:

- a to-device event in ``~to-device:<to_user_id>|<to_device_id>`` (the device it
  was sent to: Olm messages to one device must be decrypted in order);
- a device-list change in ``~device-lists``;
- one device's key counts in ``~otk:<user_id>|<device_id>``; only the newest
  counts matter, so the stores drop the lane's waiting counts when they accept
  new ones (in the same commit).

A malformed part becomes a dead letter naming what is wrong; the rest of the
transaction is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Final

import cattrs

from bridge_kit import defaults
from bridge_kit.errors import json_type
from bridge_kit.inbox.records import ItemKind, NewDeadLetter, NewInboxItem, storable
from bridge_kit.inbox.signals import ErrorReply
from bridge_kit.types import describe_error
from bridge_kit.types.converter import converter
from bridge_kit.types.device_events import DeviceListUpdate, OtkCounts, ToDeviceEvent

__all__ = [
    "DEVICE_LISTS_LANE",
    "count_device_items",
    "device_lane",
    "split_device_items",
]

#: Where each part is in a transaction body: the stable name first, then the unstable ones.
TO_DEVICE_KEYS: Final = ("to_device", "de.sorunome.msc2409.to_device")
DEVICE_LISTS_KEYS: Final = ("device_lists", "org.matrix.msc3202.device_lists")
OTK_COUNT_KEYS: Final = (
    "device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_keys_count",
    "org.matrix.msc3202.device_one_time_key_counts",
)
FALLBACK_KEYS: Final = (
    "device_unused_fallback_key_types",
    "org.matrix.msc3202.device_unused_fallback_key_types",
)
DEVICE_LISTS_LANE: Final = "~device-lists"
_INVALID_LANE: Final = "~invalid"
_ERROR_LIMIT: Final = 1024
# Compact, ASCII (a lone surrogate travels as an escape), finite numbers only.
_ENCODE: Final = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
).encode

Items = tuple[list[NewInboxItem], list[NewDeadLetter]]


def device_lane(kind: ItemKind, user_id: str = "", device_id: str = "") -> str:
    """The lane of a device item: per receiving device, or the one device-list lane.

    The first ``|`` after the user ID's ``:`` ends it (a server name has none), so
    every (user, device) pair has a lane of its own.
    """
    if kind is ItemKind.TO_DEVICE:
        return f"~to-device:{user_id}|{device_id}"
    if kind is ItemKind.OTK_COUNTS:
        return f"~otk:{user_id}|{device_id}"
    return DEVICE_LISTS_LANE


def split_device_items(body: Mapping[str, Any]) -> Items:
    """The inbox items of a transaction's device parts, and the dead letters of the
    malformed ones.

    Raises :class:`~bridge_kit.inbox.signals.ErrorReply` (413 ``M_TOO_LARGE``) for key counts
    of more than :data:`~bridge_kit.defaults.MAX_TRANSACTION_KEY_COUNTS` devices.
    """
    if (devices := _count_key_counts(body)) > defaults.MAX_TRANSACTION_KEY_COUNTS:
        raise ErrorReply(
            413,
            "M_TOO_LARGE",
            "A transaction may carry the one-time-key counts of at most "
            f"{defaults.MAX_TRANSACTION_KEY_COUNTS} devices; this one has {devices}",
        )
    items: list[NewInboxItem] = []
    rejected: list[NewDeadLetter] = []
    key, to_device = first_present(body, TO_DEVICE_KEYS)
    if key is not None:
        _split_to_device(key, to_device, items, rejected)
    _split_device_lists(body, items, rejected)
    _split_otk_counts(body, items, rejected)
    return items, rejected


def count_device_items(body: Mapping[str, Any]) -> int:
    """How many to-device and device-list items (valid or not) :func:`split_device_items`
    makes of ``body``, counted before any of them is parsed: what counts towards
    :data:`~bridge_kit.defaults.MAX_TRANSACTION_ITEMS`.

    Key counts have a limit of their own
    (:data:`~bridge_kit.defaults.MAX_TRANSACTION_KEY_COUNTS`, checked by
    :func:`split_device_items`): Synapse sends one per device of our users in the
    transaction's rooms, legitimately many more than it sends events.
    """
    to_device = first_present(body, TO_DEVICE_KEYS)[1]
    count = len(to_device) if isinstance(to_device, list) else 0
    return count + (first_present(body, DEVICE_LISTS_KEYS)[1] is not None)


def _count_key_counts(body: Mapping[str, Any]) -> int:
    """How many key-count items (valid or not) :func:`split_device_items` makes of
    ``body``: one per device named, and one per malformed part."""
    count = 0
    pairs: set[tuple[str, str]] = set()
    for keys in (OTK_COUNT_KEYS, FALLBACK_KEYS):
        key, per_user = first_present(body, keys)
        if key is None:
            continue
        if not isinstance(per_user, dict):
            count += 1
            continue
        for user_id, per_device in per_user.items():
            if isinstance(per_device, dict):
                pairs.update((user_id, device_id) for device_id in per_device)
            else:
                count += 1
    return count + len(pairs)


# -- to-device ---------------------------------------------------------------------


def _split_to_device(
    key: str, value: Any, items: list[NewInboxItem], rejected: list[NewDeadLetter]
) -> None:
    if value is None:
        return
    kind = ItemKind.TO_DEVICE
    if not isinstance(value, list):
        rejected.append(_letter(kind, value, f"'{key}' must be an array, not {json_type(value)}"))
        return
    for index, raw in enumerate(value):
        where = f"{key}[{index}]"
        try:
            event: ToDeviceEvent = converter.structure(raw, ToDeviceEvent)
            text = _ENCODE(raw)
        except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
            error = f"invalid to-device event at {where}: {describe_error(exc)}"
            rejected.append(_letter(kind, raw, error, _to_device_lane(raw)))
            continue
        lane = device_lane(kind, event.to_user_id, event.to_device_id)
        _append(items, rejected, NewInboxItem(lane, kind, text), raw, where)


def _to_device_lane(raw: Any) -> str:
    """A malformed to-device event's lane, when it names its device well enough."""
    if isinstance(raw, Mapping):
        user_id, device_id = raw.get("to_user_id"), raw.get("to_device_id")
        if isinstance(user_id, str) and isinstance(device_id, str):
            return device_lane(ItemKind.TO_DEVICE, user_id, device_id)
    return _INVALID_LANE


# -- device lists --------------------------------------------------------------------


def _split_device_lists(
    body: Mapping[str, Any], items: list[NewInboxItem], rejected: list[NewDeadLetter]
) -> None:
    key, raw = first_present(body, DEVICE_LISTS_KEYS)
    if key is None:
        return
    kind = ItemKind.DEVICE_LISTS
    try:
        converter.structure(raw, DeviceListUpdate)
        text = _ENCODE(raw)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        error = f"invalid device lists in '{key}': {describe_error(exc)}"
        rejected.append(_letter(kind, raw, error, DEVICE_LISTS_LANE))
        return
    items.append(NewInboxItem(DEVICE_LISTS_LANE, kind, text))


# -- one-time-key counts -------------------------------------------------------------


def _split_otk_counts(
    body: Mapping[str, Any], items: list[NewInboxItem], rejected: list[NewDeadLetter]
) -> None:
    kind = ItemKind.OTK_COUNTS
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    for keys, field in ((OTK_COUNT_KEYS, "counts"), (FALLBACK_KEYS, "unused_fallback_key_types")):
        key, per_user = first_present(body, keys)
        if key is None:
            continue
        for problem in _merge_per_device(key, per_user, field, parts):
            rejected.append(_letter(kind, problem[1], problem[0]))
    for (user_id, device_id), raw in parts.items():
        where = f"one-time-key counts of {user_id}'s device {device_id}"
        try:
            converter.structure(raw, OtkCounts)
            text = _ENCODE(raw)
        except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
            error = f"invalid {where}: {describe_error(exc)}"
            rejected.append(_letter(kind, raw, error, device_lane(kind, user_id, device_id)))
            continue
        lane = device_lane(kind, user_id, device_id)
        _append(items, rejected, NewInboxItem(lane, kind, text), raw, where)


def _merge_per_device(
    key: str, per_user: Any, field: str, parts: dict[tuple[str, str], dict[str, Any]]
) -> Iterator[tuple[str, Any]]:
    """Add ``{user: {device: value}}`` to ``parts`` (one OtkCounts body per device);
    yield ``(error, raw)`` for each part that is not shaped so."""
    if not isinstance(per_user, dict):
        yield f"'{key}' must be an object, not {json_type(per_user)}", per_user
        return
    for user_id, per_device in per_user.items():
        if not isinstance(per_device, dict):
            error = f"'{key}' of {user_id} must be an object, not {json_type(per_device)}"
            yield error, {user_id: per_device}
            continue
        for device_id, value in per_device.items():
            part = parts.setdefault(
                (user_id, device_id), {"user_id": user_id, "device_id": device_id}
            )
            part[field] = value


# -- shared --------------------------------------------------------------------------


def first_present(body: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of ``keys`` that ``body`` has (not null), and its value.

    A homeserver may send a part under several names at once (Synapse sends both
    unstable spellings of the key counts, and the ephemeral events under both names
    when the registration has both flags): the first found wins, nothing is doubled.
    """
    for key in keys:
        value = body.get(key)
        if value is not None:
            return key, value
    return None, None


def _append(
    items: list[NewInboxItem],
    rejected: list[NewDeadLetter],
    item: NewInboxItem,
    raw: Any,
    where: str,
) -> None:
    if storable(item.lane) != item.lane:
        error = f"invalid {where}: its user or device ID is not Unicode"
        rejected.append(_letter(item.kind, raw, error))
        return
    items.append(item)


def _letter(kind: ItemKind, raw: Any, error: str, lane: str = _INVALID_LANE) -> NewDeadLetter:
    event_type = raw.get("type") if isinstance(raw, Mapping) else None
    if len(error) > _ERROR_LIMIT:
        error = error[: _ERROR_LIMIT - 1] + "…"
    return NewDeadLetter(
        lane=storable(lane),
        kind=kind,
        event_json=_as_json(raw),
        error=storable(error),
        event_type=storable(event_type) if isinstance(event_type, str) else None,
    )


def _as_json(raw: Any) -> str:
    try:
        return _ENCODE(raw)
    except ValueError:  # not JSON (an infinity): a replay must find it invalid again
        return _ENCODE({"bridge_kit.not_json": repr(raw)[:65_536]})
