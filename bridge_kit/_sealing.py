"""Secrets at rest: AES-256-GCM with keys derived (HKDF-SHA256) from one configured
secret, each sealed value bound to where it is stored.

The crypto state's sealed records (:mod:`bridge_kit.crypto.vault`) and the
double puppets' access tokens (:mod:`bridge_kit.intent.double_puppet`) are sealed
this way, each with a key of its own derived from the same secret
(``encryption.pickle_key``, or the registration's as_token when it is unset).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from bridge_kit.errors import WrongPickleKey

__all__ = ["NONCE_SIZE", "Sealer", "hkdf_sha256"]

#: The AES-GCM nonce that opens a sealed value, in bytes.
NONCE_SIZE: Final = 12


def hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract, then expand)."""
    prk = hmac.digest(salt, secret, "sha256")
    out, block = b"", b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


class Sealer:
    """AES-256-GCM with one 32-byte key: the nonce, then the ciphertext and tag."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key must be 32 bytes")
        # Imported on first use: bridge_kit imports (and says what is missing, see
        # bridge_kit.checks) without it.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._invalid: type[Exception] = InvalidTag

    def __repr__(self) -> str:  # never show the key
        return "Sealer()"

    def seal(self, data: bytes, bound_to: bytes) -> bytes:
        """``data`` encrypted and authenticated, bound to ``bound_to`` (where it is kept)."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, bound_to)

    def open(self, sealed: bytes, bound_to: bytes) -> bytes:
        """What :meth:`seal` sealed with this key and ``bound_to``; else
        :class:`~bridge_kit.errors.WrongPickleKey` (another key sealed it, or it was
        changed or moved)."""
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], bound_to)
        except self._invalid:
            raise WrongPickleKey("the sealed value does not open with this key") from None
