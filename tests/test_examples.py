"""``examples/echo_bridge.py`` run as a process against the test Synapse."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

from bridge_kit import HomeserverClient, Intent
from bridge_kit.client.homeserver import quote_segment
from tests.conftest import SERVER_NAME, TestHomeserver
from tests.helpers.daemons import ROOT, Daemon, real_user, room_events, wait_for_event, write_config

ECHO_BRIDGE = ROOT / "examples" / "echo_bridge.py"
HTML = "org.matrix.custom.html"


def echo_bridge(synapse: TestHomeserver, tmp_path: Path) -> Daemon:
    config = write_config(synapse, tmp_path)
    return Daemon([sys.executable, str(ECHO_BRIDGE), "-c", str(config)], tmp_path, name="echo")


async def invite_echo(client: HomeserverClient, alice: Intent, puppet: str) -> str:
    """A room of alice's that the echo puppet was invited to and joined."""
    room_id = await alice.create_room()
    await alice.invite(room_id, puppet)
    await wait_for_event(
        client, room_id, "the puppet's join", type="m.room.member", state_key=puppet,
        membership="join",
    )  # fmt: skip
    return room_id


async def test_the_echo_bridge_answers_before_and_after_a_restart(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    bridge = echo_bridge(synapse, tmp_path)
    puppet = f"@_bk_echo{unique}:{SERVER_NAME}"
    client, alice = await real_user(synapse, f"echoer{unique}")
    async with client:
        async with bridge:
            room_id = await invite_echo(client, alice, puppet)
            await alice.send_text(room_id, "hello *one*", html="hello <b>one</b>")
            first = await wait_for_event(client, room_id, "echo 1", body="echo: hello *one*")
        # A new process knows nothing from the first one's memory.
        async with bridge:
            await alice.send_text(room_id, "hello two")
            second = await wait_for_event(client, room_id, "echo 2", body="echo: hello two")
            await alice.send_event(
                room_id, "m.room.message", {"msgtype": "m.notice", "body": "a notice"}
            )
            await alice.send_text(room_id, "hello three")
            await wait_for_event(client, room_id, "echo 3", body="echo: hello three")
        echoes = Counter(
            e["content"]["body"]
            for e in await room_events(client, room_id)
            if e["type"] == "m.room.message" and e["sender"] == puppet
        )
    assert first["sender"] == second["sender"] == puppet
    assert first["content"]["format"] == HTML
    assert first["content"]["formatted_body"] == "echo: hello <b>one</b>"
    assert "format" not in second["content"]
    assert echoes == {"echo: hello *one*": 1, "echo: hello two": 1, "echo: hello three": 1}
    assert bridge.starts == 2


async def test_a_refused_echo_is_logged_and_not_retried(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    bridge = echo_bridge(synapse, tmp_path)
    puppet = f"@_bk_mute{unique}:{SERVER_NAME}"
    client, alice = await real_user(synapse, f"muter{unique}")
    async with client, bridge:
        room_id = await invite_echo(client, alice, puppet)
        # Only alice may speak now: the homeserver refuses the puppet's echo (403).
        path = f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/state/m.room.power_levels"
        levels = await client.request("GET", path)
        await client.request("PUT", path, body=levels | {"events_default": 100})
        await alice.send_text(room_id, "muted")
        await alice.send_text(room_id, "after")  # handled only once "muted" is done with
        logged = await _eventually_logged(bridge, "could not act on", times=2)
    assert "M_FORBIDDEN" in logged
    assert not [m for m in bridge.messages() if "retrying in" in m or "dead letter" in m]


async def _eventually_logged(bridge: Daemon, text: str, *, times: int) -> str:
    for _ in range(600):
        found = [m for m in bridge.messages() if text in m]
        if len(found) >= times:
            return "\n".join(found)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} never logged:\n{bridge.log_since()}")
