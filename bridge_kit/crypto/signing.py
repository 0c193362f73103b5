"""Canonical JSON, unpadded base64 and Ed25519 signatures of JSON objects, per the
Matrix specification ("Signing JSON", appendices)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, Final

import vodozemac

__all__ = [
    "canonical_json",
    "sign_json",
    "signable",
    "signature_of",
    "unpadded_b64decode",
    "unpadded_b64encode",
    "verify_json",
]

# The spec's canonical JSON: keys sorted, no insignificant whitespace, UTF-8 (not
# \u-escaped), no floats that do not round-trip (NaN and infinity refused).
_CANONICAL: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of ``value``."""
    return _CANONICAL.encode(value).encode("utf-8")


def unpadded_b64encode(data: bytes) -> str:
    """Standard base64 without the ``=`` padding, as Matrix writes keys and ciphertexts."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def unpadded_b64decode(text: str) -> bytes:
    """Decode (unpadded or padded) standard base64; :class:`ValueError` if it is not."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from None


def signable(value: Mapping[str, Any]) -> bytes:
    """What a signature covers: the object without its ``signatures`` and ``unsigned``."""
    return canonical_json({k: v for k, v in value.items() if k not in ("signatures", "unsigned")})


def sign_json(
    value: Mapping[str, Any], account: vodozemac.Account, user_id: str, key_id: str
) -> dict[str, Any]:
    """A copy of ``value`` with ``signatures[user_id]["ed25519:" + key_id]`` added."""
    signature = account.sign(signable(value)).to_base64()
    signed = dict(value)
    signatures = {user: dict(keys) for user, keys in value.get("signatures", {}).items()}
    signatures.setdefault(user_id, {})[f"ed25519:{key_id}"] = signature
    signed["signatures"] = signatures
    return signed


def signature_of(value: Mapping[str, Any], user_id: str, key_id: str) -> str | None:
    """The signature ``value`` carries by ``user_id`` with ``ed25519:key_id``, if any."""
    signatures = value.get("signatures")
    by_user = signatures.get(user_id) if isinstance(signatures, Mapping) else None
    found = by_user.get(f"ed25519:{key_id}") if isinstance(by_user, Mapping) else None
    return found if isinstance(found, str) else None


def verify_json(value: Mapping[str, Any], user_id: str, key_id: str, ed25519_key: str) -> bool:
    """Whether ``value`` carries a valid signature by ``user_id``'s ``ed25519:key_id`` key.

    ``ed25519_key`` is the unpadded base64 public key. Anything malformed (no such
    signature, a key or signature that does not decode, a value that is not canonical
    JSON) is simply "not verified".
    """
    signature = signature_of(value, user_id, key_id)
    if signature is None:
        return False
    try:
        key = vodozemac.Ed25519PublicKey.from_base64(ed25519_key)
        key.verify_signature(signable(value), vodozemac.Ed25519Signature.from_base64(signature))
    except (ValueError, TypeError):
        return False
    return True
