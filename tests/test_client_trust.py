"""What today's clients show for the bridge's encrypted messages (issue 21): real
Synapse, bridge_kit with encryption on, and matrix-js-sdk 43 with its Rust crypto (the
crypto of Element Web) as the human, in default and in strict mode (MSC4153, "exclude
insecure devices")."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge_kit import AppService, AppServiceConfig, Config, HomeserverConfig
from bridge_kit.config import EncryptionConfig
from bridge_kit.crypto.impersonation import IMPERSONATOR
from bridge_kit.crypto.signing import unpadded_b64encode, verify_json
from bridge_kit.intent import devices
from bridge_kit.types import ToDeviceEvent
from tests.conftest import TestHomeserver
from tests.helpers.cli import run_cli_subprocess
from tests.helpers.js_human import JsHuman, js_human
from tests.test_cross_signing import decode_recovery_key, only_key
from tests.test_e2ee_synapse import (
    PICKLE_KEY,
    PING,
    PINGS,
    Seen,
    eventually,
    eventually_async,
    prime_to_device,
)

pytestmark = pytest.mark.slow


def trust_app(hs: TestHomeserver, db: Path, **options: bool) -> AppService:
    """An encrypting app with the issue's options (``self_sign``, ``puppet_devices``)."""
    encryption = EncryptionConfig(enabled=True, pickle_key=PICKLE_KEY, key_wait=20.0, **options)
    app = AppService(
        Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path),
                store=f"sqlite:///{db}",
                port=hs.appservice_port,
                retry_backoff=0.2,
                retry_backoff_max=0.5,
            ),
            encryption=encryption,
        )
    )
    pings = PINGS.setdefault(id(app), set())

    @app.on_to_device(PING)
    async def on_ping(event: ToDeviceEvent) -> None:
        pings.add(str(event.content.get("n")))

    return app


async def bridged_room(
    hs: TestHomeserver, app: AppService, human: JsHuman, token: str, puppet: str
) -> tuple[str, Any]:
    """An encrypted room made by the js-sdk human with the bot and a puppet joined."""
    intent = app.intent(puppet)
    await intent.ensure_registered()
    room_id = await human.create_room([app.bot.user_id, intent.user_id])
    await app.bot.join_room(room_id)
    await intent.join_room(room_id)
    await human.until_joined(room_id, {app.bot.user_id, intent.user_id})
    await eventually_async(
        lambda: app.room_state.is_encrypted(room_id), "the app knows the room is encrypted"
    )
    await prime_to_device(hs, app, token)
    return room_id, intent


def shield(event: dict[str, Any]) -> tuple[str, str | None]:
    return event["shield"]["colour"], event["shield"]["reason"]


async def test_without_the_options_clients_show_red_shields(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    """Without self_sign or puppet_devices, what a default-mode client shows (the
    issue's report, kept as the baseline)."""
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db")
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
        await human.send(room_id, "hello bridge")
        assert (await seen.wait("hello bridge")).encrypted
        await puppet.send_text(room_id, "from the puppet")
        await app.bot.send_text(room_id, "from the bot")
        from_puppet = await human.until_message(room_id, "from the puppet")
        from_bot = await human.until_message(room_id, "from the bot")
        assert shield(from_puppet) == ("RED", "MISMATCHED_SENDER")
        assert shield(from_bot) == ("RED", "UNSIGNED_DEVICE")


async def test_self_sign_alone_fixes_the_bot_not_the_puppets(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True)
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
        await human.send(room_id, "hello bridge")
        assert (await seen.wait("hello bridge")).encrypted
        await app.bot.send_text(room_id, "from the bot")
        await puppet.send_text(room_id, "from the puppet")
        assert shield(await human.until_message(room_id, "from the bot")) == ("NONE", None)
        from_puppet = await human.until_message(room_id, "from the puppet")
        assert shield(from_puppet) == ("RED", "MISMATCHED_SENDER")
        answer = await devices.keys_query_json(app.bot, [app.bot.user_id], None)
    # The recovery key the CLI prints is the master key the homeserver lists.
    (master,) = answer["master_keys"][app.bot.user_id]["keys"].values()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"url": hs.url},
                "appservice": {
                    "registration": str(hs.registration_path),
                    "store": f"sqlite:///{tmp_path / 'bk.db'}",
                },
                "encryption": {"enabled": True, "pickle_key": PICKLE_KEY, "self_sign": True},
            }
        )
    )
    done = await asyncio.to_thread(
        run_cli_subprocess, "encryption", "recovery-key", "-c", str(config), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    seed = decode_recovery_key(done.stdout.strip())
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert unpadded_b64encode(public) == master


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
async def test_no_shield_on_puppet_and_bot_messages(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str, strict: bool
) -> None:
    """The issue's "done": with self_sign and puppet_devices, no shield on the puppet's
    and the bot's messages, and the human's messages reach the bridge, in both modes."""
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True, puppet_devices=True)
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}", strict=strict) as human, app:
        room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
        await puppet.send_text(room_id, "from the puppet")
        await app.bot.send_text(room_id, "from the bot")
        assert shield(await human.until_message(room_id, "from the puppet")) == ("NONE", None)
        assert shield(await human.until_message(room_id, "from the bot")) == ("NONE", None)
        await human.send(room_id, "hello bridge")
        event = await seen.wait("hello bridge")
        assert event.encrypted and event.sender_device == human.device_id


async def puppet_only_room(app: AppService, human: JsHuman, puppet: str) -> tuple[str, Any]:
    """An encrypted room made by the human with only a puppet invited, and joined."""
    intent = app.intent(puppet)
    await intent.ensure_registered()
    room_id = await human.create_room([intent.user_id])
    await intent.join_room(room_id)
    await human.until_joined(room_id, {intent.user_id})
    return room_id, intent


async def test_a_puppet_joining_brings_the_bot_without_puppet_devices(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True)
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}") as human, app:
        room_id, _puppet = await puppet_only_room(app, human, f"_bk_js{unique}")
        await human.until_joined(room_id, {app.bot.user_id})
        await prime_to_device(hs, app, token)
        await human.send(room_id, "hello bridge")
        assert (await seen.wait("hello bridge")).encrypted


async def test_strict_mode_reads_a_room_of_puppets_only(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    """With puppet_devices the bot need not be in the room: the puppet's own device,
    made when it joined, gets the strict human's room key."""
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True, puppet_devices=True)
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}", strict=True) as human, app:
        room_id, puppet = await puppet_only_room(app, human, f"_bk_js{unique}")
        await eventually(
            lambda: any(m.user_id == puppet.user_id for m in app.encryption.puppets.loaded()),
            "the puppet has its device",
        )
        await prime_to_device(hs, app, token)
        await human.send(room_id, "hello puppet")
        event = await seen.wait("hello puppet")
        assert event.encrypted
        assert app.bot.user_id not in (await human.call("joined", room_id=room_id))["users"]
        await puppet.send_text(room_id, "hello human")
        assert shield(await human.until_message(room_id, "hello human")) == ("NONE", None)


async def test_a_puppet_keeps_its_device_and_identity_across_a_restart(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs, db = synapse_devices, tmp_path / "bk.db"
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, db, self_sign=True, puppet_devices=True)
    async with js_human(hs.url, f"jshuman{unique}") as human:
        async with app:
            room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
            await puppet.send_text(room_id, "before")
            assert shield(await human.until_message(room_id, "before")) == ("NONE", None)
            before = await devices.keys_query_json(app.bot, [puppet.user_id], None)
        restarted = trust_app(hs, db, self_sign=True, puppet_devices=True)
        seen = Seen(restarted)
        async with restarted:
            again = restarted.intent(f"_bk_js{unique}")
            await again.send_text(room_id, "after")
            assert shield(await human.until_message(room_id, "after")) == ("NONE", None)
            after = await devices.keys_query_json(restarted.bot, [puppet.user_id], None)
            assert [d.device_id for d in await again.list_devices()] == list(
                before["device_keys"][puppet.user_id]
            )
            await prime_to_device(hs, restarted, token)
            await human.send(room_id, "still there?")
            assert (await seen.wait("still there?")).encrypted
    assert after["master_keys"] == before["master_keys"]
    assert after["device_keys"] == before["device_keys"]


async def test_msc4350_puppets_name_the_bots_device_as_impersonator(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    """Behind encryption.msc4350 (an open proposal): the puppet's keyless device names
    the bot's, signed by it. No client implements it yet: js-sdk's shield is unchanged."""
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True, msc4350=True)
    async with js_human(hs.url, f"jshuman{unique}") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
        await puppet.send_text(room_id, "from the puppet")
        from_puppet = await human.until_message(room_id, "from the puppet")
        assert shield(from_puppet) == ("RED", "MISMATCHED_SENDER")
        answer = await devices.keys_query_json(app.bot, [puppet.user_id], None)
        bot = app.encryption.machine.account
    listed = answer["device_keys"][puppet.user_id][bot.device_id]
    assert listed["keys"] == {} and listed["algorithms"] == []
    impersonator = listed[IMPERSONATOR]
    assert impersonator["user_id"] == app.bot.user_id
    assert impersonator["keys"][f"ed25519:{bot.device_id}"] == bot.ed25519
    assert verify_json(listed, app.bot.user_id, bot.device_id, bot.ed25519)


async def until_dead_letter(app: AppService, fragment: str) -> str:
    """The error of the first dead letter that mentions ``fragment``."""
    found: list[str] = []

    async def buried() -> bool:
        found[:] = [x.error for x in await app.dead_letters.list() if fragment in x.error]
        return bool(found)

    await eventually_async(buried, f"a dead letter mentions {fragment!r}")
    return found[0]


@pytest.mark.parametrize("self_sign", [False, True], ids=["neither", "self_sign"])
async def test_strict_mode_without_puppet_devices(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str, self_sign: bool
) -> None:
    """What strict mode does to the bridge without its options: her key is withheld
    from an unsigned bot device, and nothing from an unsigned or other user's device
    decrypts for her."""
    hs = synapse_devices
    token = await hs.create_user(f"jshuman{unique}")
    app = trust_app(hs, tmp_path / "bk.db", self_sign=self_sign)
    seen = Seen(app)
    async with js_human(hs.url, f"jshuman{unique}", strict=True) as human, app:
        room_id, puppet = await bridged_room(hs, app, human, token, f"_bk_js{unique}")
        await human.send(room_id, "hello bridge")
        if self_sign:
            assert (await seen.wait("hello bridge")).encrypted
        else:
            error = await until_dead_letter(app, "withheld")
            assert error.startswith("the room key was withheld (m.unverified)")
        await puppet.send_text(room_id, "from the puppet")
        await app.bot.send_text(room_id, "from the bot")
        failures = await human.until_failed(room_id, 1 if self_sign else 2)
        if self_sign:
            assert shield(await human.until_message(room_id, "from the bot")) == ("NONE", None)
    # UNKNOWN_ERROR: the SDK's code for "trust requirement not satisfied: the sender of
    # the event does not match the owner of the device that created the Megolm session".
    expected = {puppet.user_id: "UNKNOWN_ERROR"}
    if not self_sign:
        expected[app.bot.user_id] = "UNSIGNED_SENDER_DEVICE"
    assert failures == expected


async def test_puppet_devices_made_in_bulk_once_each(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs = synapse_devices
    app = trust_app(hs, tmp_path / "bk.db", self_sign=True, puppet_devices=True)
    async with app:
        intents = [app.intent(f"_bk_bulk{unique}_{n}") for n in range(6)]
        for intent in intents:
            await intent.ensure_registered()
        users = [intent.user_id for intent in intents]
        await app.encryption.puppets.prepare(users + users, concurrency=3)
        await app.encryption.puppets.prepare(users)  # made already: nothing new
        answer = await devices.keys_query_json(app.bot, users, None)
        for intent in intents:
            (device,) = await intent.list_devices()
            listed = answer["device_keys"][intent.user_id][device.device_id]
            (master,) = answer["master_keys"][intent.user_id]["keys"].values()
            self_signing = only_key(answer["self_signing_keys"][intent.user_id])
            assert verify_json(
                answer["self_signing_keys"][intent.user_id], intent.user_id, master, master
            )
            assert verify_json(listed, intent.user_id, self_signing, self_signing)
        with pytest.raises(ValueError, match="concurrency"):
            await app.encryption.puppets.prepare(users, concurrency=0)
