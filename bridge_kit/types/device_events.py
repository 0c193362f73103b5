"""What the device hooks get: to-device events, device-list changes, one-time-key counts.

The homeserver pushes these in transactions (MSC2409 to-device messages, MSC3202
device lists and key counts) when the registration and the homeserver enable them;
:mod:`bridge_kit.inbox.device_items` turns them into inbox items, and the inbox hands
handlers these models.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.errors import WrongType
from bridge_kit.types.converter import keep_unknown_keys, refuse

__all__ = ["DeviceListUpdate", "OtkCounts", "ToDeviceEvent"]


@attrs.frozen
class ToDeviceEvent:
    """A to-device event for one of our users' devices (``to_user_id``/``to_device_id``).

    Unknown keys are kept in ``extra``.
    """

    type: str
    sender: str
    to_user_id: str
    to_device_id: str
    content: dict[str, Any] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class DeviceListUpdate:
    """Users whose devices ``changed`` (refresh their keys), and users who ``left``
    every room shared with our users (stop tracking them)."""

    changed: list[str] = attrs.field(factory=list)
    left: list[str] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OtkCounts:
    """One of our devices' one-time keys left on the homeserver, per algorithm, and
    which fallback key algorithms still have an unused key (``None``: not said)."""

    user_id: str
    device_id: str
    counts: dict[str, int] = attrs.field(factory=dict)
    unused_fallback_key_types: list[str] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def _key_counts(value: Any, _: Any) -> dict[str, int]:
    """``{algorithm: count}``, refusing what is not a whole number (``"3"``, ``true``):
    a bridge topping up its keys must not act on a count it guessed."""
    if not isinstance(value, dict):
        raise WrongType("an object", value)
    for algorithm, count in value.items():
        if not isinstance(count, int) or isinstance(count, bool):
            raise refuse(OtkCounts, algorithm, WrongType("an integer", count))
    return value


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter`` (strict types)."""
    keep_unknown_keys(converter, ToDeviceEvent, strict=True)
    keep_unknown_keys(converter, DeviceListUpdate, strict=True)
    keep_unknown_keys(converter, OtkCounts, strict=True, counts=override(struct_hook=_key_counts))
