"""A user's cross-signing identity (spec, "Cross-signing"): a master key, a
self-signing key that signs the user's devices, and a user-signing key.

Today's clients show a message from a device its owner did not sign as a red
shield, and strict clients (MSC4153) send it no room keys. So the bot (with
``encryption.self_sign``) and each puppet device (``encryption.puppet_devices``)
get an identity that signs their device. The three Ed25519 seeds are sealed in
the store with the pickle key; the public keys go up with
``/keys/device_signing/upload``, which an appservice may call without interactive
auth (spec v1.17), and the device's signature with ``/keys/signatures/upload``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Mapping
from typing import Any, Final, Protocol

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bridge_kit.crypto.signing import signable, unpadded_b64encode
from bridge_kit.crypto.vault import CryptoVault
from bridge_kit.errors import CrossSigningFailed, CryptoError, MatrixRequestError

__all__ = ["CrossSigning", "CrossSigningKeys", "SigningApi", "recovery_key", "stored_identity"]

_log = logging.getLogger(__name__)

_KIND: Final = "cross_signing"
_SEEDS: Final = "seeds"
_PUBLISHED: Final = "published"
_SEED_SIZE: Final = 32
#: The spec's recovery key: two prefix bytes, the 32-byte key, a parity byte, base58.
_RECOVERY_PREFIX: Final = b"\x8b\x01"
_BASE58: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class SigningApi(Protocol):
    """The homeserver calls a cross-signing identity needs, made as its user."""

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        """``POST /keys/query``: the answer body."""

    async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
        """``POST /keys/device_signing/upload``."""

    async def upload_signatures(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """``POST /keys/signatures/upload``: the answer (its ``failures``)."""


def _public(key: Ed25519PrivateKey) -> str:
    return unpadded_b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def _signed(value: Mapping[str, Any], key: Ed25519PrivateKey, user_id: str) -> dict[str, Any]:
    """A copy of ``value`` signed by ``user_id``'s cross-signing ``key``."""
    signature = unpadded_b64encode(key.sign(signable(value)))
    signatures = {user: dict(keys) for user, keys in value.get("signatures", {}).items()}
    signatures.setdefault(user_id, {})[f"ed25519:{_public(key)}"] = signature
    return {**value, "signatures": signatures}


@attrs.frozen
class CrossSigningKeys:
    """The three private keys of one user's identity."""

    master: Ed25519PrivateKey
    self_signing: Ed25519PrivateKey
    user_signing: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> CrossSigningKeys:
        return cls.from_seeds(secrets.token_bytes(3 * _SEED_SIZE))

    @classmethod
    def from_seeds(cls, seeds: bytes) -> CrossSigningKeys:
        if len(seeds) != 3 * _SEED_SIZE:
            raise CryptoError(f"a cross-signing record holds {3 * _SEED_SIZE} bytes")
        parts = [seeds[i : i + _SEED_SIZE] for i in range(0, len(seeds), _SEED_SIZE)]
        return cls(*(Ed25519PrivateKey.from_private_bytes(part) for part in parts))

    def seeds(self) -> bytes:
        return b"".join(
            key.private_bytes_raw() for key in (self.master, self.self_signing, self.user_signing)
        )

    @property
    def master_public(self) -> str:
        return _public(self.master)

    def upload_body(self, user_id: str) -> dict[str, Any]:
        """The ``/keys/device_signing/upload`` body: the master key, and the other two
        signed by it."""
        master = self._key(user_id, "master", self.master)
        return {
            "master_key": master,
            "self_signing_key": _signed(
                self._key(user_id, "self_signing", self.self_signing), self.master, user_id
            ),
            "user_signing_key": _signed(
                self._key(user_id, "user_signing", self.user_signing), self.master, user_id
            ),
        }

    @staticmethod
    def _key(user_id: str, usage: str, key: Ed25519PrivateKey) -> dict[str, Any]:
        public = _public(key)
        return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{public}": public}}

    def sign_device(self, device_keys: Mapping[str, Any]) -> dict[str, Any]:
        """``device_keys`` (as uploaded) signed by the self-signing key."""
        return _signed(device_keys, self.self_signing, str(device_keys["user_id"]))


@attrs.frozen
class _Published:
    """What the homeserver got already: the master key, and the device it signed."""

    master: str
    device_id: str


class CrossSigning:
    """The identity of ``user_id``, kept sealed in ``vault``, signing one device."""

    def __init__(self, vault: CryptoVault, user_id: str, api: SigningApi) -> None:
        self.vault = vault
        self.user_id = user_id
        self.api = api
        self.keys: CrossSigningKeys | None = None

    async def ensure(self, device_keys: Mapping[str, Any]) -> CrossSigningKeys:
        """Load or create the identity, publish it if the homeserver lacks it, and sign
        the device whose (uploaded) ``device_keys`` are given; return the keys."""
        keys = await self._load_or_create()
        device_id = str(device_keys["device_id"])
        published = await self.vault.get_record(_KIND, _PUBLISHED, _Published)
        if published == _Published(keys.master_public, device_id):
            return keys
        try:
            await self.api.upload_signing_keys(keys.upload_body(self.user_id))
        except MatrixRequestError as exc:
            raise CrossSigningFailed(
                f"the homeserver refused the cross-signing keys of {self.user_id} "
                f"({exc.status} {exc.errcode or 'no errcode'}: {exc.message}); an appservice "
                "may upload them without interactive auth since spec v1.17 (Synapse does)"
            ) from exc
        reply = await self.api.upload_signatures(
            {self.user_id: {device_id: keys.sign_device(device_keys)}}
        )
        failures = reply.get("failures")
        if isinstance(failures, Mapping) and failures:
            raise CrossSigningFailed(
                f"the homeserver refused the signature of {self.user_id}'s device "
                f"{device_id}: {failures}"
            )
        await self.vault.put_record(_KIND, _PUBLISHED, _Published(keys.master_public, device_id))
        return keys

    async def stored(self) -> CrossSigningKeys | None:
        """The identity in the store, if one was made."""
        if self.keys is None:
            self.keys = await stored_identity(self.vault)
        return self.keys

    async def _load_or_create(self) -> CrossSigningKeys:
        stored = await self.stored()
        if stored is not None:
            return stored
        replaced = await self._master_on_server()
        keys = CrossSigningKeys.generate()
        await self.vault.put_sealed(_KIND, _SEEDS, keys.seeds())
        if replaced is not None:
            _log.warning(
                "%s had the cross-signing identity %s on the homeserver, which this store "
                "does not hold (a new or reset store): it is REPLACED by %s; people who "
                "verified %s must verify it again",
                self.user_id, replaced, keys.master_public, self.user_id,
            )  # fmt: skip
        self.keys = keys
        return keys

    async def _master_on_server(self) -> str | None:
        answer = await self.api.query_keys([self.user_id])
        masters = answer.get("master_keys")
        master = masters.get(self.user_id) if isinstance(masters, Mapping) else None
        keys = master.get("keys") if isinstance(master, Mapping) else None
        if isinstance(keys, Mapping):
            return next((str(v) for v in keys.values()), None)
        return None


async def stored_identity(vault: CryptoVault) -> CrossSigningKeys | None:
    """The identity sealed in ``vault`` (the user's own), if one was made."""
    seeds = await vault.get_sealed(_KIND, _SEEDS)
    return None if seeds is None else CrossSigningKeys.from_seeds(seeds)


def recovery_key(key: Ed25519PrivateKey) -> str:
    """A private key in the spec's recovery-key encoding ("Key representation"):
    prefix, key, parity byte, base58, in groups of four."""
    raw = _RECOVERY_PREFIX + key.private_bytes_raw()
    parity = 0
    for byte in raw:
        parity ^= byte
    encoded = _base58(raw + bytes([parity]))
    return " ".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_BASE58[digit])
    leading = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading + "".join(reversed(digits))
