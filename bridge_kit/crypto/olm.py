"""Olm sessions with other devices: decrypting to-device ``m.room.encrypted``
(``m.olm.v1.curve25519-aes-sha2``) and encrypting to-device payloads to a device.

Olm decrypts a message once (its message key is gone afterwards), while the inbox
runs decryption again on every attempt of an item and on a replayed dead letter
(a new item). So each plaintext is kept, sealed (see
:meth:`~bridge_kit.crypto.vault.CryptoVault.put_sealed`), under a digest of its
sender and ciphertext: the same message decrypts to the same payload again,
checked again. A homeserver sending a message twice therefore gets it handled
twice, as with any at-least-once delivery.

Anyone can start a session with our fallback key, one per message they send. So a
new session (and the sealed plaintext) is kept only once its payload passed the
checks, and at most :data:`MAX_SESSIONS_PER_KEY` per device, the newest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any, Final

import attrs
import vodozemac

from bridge_kit._json import decode_json
from bridge_kit.crypto.account import OLM_ALGORITHM, SIGNED_CURVE25519, OlmAccount
from bridge_kit.crypto.devices import DeviceTracker, TrackedDevice
from bridge_kit.crypto.payloads import OlmCiphertext, OlmEncryptedContent, OlmPlaintext
from bridge_kit.crypto.signing import (
    canonical_json,
    unpadded_b64decode,
    unpadded_b64encode,
    verify_json,
)
from bridge_kit.crypto.vault import CryptoVault
from bridge_kit.errors import UndecryptableEvent
from bridge_kit.store.retention import SEALED_PAYLOADS
from bridge_kit.types.converter import converter

__all__ = ["OlmPayload", "OlmSessions"]

_KIND: Final = "olm_sessions"
_DECRYPTED: Final = SEALED_PAYLOADS  # pruned by age (bridge_kit.store.retention)
_PRE_KEY: Final = 0
_NORMAL: Final = 1
#: Olm sessions kept per device (curve25519 key), the newest: anyone can start
#: sessions with our fallback key, as many as they send messages.
MAX_SESSIONS_PER_KEY: Final = 10


@attrs.frozen
class OlmPayload:
    """A decrypted to-device payload, checked against the envelope it came in."""

    sender: str
    sender_key: str
    """The sending device's curve25519 key (proven by the Olm session)."""
    sender_ed25519: str
    """The ed25519 key the sender claims inside the encryption."""
    type: str
    content: dict[str, Any]
    sender_device: TrackedDevice | None = None
    """The sender's device, when the tracker knows one with ``sender_key``."""


def _olm_message(content: Mapping[str, Any], our_key: str) -> tuple[str, vodozemac.AnyOlmMessage]:
    """The sender key and the Olm message for our key in a to-device content."""
    if content.get("algorithm") != OLM_ALGORITHM:
        raise UndecryptableEvent(f"unsupported algorithm {content.get('algorithm')!r}")
    sender_key = content.get("sender_key")
    ciphertexts = content.get("ciphertext")
    if not isinstance(sender_key, str) or not isinstance(ciphertexts, Mapping):
        raise UndecryptableEvent("no sender_key or ciphertext")
    mine = ciphertexts.get(our_key)
    if not isinstance(mine, Mapping):
        raise UndecryptableEvent("not encrypted for this device")
    kind, body = mine.get("type"), mine.get("body")
    if kind not in (_PRE_KEY, _NORMAL) or isinstance(kind, bool) or not isinstance(body, str):
        raise UndecryptableEvent("the ciphertext has no valid type or body")
    try:
        return sender_key, vodozemac.AnyOlmMessage.from_parts(kind, unpadded_b64decode(body))
    except ValueError as exc:
        raise UndecryptableEvent(f"malformed Olm message: {exc}") from None


def _digest(sender: str, sender_key: str, message: vodozemac.AnyOlmMessage) -> str:
    """The name of one message's kept plaintext: its sender and its ciphertext."""
    kind, body = message.to_parts()
    named = f"{sender}\0{sender_key}\0{kind}\0".encode("utf-8", "surrogatepass")
    return hashlib.sha256(named + body).hexdigest()


class OlmSessions:
    """The Olm sessions of one device (ours), by the other device's curve25519 key."""

    def __init__(self, account: OlmAccount, vault: CryptoVault, tracker: DeviceTracker) -> None:
        self.account = account
        self.vault = vault
        self.tracker = tracker
        # Oldest first; the newest is used to encrypt (it is the one the peer last set up).
        self._sessions: dict[str, list[tuple[str, vodozemac.Session]]] = {}

    async def load(self) -> None:
        """Read the sessions back, pruning each device's beyond the newest
        :data:`MAX_SESSIONS_PER_KEY` (a flood kept by an earlier release)."""
        stored = await self.vault.store.crypto_items(self.vault.owner, _KIND)
        for key in sorted(stored):
            curve = key.split("|", 1)[0]
            session = self.vault.unseal(vodozemac.Session.from_pickle, stored[key], "Olm session")
            self._sessions.setdefault(curve, []).append((key, session))
        for curve in list(self._sessions):
            await self._prune(curve)

    def has_session(self, curve25519: str) -> bool:
        return bool(self._sessions.get(curve25519))

    def count(self, curve25519: str) -> int:
        """How many sessions with the device of ``curve25519`` are kept."""
        return len(self._sessions.get(curve25519, ()))

    async def _add(self, curve25519: str, session: vodozemac.Session) -> None:
        key = f"{curve25519}|{time.time_ns():020d}|{session.session_id}"
        self._sessions.setdefault(curve25519, []).append((key, session))
        await self.vault.put_pickle(_KIND, key, session)
        await self._prune(curve25519)

    async def _prune(self, curve25519: str) -> None:
        """Forget the oldest sessions with a device beyond the cap."""
        sessions = self._sessions[curve25519]
        while len(sessions) > MAX_SESSIONS_PER_KEY:
            key, _ = sessions.pop(0)
            await self.vault.delete(_KIND, key)

    # -- incoming --------------------------------------------------------------

    async def decrypt(self, sender: str, content: Mapping[str, Any]) -> OlmPayload:
        """Decrypt a to-device ``m.room.encrypted`` sent by ``sender``; raises
        :class:`UndecryptableEvent` with the reason for anything else."""
        sender_key, message = _olm_message(content, self.account.curve25519)
        digest = _digest(sender, sender_key, message)
        kept = await self.vault.get_sealed(_DECRYPTED, digest)
        if kept is not None:
            return self._checked_payload(sender, sender_key, kept)
        plaintext, new_session = await self._plaintext(sender_key, message)
        # Checked before anything is kept: a message that fails leaves no session and
        # no sealed payload behind (else one garbage message on our fallback key, which
        # anyone can claim, would store one of each).
        payload = self._checked_payload(sender, sender_key, plaintext)
        if new_session is not None:
            await self._add(sender_key, new_session)
            await self.account.save()  # the one-time key it used is gone from the account
        await self.vault.put_sealed(_DECRYPTED, digest, plaintext)
        return payload

    async def _plaintext(
        self, sender_key: str, message: vodozemac.AnyOlmMessage
    ) -> tuple[bytes, vodozemac.Session | None]:
        """The plaintext, and the new inbound session if a pre-key message started
        one (not kept yet: the payload is checked first)."""
        pre_key = message.to_pre_key()
        for key, session in reversed(self._sessions.get(sender_key, [])):
            if pre_key is not None and not session.session_matches(pre_key):
                continue
            try:
                plaintext = session.decrypt(message)
            except ValueError:
                continue
            # Its ratchet moved on in memory: kept, whatever the payload holds.
            await self.vault.store.crypto_put(
                self.vault.owner, _KIND, key, self.vault.seal(session)
            )
            return plaintext, None
        if pre_key is None:
            raise UndecryptableEvent("no Olm session with the sender decrypts it")
        try:
            identity = vodozemac.Curve25519PublicKey.from_base64(sender_key)
            session, plaintext = self.account.account.create_inbound_session(identity, pre_key)
        except ValueError as exc:
            raise UndecryptableEvent(f"cannot start an Olm session: {exc}") from None
        return plaintext, session

    def _checked_payload(self, sender: str, sender_key: str, plaintext: bytes) -> OlmPayload:
        """The spec's checks of a decrypted Olm payload against its envelope."""
        try:
            payload = decode_json(plaintext.decode("utf-8"))
        except ValueError:
            raise UndecryptableEvent("the plaintext is not JSON") from None
        if not isinstance(payload, Mapping):
            raise UndecryptableEvent("the plaintext is not a JSON object")
        if payload.get("sender") != sender:
            raise UndecryptableEvent("the encrypted sender is not the event's sender")
        if payload.get("recipient") != self.account.user_id:
            raise UndecryptableEvent("encrypted for another recipient")
        recipient_keys = payload.get("recipient_keys")
        if not isinstance(recipient_keys, Mapping) or (
            recipient_keys.get("ed25519") != self.account.ed25519
        ):
            raise UndecryptableEvent("encrypted for another recipient device")
        keys = payload.get("keys")
        sender_ed25519 = keys.get("ed25519") if isinstance(keys, Mapping) else None
        event_type, inner = payload.get("type"), payload.get("content")
        if not isinstance(sender_ed25519, str) or not isinstance(event_type, str):
            raise UndecryptableEvent("the plaintext has no sender ed25519 key or type")
        if not isinstance(inner, dict):
            raise UndecryptableEvent("the plaintext has no content object")
        device = self.tracker.device_by_curve25519(sender, sender_key)
        if device is not None and device.ed25519 != sender_ed25519:
            raise UndecryptableEvent("the sender's ed25519 key is not its device's key")
        return OlmPayload(sender, sender_key, sender_ed25519, event_type, inner, device)

    # -- outgoing --------------------------------------------------------------

    async def create_outbound(
        self, device: TrackedDevice, claimed: Mapping[str, Any]
    ) -> str | None:
        """Start a session with ``device`` from its ``/keys/claim`` entry; return why
        not (the key is missing, unsigned or signed by another key), or ``None``."""
        for key_id, body in claimed.items():
            if not key_id.startswith(f"{SIGNED_CURVE25519}:") or not isinstance(body, Mapping):
                continue
            if not verify_json(body, device.user_id, device.device_id, device.ed25519):
                return f"the one-time key {key_id} has no valid signature by the device"
            key = body.get("key")
            if not isinstance(key, str):
                return f"the one-time key {key_id} has no key"
            try:
                session = self.account.account.create_outbound_session(
                    vodozemac.Curve25519PublicKey.from_base64(device.curve25519),
                    vodozemac.Curve25519PublicKey.from_base64(key),
                )
            except ValueError as exc:
                return f"cannot start an Olm session: {exc}"
            await self._add(device.curve25519, session)
            return None
        return "no signed_curve25519 one-time key was claimed"

    async def encrypt(
        self, device: TrackedDevice, event_type: str, content: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The to-device ``m.room.encrypted`` content carrying ``event_type`` and
        ``content`` to ``device``, over the newest session with it (which must exist)."""
        key, session = self._sessions[device.curve25519][-1]
        payload = OlmPlaintext(
            type=event_type,
            content=dict(content),
            sender=self.account.user_id,
            sender_device=self.account.device_id,
            keys={"ed25519": self.account.ed25519},
            recipient=device.user_id,
            recipient_keys={"ed25519": device.ed25519},
        )
        plaintext = canonical_json(converter.unstructure(payload))
        kind, body = session.encrypt(plaintext).to_parts()
        await self.vault.store.crypto_put(self.vault.owner, _KIND, key, self.vault.seal(session))
        encrypted = OlmEncryptedContent(
            algorithm=OLM_ALGORITHM,
            sender_key=self.account.curve25519,
            ciphertext={device.curve25519: OlmCiphertext(kind, unpadded_b64encode(body))},
        )
        result: dict[str, Any] = converter.unstructure(encrypted)
        return result
