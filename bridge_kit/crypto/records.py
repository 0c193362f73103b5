"""The records the crypto state keeps in its vault, as attrs classes.

Each is (un)structured by the one converter (:data:`bridge_kit.types.converter`)
and stored as canonical JSON by :class:`~bridge_kit.crypto.vault.CryptoVault`.
Their field names are the stored keys, and a field added later has a default,
so the records written by earlier releases read back unchanged.
:class:`SealedEnvelope` is the binary frame of a sealed record.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = [
    "AccountMeta",
    "DeviceRecord",
    "InboundSessionRecord",
    "OutboundSessionRecord",
    "ReservedIndexes",
    "SealedEnvelope",
    "UserDevicesRecord",
]

#: The AES-GCM nonce that opens a sealed record, in bytes.
NONCE_SIZE: Final = 12


@attrs.frozen
class AccountMeta:
    """What the Olm account's pickle does not hold."""

    device_keys_uploaded: bool = False


@attrs.frozen
class DeviceRecord:
    """One verified device of another user (the user and device ids are its keys)."""

    curve25519: str
    ed25519: str
    algorithms: list[str] = attrs.field(factory=list)
    display_name: str | None = None


@attrs.frozen
class UserDevicesRecord:
    """The verified devices of one user, and whether their list must be queried again."""

    devices: dict[str, DeviceRecord]
    outdated: bool = False


@attrs.frozen
class DeviceListsStamp:
    """Made anew by every change to the stored device lists, so that another daemon
    on the same store knows to read them again."""

    token: str


@attrs.frozen
class InboundSessionRecord:
    """A Megolm room key we received (or our own copy of one we send with)."""

    pickle: str
    """The session, pickled and encrypted with the pickle key."""
    sender: str
    sender_key: str
    ed25519: str
    own: bool = False


@attrs.frozen
class OutboundSessionRecord:
    """Our Megolm session in one room, and who got its key."""

    pickle: str
    """The session, pickled and encrypted with the pickle key."""
    created_ms: int
    shared_with: dict[str, dict[str, str]] = attrs.field(factory=dict)
    """user id -> device id -> curve25519 key of each device that got the key."""


@attrs.frozen
class ReservedIndexes:
    """Message indexes of a room's outbound session that may be in use: every index
    below ``until`` counts as used after a restart, whatever the saved ratchet says
    (the store saves the ratchet once per reservation, not once per message)."""

    session_id: str
    until: int


@attrs.frozen
class SealedEnvelope:
    """A sealed record as stored: the nonce, then the AES-256-GCM ciphertext and tag."""

    nonce: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        return self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, stored: bytes) -> SealedEnvelope:
        return cls(stored[:NONCE_SIZE], stored[NONCE_SIZE:])
