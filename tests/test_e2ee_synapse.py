"""Encrypted rooms end to end: real Synapse (experimental to-device/MSC3202 options, our
registration with the MSC4190 flags), bridge_kit's AppService with encryption on, and
matrix-nio (libolm) as the human user, in an encrypted room with a puppet."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import olm
import pytest

from bridge_kit import AppService, AppServiceConfig, Config, Event, HomeserverConfig
from bridge_kit.config import EncryptionConfig
from bridge_kit.crypto import canonical_json
from bridge_kit.client import quote_segment
from tests.conftest import SERVER_NAME, TestHomeserver
from tests.daemons import real_user
from tests.e2ee_users import nio_user

pytestmark = pytest.mark.slow
TIMEOUT = 60.0
PICKLE_KEY = "a pickle key for the encryption tests"


def encrypted_app(hs: TestHomeserver, db: Path, key_wait: float = 10.0) -> AppService:
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


async def bridged_room(app: AppService, human: Any, puppet: str) -> tuple[str, Any]:
    """An encrypted room made by ``human`` with the bot and a puppet joined."""
    intent = app.intent(puppet)
    await intent.ensure_registered()
    room_id = await human.create_encrypted_room(invite=[app.bot.user_id, intent.user_id])
    await app.bot.join_room(room_id)
    await intent.join_room(room_id)
    await human.until(
        lambda: {app.bot.user_id, intent.user_id} <= set(human.client.rooms[room_id].users)
        if room_id in human.client.rooms
        else False,
        "the bot and the puppet joined",
    )
    await eventually_async(lambda: app.room_state.is_encrypted(room_id), "the app knows the room is encrypted")
    return room_id, intent


async def eventually_async(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


async def server_event(hs: TestHomeserver, room_id: str, event_id: str) -> dict[str, Any]:
    client, _ = await real_user(hs, f"reader{time.time_ns()}")
    async with client:
        return dict(
            await client.request(
                "GET",
                f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/event/{quote_segment(event_id)}",
                user_id=None,
            )
        )


async def test_messages_cross_both_ways_and_survive_a_restart(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs, db = synapse_devices, tmp_path / "bk.db"
    app = encrypted_app(hs, db)
    seen = Seen(app)
    async with nio_user(hs, f"human{unique}", tmp_path / "nio") as human:
        async with app:
            room_id, puppet = await bridged_room(app, human, f"_bk_e2ee{unique}")
            await human.send(room_id, "hello bridge")
            event = await seen.wait("hello bridge")
            assert event.encrypted and event.type == "m.room.message"
            assert event.sender == human.user_id and event.sender_device == human.device_id
            event_id = await puppet.send_text(room_id, "hello human")
            assert await human.until_decrypted(room_id, "hello human") == puppet.user_id
        stored = await _raw_event(hs, human, room_id, event_id)
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


async def _raw_event(hs: TestHomeserver, human: Any, room_id: str, event_id: str) -> dict[str, Any]:
    reply = await human.client.room_get_event(room_id, event_id)
    return dict(reply.event.source)
