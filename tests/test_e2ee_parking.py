"""Events waiting for their room key, on real Synapse with matrix-nio as the human:
they are parked, so the room goes on; the key or a withheld notice ends the wait.

The held-back keys are those of a hand-made libolm Megolm session of the human
(nio shares its own sessions with the bot at once); the key, when it comes, is
sent over Olm as a client shares it, and withheld notices are sent in the clear,
as clients send them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import olm
import pytest

from bridge_kit import AppService, HomeserverClient
from bridge_kit.crypto import CryptoMachine
from tests.conftest import TestHomeserver
from tests.helpers.crypto_peers import OlmPeer, megolm_content
from tests.helpers.e2ee_users import NioUser, nio_user
from tests.test_e2ee_synapse import (
    PING,
    PINGS,
    Seen,
    _dead_letter,
    _send,
    bridged_room,
    encrypted_app,
    eventually,
    eventually_async,
)

pytestmark = pytest.mark.slow
#: Far longer than any wait below: an event that held its lane would fail the test.
KEY_WAIT = 600.0


async def _parked(app: AppService, count: int) -> bool:
    return len(await app.store.parked_items()) == count


class HeldBack:
    """A Megolm session of the human's, made by hand on libolm, whose key the bot lacks."""

    def __init__(self, human: NioUser) -> None:
        self.peer = OlmPeer(human.user_id, "HANDMADE")
        self.group = olm.OutboundGroupSession()
        self.session_key = self.group.session_key  # from index 0, before any message

    @property
    def session_id(self) -> str:
        return str(self.group.id)


async def _send_held_back(
    hs: TestHomeserver, human: NioUser, room_id: str, held: HeldBack, body: str
) -> None:
    """A message of the human's, encrypted with a session whose key the bot lacks."""
    peer, group = held.peer, held.group
    content = megolm_content(group, peer, room_id, "m.room.message",
                             {"msgtype": "m.text", "body": body})  # fmt: skip
    async with HomeserverClient(hs.url, human.client.access_token) as raw:
        await _send(raw, room_id, content)


async def _share_key(
    hs: TestHomeserver,
    human: NioUser,
    machine: CryptoMachine,
    room_id: str,
    held: HeldBack,
) -> None:
    """The room key over Olm, as a client shares it: claim, session, m.room_key."""
    peer, group = held.peer, held.group
    bot, device = machine.user_id, machine.device_id
    async with HomeserverClient(hs.url, human.client.access_token) as raw:
        claim = await raw.request(
            "POST", "/_matrix/client/v3/keys/claim",
            body={"one_time_keys": {bot: {device: "signed_curve25519"}}},
        )  # fmt: skip
        [one_time] = claim["one_time_keys"][bot][device].values()
        keys = machine.identity_keys()
        peer.start_session(keys["curve25519"], one_time["key"])
        room_key = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": room_id,
            "session_id": group.id,
            "session_key": held.session_key,
        }
        content = peer.encrypt_to(bot, keys["curve25519"], keys["ed25519"], "m.room_key", room_key)
        await raw.request(
            "PUT", f"/_matrix/client/v3/sendToDevice/m.room.encrypted/{time.time_ns()}",
            body={"messages": {bot: {device: content}}},
        )  # fmt: skip


def _withheld(human: NioUser, room_id: str, session_id: str, code: str, reason: str) -> Any:
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": room_id,
        "session_id": session_id,
        "sender_key": human.client.olm.account.identity_keys["curve25519"],
        "code": code,
        "reason": reason,
    }


async def _to_bot(
    hs: TestHomeserver,
    token: str,
    app: AppService,
    event_type: str,
    content: Any,
    user_id: str | None = None,
) -> None:
    """A to-device message in the clear to the bot's device, then a ping behind it in
    the same lane: when the ping is handled, so was the message."""
    bot, device = app.bot.user_id, app.encryption.device_id
    ping = str(time.time_ns())
    async with HomeserverClient(hs.url, token) as raw:
        for sent_type, sent in ((event_type, content), (PING, {"n": ping})):
            path = f"/_matrix/client/v3/sendToDevice/{sent_type}/{time.time_ns()}"
            body = {"messages": {bot: {device: sent}}}
            await raw.request("PUT", path, body=body, user_id=user_id)
    await eventually(lambda: ping in PINGS[id(app)], "the bridge handled the to-device message")


async def test_an_event_without_its_key_does_not_stall_its_room_and_runs_when_the_key_comes(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    app = encrypted_app(hs, tmp_path / "bk.db", key_wait=KEY_WAIT)
    seen = Seen(app)
    async with nio_user(hs, f"park{unique}", tmp_path / "nio") as human, app:
        room_id, _ = await bridged_room(hs, app, human, f"_bk_park{unique}")
        held = HeldBack(human)
        await _send_held_back(hs, human, room_id, held, "held back")
        await eventually_async(lambda: _parked(app, 1), "the event was parked")

        await human.send(room_id, "right after", (app.bot.user_id,))
        after = await seen.wait("right after")
        assert after.encrypted
        assert "held back" not in seen.events
        assert await app.dead_letters.list() == []

        await _share_key(hs, human, app.encryption.machine, room_id, held)
        event = await seen.wait("held back")
        assert event.encrypted and event.sender == human.user_id
        assert list(seen.events) == ["right after", "held back"]
        assert await _parked(app, 0)
        assert await app.dead_letters.list() == []


async def test_a_withheld_key_makes_the_waiting_event_a_dead_letter_at_once(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    app = encrypted_app(hs, tmp_path / "bk.db", key_wait=KEY_WAIT)
    async with nio_user(hs, f"held{unique}", tmp_path / "nio") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, f"_bk_held{unique}")
        token = human.client.access_token

        # Withheld after the event arrived: it was parked, now it is a dead letter.
        waiting = HeldBack(human)
        await _send_held_back(hs, human, room_id, waiting, "never shared")
        await eventually_async(lambda: _parked(app, 1), "the event was parked")
        # Someone else's notice about that session (here: one of our puppets, as a
        # homeserver user) ends nothing.
        notice = _withheld(
            human, room_id, waiting.session_id, "m.unverified", "Device not verified"
        )
        await _to_bot(hs, hs.as_token, app, "m.room_key.withheld", notice, puppet.user_id)
        assert await _parked(app, 1)
        assert await app.dead_letters.list() == []

        await _to_bot(hs, token, app, "m.room_key.withheld", notice)
        letter = await _dead_letter(app, "withheld")
        assert letter.error == "the room key was withheld (m.unverified): Device not verified"
        assert await _parked(app, 0)

        # Withheld before the event (the older type name): the event is buried on arrival.
        early = HeldBack(human)
        notice = _withheld(human, room_id, early.session_id, "m.blacklisted", "blocked")
        await _to_bot(hs, token, app, "org.matrix.room_key.withheld", notice)
        await _send_held_back(hs, human, room_id, early, "withheld first")
        letter = await _dead_letter(app, "m.blacklisted")
        assert letter.error == "the room key was withheld (m.blacklisted): blocked"
        assert await _parked(app, 0)
