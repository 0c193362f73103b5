"""A handler's re-run posts no second copy in an encrypted room (issue 18).

The first send of a puppet into an encrypted room shares its room key (to-device
messages) first; a re-run of the handler finds the key shared and sends none. The
send txn ids of the re-run must still be those of the first run, or Synapse posts
every message again (and answers one of them with another message's event).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge_kit import Event, HomeserverClient
from bridge_kit.client.homeserver import ClientObserver, quote_segment
from tests.conftest import TestHomeserver
from tests.helpers.e2ee_users import nio_user
from tests.test_e2ee_synapse import bridged_room, encrypted_app, eventually

pytestmark = pytest.mark.slow


class ToDeviceSends(ClientObserver):
    """Counts the ``/sendToDevice`` requests the app's client made."""

    def __init__(self) -> None:
        self.count = 0

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        if "/sendToDevice/" in endpoint:
            self.count += 1


async def puppet_events(hs: TestHomeserver, puppet: str, room_id: str) -> list[str]:
    """The IDs of the events ``puppet`` sent into the room, oldest first."""
    async with HomeserverClient(hs.url, hs.as_token) as client:
        reply = await client.request(
            "GET",
            f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/messages",
            query={"dir": "b", "limit": "100"},
            user_id=puppet,
        )
    chunk = reversed(reply["chunk"])
    return [e["event_id"] for e in chunk if e["sender"] == puppet and "state_key" not in e]


async def test_a_rerun_that_shares_no_key_gets_the_same_event_ids(
    synapse_devices: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    hs, db = synapse_devices, tmp_path / "bk.db"
    app = encrypted_app(hs, db)
    localpart = f"_bk_rerun{unique}"
    trigger = f"go {unique}"
    runs: list[list[str]] = []
    shares: list[int] = []
    to_device = ToDeviceSends()
    app.client.observers.append(to_device)

    @app.on_event("m.room.message")
    async def on_trigger(event: Event) -> None:
        if event.content.get("body") != trigger:
            return
        puppet, room_id = app.intent(localpart), event.room_id
        assert room_id is not None
        before = to_device.count
        runs.append(
            [
                await puppet.send_text(room_id, f"one {unique}"),
                await puppet.send_text(room_id, f"two {unique}"),
            ]
        )
        shares.append(to_device.count - before)
        if len(runs) == 1:
            raise RuntimeError("the first run fails after its sends, as after a crash")

    async with nio_user(hs, f"human{unique}", tmp_path / "nio") as human, app:
        room_id, puppet = await bridged_room(hs, app, human, localpart)
        await human.send(room_id, trigger, (app.bot.user_id,))
        await eventually(lambda: len(runs) == 2, "the handler ran again")
        assert await human.until_decrypted(room_id, f"two {unique}") == puppet.user_id
        posted = await puppet_events(hs, puppet.user_id, room_id)

    assert shares[0] > 0 and shares[1] == 0, "the first run shared the key, the re-run not"
    assert runs[0] == runs[1]
    assert posted == runs[0]
