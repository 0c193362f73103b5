"""End-to-end encryption for bridges, built on vodozemac (the ``e2ee`` extra).

Importing this package needs vodozemac; the rest of bridge_kit does not, and only
imports it when ``encryption.enabled`` is on.

What it stores is in :mod:`~bridge_kit.crypto.records`, what it sends in
:mod:`~bridge_kit.crypto.payloads`: attrs classes, (un)structured by the one converter.
"""

from typing import TYPE_CHECKING

from bridge_kit._deprecated import renamed
from bridge_kit.crypto.account import (
    MEGOLM_ALGORITHM,
    OLM_ALGORITHM,
    SIGNED_CURVE25519,
    KeyUpload,
    OlmAccount,
)
from bridge_kit.crypto.devices import DeviceTracker, TrackedDevice, verified_device
from bridge_kit.crypto.machine import ROOM_KEY, CryptoMachine, KeysApi
from bridge_kit.crypto.megolm import (
    DecryptedRoomEvent,
    InboundGroupSessions,
    OutboundGroupSessions,
    OutboundSession,
    RotationSettings,
)
from bridge_kit.crypto.olm import OlmPayload, OlmSessions
from bridge_kit.crypto.signing import canonical_json, sign_json, verify_json
from bridge_kit.crypto.vault import CryptoStore, CryptoVault, derive_pickle_key

__all__ = [
    "MEGOLM_ALGORITHM",
    "OLM_ALGORITHM",
    "ROOM_KEY",
    "SIGNED_CURVE25519",
    "CryptoMachine",
    "CryptoStore",
    "CryptoVault",
    "DecryptedRoomEvent",
    "DeviceTracker",
    "InboundGroupSessions",
    "KeyUpload",
    "KeysApi",
    "OlmAccount",
    "OlmPayload",
    "OlmSessions",
    "OutboundGroupSessions",
    "OutboundSession",
    "RotationSettings",
    "TrackedDevice",
    "canonical_json",
    "derive_pickle_key",
    "sign_json",
    "verified_device",
    "verify_json",
]

# Deprecated (see CHANGELOG): the old name of TrackedDevice, which
# bridge_kit.types.Device (a device as the homeserver lists it) shared.
__getattr__ = renamed(__name__, {"Device": ("TrackedDevice", TrackedDevice)})
if TYPE_CHECKING:
    Device = TrackedDevice
