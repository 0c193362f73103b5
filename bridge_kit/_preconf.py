"""The one place the cattrs converter is configured, in the manner of cattrs' ``preconf``.

Each module that has wire models keeps their hooks in its own
``configure_converter(converter)``; :func:`configure_converter` here calls them
all, once, when the package is imported. :func:`make_converter` builds a fresh,
fully configured converter (for a bridge that wants its own).
"""

from __future__ import annotations

import cattrs

from bridge_kit.client import homeserver as client
from bridge_kit.registration import model as registration_model
from bridge_kit.types import (
    device_events,
    devices,
    error_body,
    events,
    keys,
    media,
    messages,
    register,
    room,
    room_state,
)
from bridge_kit.types.converter import configure_converter as configure_base

__all__ = ["configure_converter", "make_converter"]


def configure_converter(converter: cattrs.Converter) -> None:
    """Register every bridge_kit hook on ``converter``; the order matters (base first)."""
    configure_base(converter)
    error_body.configure_converter(converter)
    register.configure_converter(converter)
    room.configure_converter(converter)
    events.configure_converter(converter)
    device_events.configure_converter(converter)
    messages.configure_converter(converter)
    room_state.configure_converter(converter)
    media.configure_converter(converter)
    devices.configure_converter(converter)
    keys.configure_converter(converter)
    registration_model.configure_converter(converter)
    client.configure_converter(converter)


def make_converter() -> cattrs.Converter:
    """A new converter that speaks every wire format bridge_kit knows."""
    converter = cattrs.Converter()
    configure_converter(converter)
    return converter
