"""The human side of the encryption tests: matrix-nio (its own E2EE stack, on libolm)
logged in to the real Synapse, syncing in the background with its own key store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nio

from tests.conftest import SERVER_NAME, TestHomeserver

TIMEOUT = 60.0
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


class NioUser:
    """One device of a real user: a nio client with an E2EE store, syncing."""

    def __init__(self, hs: TestHomeserver, localpart: str, store: Path) -> None:
        store.mkdir(parents=True, exist_ok=True)
        config = nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.user_id = f"@{localpart}:{SERVER_NAME}"
        self.client = nio.AsyncClient(hs.url, self.user_id, store_path=str(store), config=config)
        self._sync: asyncio.Task[Any] | None = None

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    async def login(self, device_name: str) -> None:
        reply = await self.client.login("pw", device_name=device_name)
        assert isinstance(reply, nio.LoginResponse), reply
        await self.client.sync(timeout=0, full_state=True)
        self._sync = asyncio.create_task(self.client.sync_forever(timeout=300, full_state=True))

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sync
        await self.client.close()

    async def create_encrypted_room(self, invite: list[str], **encryption: Any) -> str:
        state = {**ENCRYPTION, "content": {**ENCRYPTION["content"], **encryption}}
        reply = await self.client.room_create(invite=invite, initial_state=[state])
        assert isinstance(reply, nio.RoomCreateResponse), reply
        return str(reply.room_id)

    async def send(self, room_id: str, body: str, devices_of: tuple[str, ...] = ()) -> str:
        """Send an encrypted text message (nio shares its room key first), once nio
        knows a device of each user in ``devices_of`` (its key queries run in its
        sync loop, and a message sent before they finish skips those devices)."""
        await self.until(lambda: room_id in self.client.rooms, f"{self.user_id} sees {room_id}")
        store = self.client.device_store
        await self.until(
            lambda: all(user in store.users and dict(store[user]) for user in devices_of),
            f"{self.user_id} knows the devices of {devices_of}",
        )
        if self.client.should_query_keys:
            await self.client.keys_query()
        # nio 0.26 sometimes shares before claiming (a race with its sync loop), and
        # then skips the devices it has no Olm session with: claim first.
        missing = self.client.get_missing_sessions(room_id)
        if missing:
            await self.client.keys_claim(missing)
        reply = await self.client.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            ignore_unverified_devices=True,
        )
        assert isinstance(reply, nio.RoomSendResponse), reply
        return str(reply.event_id)

    async def decrypted_bodies(self, room_id: str) -> dict[str, str]:
        """sender + body of each m.room.message nio can decrypt in the room's history."""
        reply = await self.client.room_messages(room_id, start="", limit=100)
        assert isinstance(reply, nio.RoomMessagesResponse), reply
        found = {}
        for event in reply.chunk:
            if isinstance(event, nio.MegolmEvent):
                try:
                    event = self.client.decrypt_event(event)
                except nio.EncryptionError:
                    continue  # undecryptable is what some tests look for
            if isinstance(event, nio.RoomMessageText):
                found[event.body] = event.sender
        return found

    def has_room_key(self, room_id: str, sender_key: str, session_id: str) -> bool:
        """Whether this device got the Megolm session ``session_id`` of ``room_id``."""
        store = self.client.olm.inbound_group_store
        return store.get(room_id, sender_key, session_id) is not None

    async def until(self, condition: Any, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting until {what}")
            await asyncio.sleep(0.1)

    async def until_decrypted(self, room_id: str, body: str, timeout: float = TIMEOUT) -> str:
        """Wait until nio decrypts a message with ``body``; its sender."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bodies = await self.decrypted_bodies(room_id)
            if body in bodies:
                return bodies[body]
            await asyncio.sleep(0.3)
        raise AssertionError(f"{self.user_id} never decrypted {body!r} in {room_id}")


@contextlib.asynccontextmanager
async def nio_user(
    hs: TestHomeserver,
    localpart: str,
    store: Path,
    device_name: str = "phone",
    *,
    create: bool = True,
) -> AsyncIterator[NioUser]:
    if create:
        await hs.create_user(localpart)
    user = NioUser(hs, localpart, store)
    await user.login(device_name)
    try:
        yield user
    finally:
        await user.close()
