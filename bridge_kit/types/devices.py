"""Devices (MSC4190) and to-device messages: the request and reply bodies."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

from bridge_kit.types.converter import keep_unknown_keys


@attrs.frozen
class Device:
    """One device of a user, as ``GET /devices`` lists it."""

    device_id: str
    display_name: str | None = None
    last_seen_ip: str | None = None
    last_seen_ts: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class DevicesResponse:
    """The reply of ``GET /_matrix/client/v3/devices``."""

    devices: list[Device]
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class DeviceUpdate:
    """The body of ``PUT /devices/{deviceId}``; with MSC4190 it creates the device."""

    display_name: str | None = None


@attrs.frozen
class SendToDeviceRequest:
    """The body of ``PUT /sendToDevice/{eventType}/{txnId}``: user -> device -> content
    (device ``*`` means every device of the user)."""

    messages: dict[str, dict[str, dict[str, Any]]]


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, Device, strict=True)
    keep_unknown_keys(converter, DevicesResponse, strict=True)
