"""Independent peers for the crypto core's tests: python-olm (libolm, a separate
implementation) devices, and an in-process key directory
that stands in for the homeserver's /keys and /sendToDevice routes between them."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import olm

from bridge_kit.crypto import MEGOLM_ALGORITHM, OLM_ALGORITHM, canonical_json
from bridge_kit.crypto.signing import unpadded_b64encode


def _signed(
    account: olm.Account, user_id: str, device_id: str, value: dict[str, Any]
) -> dict[str, Any]:
    signature = account.sign(canonical_json(value))
    return {**value, "signatures": {user_id: {f"ed25519:{device_id}": signature}}}


class OlmPeer:
    """A device of another user, on libolm: what a human's client would be."""

    def __init__(self, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.account = olm.Account()
        self.sessions: dict[str, list[olm.Session]] = {}
        self.group_sessions: dict[str, olm.InboundGroupSession] = {}

    @property
    def curve25519(self) -> str:
        return str(self.account.identity_keys["curve25519"])

    @property
    def ed25519(self) -> str:
        return str(self.account.identity_keys["ed25519"])

    def device_keys(self) -> dict[str, Any]:
        body = {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM_ALGORITHM, MEGOLM_ALGORITHM],
            "keys": {
                f"curve25519:{self.device_id}": self.curve25519,
                f"ed25519:{self.device_id}": self.ed25519,
            },
        }
        return _signed(self.account, self.user_id, self.device_id, body)

    def claim_one_time_key(self) -> dict[str, Any]:
        """One signed one-time key, as /keys/claim hands it out."""
        self.account.generate_one_time_keys(1)
        key_id, key = next(iter(self.account.one_time_keys["curve25519"].items()))
        self.account.mark_keys_as_published()
        return {
            f"signed_curve25519:{key_id}": _signed(
                self.account, self.user_id, self.device_id, {"key": key}
            )
        }

    def payload(
        self, to_user: str, to_ed25519: str, event_type: str, content: dict[str, Any]
    ) -> str:
        return json.dumps(
            {
                "type": event_type,
                "content": content,
                "sender": self.user_id,
                "sender_device": self.device_id,
                "keys": {"ed25519": self.ed25519},
                "recipient": to_user,
                "recipient_keys": {"ed25519": to_ed25519},
            }
        )

    def start_session(self, their_curve: str, their_one_time_key: str) -> None:
        session = olm.OutboundSession(self.account, their_curve, their_one_time_key)
        self.sessions.setdefault(their_curve, []).append(session)

    def encrypt_raw(self, their_curve: str, plaintext: str) -> dict[str, Any]:
        message = self.sessions[their_curve][-1].encrypt(plaintext)
        return {
            "algorithm": OLM_ALGORITHM,
            "sender_key": self.curve25519,
            "ciphertext": {their_curve: {"type": message.message_type, "body": message.ciphertext}},
        }

    def encrypt_to(
        self,
        their_user: str,
        their_curve: str,
        their_ed25519: str,
        event_type: str,
        content: dict[str, Any],
    ) -> dict[str, Any]:
        plaintext = self.payload(their_user, their_ed25519, event_type, content)
        return self.encrypt_raw(their_curve, plaintext)

    def decrypt(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Decrypt an Olm to-device content for this device (inbound session if new)."""
        mine = content["ciphertext"][self.curve25519]
        sender_key = content["sender_key"]
        if mine["type"] == 0:
            message: olm.OlmMessage | olm.OlmPreKeyMessage = olm.OlmPreKeyMessage(mine["body"])
            for session in self.sessions.get(sender_key, []):
                if session.matches(message, sender_key):
                    return dict(json.loads(session.decrypt(message)))
            session = olm.InboundSession(self.account, message, sender_key)
            self.account.remove_one_time_keys(session)
            self.sessions.setdefault(sender_key, []).append(session)
            return dict(json.loads(session.decrypt(message)))
        message = olm.OlmMessage(mine["body"])
        for session in reversed(self.sessions.get(sender_key, [])):
            try:
                return dict(json.loads(session.decrypt(message)))
            except olm.OlmSessionError:
                continue
        raise AssertionError("no session decrypts it")

    def take_room_key(self, payload: Mapping[str, Any]) -> None:
        assert payload["type"] == "m.room_key"
        content = payload["content"]
        self.group_sessions[content["session_id"]] = olm.InboundGroupSession(content["session_key"])

    def decrypt_room(self, content: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        session = self.group_sessions[content["session_id"]]
        plaintext, index = session.decrypt(content["ciphertext"])
        return dict(json.loads(plaintext)), index


def megolm_content(
    session: olm.OutboundGroupSession,
    peer: OlmPeer,
    room_id: str,
    event_type: str,
    content: dict[str, Any],
) -> dict[str, Any]:
    """A room m.room.encrypted content made by libolm."""
    plaintext = json.dumps({"type": event_type, "content": content, "room_id": room_id})
    return {
        "algorithm": MEGOLM_ALGORITHM,
        "sender_key": peer.curve25519,
        "ciphertext": session.encrypt(plaintext),
        "session_id": session.id,
        "device_id": peer.device_id,
    }


class KeyDirectory:
    """The homeserver's key routes for one machine, in process: it keeps what the
    machine uploads, hands out peers' keys, and collects to-device messages."""

    def __init__(self) -> None:
        self.peers: dict[str, dict[str, OlmPeer]] = {}
        self.uploaded_device_keys: dict[str, Any] | None = None
        self.one_time_keys: dict[str, Any] = {}
        self.fallback_keys: dict[str, Any] = {}
        self.sent: list[tuple[str, dict[str, dict[str, Any]]]] = []
        self.queries: list[list[str]] = []
        self.claims = 0

    def add(self, peer: OlmPeer) -> OlmPeer:
        self.peers.setdefault(peer.user_id, {})[peer.device_id] = peer
        return peer

    def remove(self, peer: OlmPeer) -> None:
        del self.peers[peer.user_id][peer.device_id]

    async def upload_keys(
        self,
        device_keys: dict[str, Any] | None,
        one_time_keys: dict[str, Any],
        fallback_keys: dict[str, Any],
    ) -> Mapping[str, int]:
        if device_keys is not None:
            self.uploaded_device_keys = device_keys
        self.one_time_keys.update(one_time_keys)
        self.fallback_keys = fallback_keys or self.fallback_keys
        return {"signed_curve25519": len(self.one_time_keys)}

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        self.queries.append(sorted(user_ids))
        return {
            "device_keys": {
                user: {
                    device_id: peer.device_keys()
                    for device_id, peer in self.peers.get(user, {}).items()
                }
                for user in user_ids
            }
        }

    async def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> Mapping[str, Any]:
        self.claims += 1
        return {
            user: {device: self.peers[user][device].claim_one_time_key() for device in devices}
            for user, devices in wanted.items()
        }

    async def send_to_device(
        self, event_type: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.sent.append((event_type, {u: dict(d) for u, d in messages.items()}))

    def deliver(self, sender: str) -> None:
        """Hand every collected to-device message to its peer (room keys are taken in)."""
        for event_type, messages in self.sent:
            assert event_type == "m.room.encrypted"
            for user, devices in messages.items():
                for device_id, content in devices.items():
                    peer = self.peers[user].get(device_id)
                    if peer is None:
                        continue
                    payload = peer.decrypt(content)
                    assert payload["sender"] == sender
                    peer.take_room_key(payload)
        self.sent.clear()


def raw_b64(data: bytes) -> str:
    return unpadded_b64encode(data)
