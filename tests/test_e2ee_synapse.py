"""Encrypted rooms end to end: real Synapse (experimental to-device/MSC3202 options, our
registration with the MSC4190 flags), bridge_kit's AppService with encryption on, and
matrix-nio (libolm) as the human user, in an encrypted room with a puppet."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import olm
import pytest

from bridge_kit import (
    AppService,
    AppServiceConfig,
    Config,
    Event,
    HomeserverClient,
    HomeserverConfig,
)
from bridge_kit.client.homeserver import quote_segment
from bridge_kit.config import EncryptionConfig
from bridge_kit.crypto import RotationSettings
from bridge_kit.crypto.signing import unpadded_b64decode
from bridge_kit.errors import ConfigError
from bridge_kit.types import ToDeviceEvent
from tests.conftest import TestHomeserver
from tests.helpers.crypto_peers import OlmPeer, megolm_content
from tests.helpers.e2ee_users import nio_user

pytestmark = pytest.mark.slow
TIMEOUT = 60.0
PICKLE_KEY = "a pickle key for the encryption tests"
PING = "org.example.ping"


PINGS: dict[int, set[str]] = {}


def encrypted_app(hs: TestHomeserver, db: Path, key_wait: float = 10.0) -> AppService:
    app = _app(hs, db, key_wait)
    pings = PINGS.setdefault(id(app), set())

    @app.on_to_device(PING)
    async def on_ping(event: ToDeviceEvent) -> None:
        pings.add(str(event.content.get("n")))

    return app


async def prime_to_device(hs: TestHomeserver, app: AppService, token: str) -> None:
    """Send the bot's device pings until one arrives.

    Synapse drops every to-device message while it has the appservice marked down
    (after a push failed: an app of an earlier test on this shared Synapse may have
    stopped while Synapse pushed to it) until its next retry succeeds; a room key
    lost that way would fail the test for a reason outside the test. (bridge_kit's
    own start no longer causes it: see the test of the first message after a start.)
    """
    bot, device = app.bot.user_id, app.encryption.device_id
    pings = PINGS[id(app)]
    async with HomeserverClient(hs.url, token) as client:
        for n in range(10):
            path = f"/_matrix/client/v3/sendToDevice/{PING}/ping{time.time_ns()}"
            await client.request("PUT", path, body={"messages": {bot: {device: {"n": n}}}})
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if pings:
                    return
                await asyncio.sleep(0.05)
    raise AssertionError("no to-device message reached the appservice")


def _app(hs: TestHomeserver, db: Path, key_wait: float) -> AppService:
    return AppService(
        Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path),
                store=f"sqlite:///{db}",
                port=hs.appservice_port,
                retry_backoff=0.2,
                retry_backoff_max=0.5,
            ),
            encryption=EncryptionConfig(enabled=True, pickle_key=PICKLE_KEY, key_wait=key_wait),
        )
    )


async def eventually(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


class Seen:
    """The decrypted messages an app's handler got, by body."""

    def __init__(self, app: AppService) -> None:
        self.events: dict[str, Event] = {}

        @app.on_event("m.room.message")
        async def on_message(event: Event) -> None:
            self.events[str(event.content.get("body"))] = event

    async def wait(self, body: str) -> Event:
        await eventually(lambda: body in self.events, f"the handler got {body!r}")
        return self.events[body]


async def bridged_room(
    hs: TestHomeserver, app: AppService, human: Any, puppet: str
) -> tuple[str, Any]:
    """An encrypted room made by ``human`` with the bot and a puppet joined."""
    intent = app.intent(puppet)
    await intent.ensure_registered()
    room_id = await human.create_encrypted_room(invite=[app.bot.user_id, intent.user_id])
    await app.bot.join_room(room_id)
    await intent.join_room(room_id)
    await human.until(
        lambda: (
            {app.bot.user_id, intent.user_id} <= set(human.client.rooms[room_id].users)
            if room_id in human.client.rooms
            else False
        ),
        "the bot and the puppet joined",
    )
    await eventually_async(
        lambda: app.room_state.is_encrypted(room_id), "the app knows the room is encrypted"
    )
    await prime_to_device(hs, app, human.client.access_token)
    return room_id, intent


async def eventually_async(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


async def test_messages_cross_both_ways_and_survive_a_restart(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs, db = synapse_devices, tmp_path / "bk.db"
    app = encrypted_app(hs, db)
    seen = Seen(app)
    async with nio_user(hs, f"human{unique}", tmp_path / "nio") as human:
        async with app:
            room_id, puppet = await bridged_room(hs, app, human, f"_bk_e2ee{unique}")
            await human.send(room_id, "hello bridge", (app.bot.user_id,))
            event = await seen.wait("hello bridge")
            assert event.encrypted and event.type == "m.room.message"
            assert event.sender == human.user_id and event.sender_device == human.device_id
            event_id = await puppet.send_text(room_id, "hello human")
            assert await human.until_decrypted(room_id, "hello human") == puppet.user_id
            # A reaction is encrypted too, its relation left readable (the spec's rule).
            assert event.event_id is not None
            reaction = await puppet.send_reaction(room_id, event.event_id, "👍")
            raw_reaction = await _raw_event(hs, puppet.user_id, room_id, reaction)
            assert raw_reaction["type"] == "m.room.encrypted"
            relation = raw_reaction["content"]["m.relates_to"]
            assert relation == {"rel_type": "m.annotation", "event_id": event.event_id, "key": "👍"}

            # One-time keys claimed by others are topped up from the counts Synapse pushes.
            bot_device = app.bot.with_device(app.encryption.device_id)
            target = app.encryption.machine.account.one_time_key_target
            assert (await bot_device.keys_upload())["signed_curve25519"] == target
            bot, device = app.bot.user_id, app.encryption.device_id
            claimed = set()
            for _ in range(3):
                reply = await human.client.keys_claim({bot: [device]})
                claimed |= set(reply.one_time_keys[bot][device])
            assert len(claimed) == 3  # three keys left the server: 22 until topped up
            # Synapse adds the counts to the next transaction that concerns the bot.
            await human.send(room_id, "tick", (app.bot.user_id,))
            await eventually_async(
                lambda: _otk_count(bot_device, target), "the one-time keys were topped up"
            )
        stored = await _raw_event(hs, puppet.user_id, room_id, event_id)
        assert stored["type"] == "m.room.encrypted"
        assert "hello human" not in json.dumps(stored)

        restarted = encrypted_app(hs, db)
        seen = Seen(restarted)
        async with restarted:
            assert restarted.encryption.device_id == app.encryption.device_id
            await restarted.intent(f"_bk_e2ee{unique}").send_text(room_id, "after the restart")
            assert await human.until_decrypted(room_id, "after the restart") == puppet.user_id
            await human.send(room_id, "still there?")
            assert (await seen.wait("still there?")).encrypted


async def _raw_event(
    hs: TestHomeserver, reader: str, room_id: str, event_id: str
) -> dict[str, Any]:
    """The event as the server holds it, read by ``reader`` (one of our users)."""
    async with HomeserverClient(hs.url, hs.as_token) as client:
        path = f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/event/{quote_segment(event_id)}"
        return dict(await client.request("GET", path, user_id=reader))


async def test_a_later_device_gets_the_key_and_a_leaver_does_not(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    app = encrypted_app(hs, tmp_path / "bk.db")
    async with (
        nio_user(hs, f"stay{unique}", tmp_path / "phone") as phone,
        nio_user(hs, f"leave{unique}", tmp_path / "leaver") as leaver,
        app,
    ):
        room_id, puppet = await bridged_room(hs, app, phone, f"_bk_rot{unique}")
        await phone.client.room_invite(room_id, leaver.user_id)
        await leaver.until(lambda: room_id in leaver.client.invited_rooms, "the invite arrived")
        await leaver.client.join(room_id)
        await eventually_async(
            lambda: app.room_state.is_joined(room_id, leaver.user_id), "the app saw the join"
        )
        first = await puppet.send_text(room_id, "one")
        for human in (phone, leaver):
            assert await human.until_decrypted(room_id, "one") == puppet.user_id
        first_session = (await _raw_event(hs, puppet.user_id, room_id, first))["content"]

        # The phone's owner logs in on a laptop: its device gets the key before "two".
        tracker = app.encryption.machine.tracker
        async with nio_user(
            hs, f"stay{unique}", tmp_path / "laptop", "laptop", create=False
        ) as laptop:
            # (Its keys must be on the server first: a device without keys is no
            # device to share with, and nio uploads them from its sync loop.)
            await eventually_async(
                lambda: _has_keys(app, phone.user_id, laptop.device_id), "the laptop has keys"
            )
            await eventually(
                lambda: (
                    phone.user_id in tracker.outdated_among([phone.user_id])
                    or laptop.device_id in tracker.devices(phone.user_id)
                ),
                "the bridge heard of the new device",
            )
            second = await puppet.send_text(room_id, "two")
            assert await laptop.until_decrypted(room_id, "two") == puppet.user_id
            assert "one" not in await laptop.decrypted_bodies(room_id)
        second_session = (await _raw_event(hs, puppet.user_id, room_id, second))["content"]
        assert second_session["session_id"] == first_session["session_id"]

        # The leaver leaves: the next message has a new session, which it never gets.
        await leaver.client.room_leave(room_id)
        await eventually_async(
            lambda: _not_joined(app, room_id, leaver.user_id), "the app saw the leave"
        )
        third = await puppet.send_text(room_id, "three")
        third_session = (await _raw_event(hs, puppet.user_id, room_id, third))["content"]
        assert third_session["session_id"] != first_session["session_id"]
        assert await phone.until_decrypted(room_id, "three") == puppet.user_id
        sender_key = third_session["sender_key"]
        assert phone.has_room_key(room_id, sender_key, third_session["session_id"])
        await asyncio.sleep(2.0)  # a key sent to the leaver would have arrived by now
        assert leaver.has_room_key(room_id, sender_key, first_session["session_id"])
        assert not leaver.has_room_key(room_id, sender_key, third_session["session_id"])


async def _not_joined(app: AppService, room_id: str, user_id: str) -> bool:
    return not await app.room_state.is_joined(room_id, user_id)


async def _has_keys(app: AppService, user_id: str, device_id: str) -> bool:
    reply = await app.bot.keys_query([user_id])
    return device_id in reply.device_keys.get(user_id, {})


async def test_a_missing_key_is_a_dead_letter_until_it_arrives_and_no_key_is_stored_in_clear(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs, db = synapse_devices, tmp_path / "bk.db"
    app = encrypted_app(hs, db, key_wait=2.0)
    seen = Seen(app)
    async with nio_user(hs, f"raw{unique}", tmp_path / "nio") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, f"_bk_late{unique}")
        machine = app.encryption.machine
        # The human's second, hand-made libolm "device" encrypts without sharing its key.
        peer = OlmPeer(human.user_id, "HANDMADE")
        group = olm.OutboundGroupSession()
        session_key = group.session_key
        async with HomeserverClient(hs.url, human.client.access_token) as raw:
            late = megolm_content(
                group, peer, room_id, "m.room.message", {"msgtype": "m.text", "body": "late key"}
            )
            await _send(raw, room_id, late)
            letter = await _dead_letter(app, "no room key")
            # The key arrives over Olm, as a client shares it: claim, session, m.room_key.
            bot, device = machine.user_id, machine.device_id
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
                "session_key": session_key,
            }
            content = peer.encrypt_to(
                bot, keys["curve25519"], keys["ed25519"], "m.room_key", room_key
            )
            await raw.request(
                "PUT", f"/_matrix/client/v3/sendToDevice/m.room.encrypted/{unique}",
                body={"messages": {bot: {device: content}}},
            )  # fmt: skip
        await eventually_async(
            lambda: _has_session(machine, room_id, group.id), "the bridge took the room key"
        )
        garbage = {
            **megolm_content(group, peer, room_id, "m.room.message", {}),
            "ciphertext": "Z2FyYmFnZQ",
        }
        async with HomeserverClient(hs.url, human.client.access_token) as raw:
            await _send(raw, room_id, garbage)
        assert "cannot decrypt" in (await _dead_letter(app, "cannot decrypt")).error

        assert await app.dead_letters.replay([letter.id]) == 1
        event = await seen.wait("late key")
        assert event.encrypted and event.sender == human.user_id
        assert event.sender_device is None  # the hand-made device is not in the user's list

        await puppet.send_text(room_id, "from the bridge")
        outbound = await machine.outbound.current(room_id, RotationSettings())
        our_key = machine.outbound.room_key_content(outbound)["session_key"]
        human_device_key = human.client.olm.account.identity_keys["curve25519"]
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("bk.db*"))
    assert human_device_key.encode() in stored  # public keys are there: the grep sees the table
    for exported in (session_key, our_key):
        assert exported.encode() not in stored
        ratchet = unpadded_b64decode(exported)[5 : 5 + 128]
        for part in (ratchet[i : i + 32] for i in range(0, 128, 32)):
            for form in (part, base64.b64encode(part), base64.b64encode(part).rstrip(b"=")):
                assert form not in stored


async def _send(client: HomeserverClient, room_id: str, content: dict[str, Any]) -> None:
    txn = str(time.time_ns())
    path = f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/send/m.room.encrypted/{txn}"
    await client.request("PUT", path, body=content)


async def _dead_letter(app: AppService, words: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for letter in await app.dead_letters.list():
            if words in letter.error:
                return letter
        await asyncio.sleep(0.2)
    raise AssertionError(f"no dead letter saying {words!r}")


async def _has_session(machine: Any, room_id: str, session_id: str) -> bool:
    return await machine.inbound.find(room_id, session_id) is not None


async def _otk_count(device: Any, target: int) -> bool:
    counts = await device.keys_upload()
    return bool(counts.get("signed_curve25519") == target)


async def test_a_to_device_message_whose_handler_failed_decrypts_again_on_replay(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    """Olm decrypts a message once, but the inbox runs the decryption again on every
    attempt, and a replayed dead letter is a new inbox item: both must still get
    the plaintext (and the store must not hold it in clear)."""
    hs, db = synapse_devices, tmp_path / "bk.db"
    app = encrypted_app(hs, db)
    got: list[str] = []
    failing = [True]

    @app.on_to_device("org.example.secret")
    async def on_secret(event: ToDeviceEvent) -> None:
        if failing[0]:
            raise RuntimeError("the remote network is down")
        got.append(str(event.content.get("text")))

    name = f"sender{unique}"
    token = await hs.create_user(name)
    sender = f"@{name}:{hs.server_name}"
    async with app, HomeserverClient(hs.url, token) as raw:
        await prime_to_device(hs, app, token)
        machine = app.encryption.machine
        bot, device = machine.user_id, machine.device_id
        claim = await raw.request(
            "POST", "/_matrix/client/v3/keys/claim",
            body={"one_time_keys": {bot: {device: "signed_curve25519"}}},
        )  # fmt: skip
        [one_time] = claim["one_time_keys"][bot][device].values()
        keys = machine.identity_keys()
        peer = OlmPeer(sender, "HANDMADE")
        peer.start_session(keys["curve25519"], one_time["key"])
        secret = f"the secret text {unique}"
        content = peer.encrypt_to(
            bot, keys["curve25519"], keys["ed25519"], "org.example.secret", {"text": secret}
        )
        await raw.request(
            "PUT", f"/_matrix/client/v3/sendToDevice/m.room.encrypted/secret{unique}",
            body={"messages": {bot: {device: content}}},
        )  # fmt: skip
        letter = await _dead_letter(app, "the remote network is down")
        assert letter.handler is not None and "on_secret" in letter.handler

        failing[0] = False
        assert await app.dead_letters.replay([letter.id]) == 1
        await eventually(lambda: secret in got, "the replayed message reached the handler", 20.0)
        assert [x for x in await app.dead_letters.list() if x.id != letter.id] == []
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("bk.db*"))
    assert secret.encode() not in stored


async def test_a_to_device_message_sent_right_after_the_start_arrives(
    synapse_factory: Callable[..., Any], tmp_path: Path, unique: str
) -> None:
    """The start makes the bot's device and keys, and Synapse pushes the change at
    once. A push that finds no listener marks the appservice down, and while it is
    down Synapse drops every to-device message (a room key) for good, so the app
    must be listening first. (A private Synapse: no other test's app left it down.)"""
    async with synapse_factory(devices=True) as hs:
        app = encrypted_app(hs, tmp_path / "bk.db")
        token = await hs.create_user(f"first{unique}")
        async with app, HomeserverClient(hs.url, token) as client:
            bot, device = app.bot.user_id, app.encryption.device_id
            path = f"/_matrix/client/v3/sendToDevice/{PING}/first{unique}"
            await client.request("PUT", path, body={"messages": {bot: {device: {"n": 0}}}})
            await eventually(lambda: "0" in PINGS[id(app)], "the first message arrived", 15.0)


async def test_a_start_that_fails_after_listening_frees_the_port(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    """Encryption starts after the listener: when it refuses (here: the registration
    lacks its flags), the listener is closed again and the port is free."""
    app = _app(synapse, tmp_path / "bk.db", 10.0)
    with pytest.raises(ConfigError, match=r"lacks io\.element\.msc4190"):
        await app.start()
    with socket.socket() as probe:
        # As a listener binds (aiohttp too): a connection the homeserver made to the
        # closed listener may linger in TIME_WAIT; only a listening socket fails this.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", synapse.appservice_port))
        probe.listen()


class _DoublePuppetDevicesHomeserver(TestHomeserver):
    """``synapse_devices``'s configuration plus a double-puppet registration."""

    __test__ = False

    def __init__(self, workdir: Path) -> None:
        from tests.test_double_puppet import double_puppet_registration

        super().__init__(workdir, devices=True)
        self.dp_token = f"dp-{unique_token()}"
        path = workdir / "double-puppet.yaml"
        registration = double_puppet_registration("double-puppet", self.dp_token, {})
        path.write_text(json.dumps(registration))
        self.registrations.append(path.resolve())


def unique_token() -> str:
    return base64.urlsafe_b64encode(time.time_ns().to_bytes(8, "big")).decode().rstrip("=")


async def test_a_double_puppets_encrypted_message_is_read_back_not_dead_lettered(
    tmp_path: Path, unique: str
) -> None:
    """A double puppet (a real user acting through the bridge) sends with the bot's
    room key like the puppets; its message comes back in a transaction and must
    decrypt for the handlers, not become a dead letter ("another user")."""
    from bridge_kit.testing.synapse import synapse_installed
    from tests.conftest import missing_service

    if not synapse_installed():
        missing_service("matrix-synapse is not installed (pip install -e '.[test]')")
    async with _DoublePuppetDevicesHomeserver(tmp_path / "hs") as hs:
        app = encrypted_app(hs, tmp_path / "bk.db")
        seen = Seen(app)
        name = f"dp{unique}"
        token = await hs.create_user(name)
        user_id = f"@{name}:{hs.server_name}"
        async with (
            nio_user(hs, f"reader{unique}", tmp_path / "nio") as human,
            app,
            HomeserverClient(hs.url, token) as own,
        ):
            room_id, _puppet = await bridged_room(hs, app, human, f"_bk_dpp{unique}")
            await human.client.room_invite(room_id, user_id)
            await own.request("POST", f"/_matrix/client/v3/join/{quote_segment(room_id)}")
            await eventually_async(
                lambda: app.room_state.is_joined(room_id, user_id), "the app saw the join"
            )
            await app.double_puppet(user_id, hs.dp_token).send_text(room_id, "as myself")
            assert await human.until_decrypted(room_id, "as myself") == user_id
            event = await seen.wait("as myself")
            assert event.encrypted and event.sender == user_id
            assert await app.dead_letters.list() == []
