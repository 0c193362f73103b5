"""What the crypto layer sends: to-device and room payloads, as attrs classes.

Each is unstructured by the one converter (:data:`bridge_kit.types.converter`);
the field names are the spec's keys. What arrives is checked field by field
instead (see :mod:`bridge_kit.crypto.olm` and :mod:`bridge_kit.crypto.megolm`),
since every refusal there names its reason.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "MegolmEncryptedContent",
    "MegolmPlaintext",
    "OlmCiphertext",
    "OlmEncryptedContent",
    "OlmPlaintext",
    "RoomKeyContent",
]


@attrs.frozen
class OlmPlaintext:
    """The payload an Olm message carries to one device (the spec's checks need every key)."""

    type: str
    content: dict[str, Any]
    sender: str
    sender_device: str
    keys: dict[str, str]
    """``{"ed25519": <the sender device's key>}``."""
    recipient: str
    recipient_keys: dict[str, str]
    """``{"ed25519": <the recipient device's key>}``."""


@attrs.frozen
class OlmCiphertext:
    """One device's Olm message: ``type`` 0 (pre-key) or 1, and the unpadded base64 body."""

    type: int
    body: str


@attrs.frozen
class OlmEncryptedContent:
    """A to-device ``m.room.encrypted`` content (``m.olm.v1.curve25519-aes-sha2``)."""

    algorithm: str
    sender_key: str
    ciphertext: dict[str, OlmCiphertext]
    """The recipient device's curve25519 key -> its message."""


@attrs.frozen
class RoomKeyContent:
    """An ``m.room_key`` content: a Megolm session shared with one device."""

    algorithm: str
    room_id: str
    session_id: str
    session_key: str


@attrs.frozen
class MegolmPlaintext:
    """What a Megolm message carries: the room event, bound to its room."""

    type: str
    content: dict[str, Any]
    room_id: str


@attrs.frozen
class MegolmEncryptedContent:
    """A room ``m.room.encrypted`` content (``m.megolm.v1.aes-sha2``), without its
    ``m.relates_to``, which is added as it came (it is not a valid field name)."""

    algorithm: str
    sender_key: str
    ciphertext: str
    session_id: str
    device_id: str
