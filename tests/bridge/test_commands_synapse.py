"""A real user runs commands in a DM with the bridge bot: real Synapse, the app service
receiving the events, the bot answering with m.notice replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit import AppService, AppServiceConfig, Config, Event, HomeserverConfig
from bridge_kit.bridge.commands import CommandContext, CommandRegistry, notice_reply
from bridge_kit.bridge.permissions import Level, Permissions
from bridge_kit.client.homeserver import HomeserverClient, quote_segment
from bridge_kit.intent import Intent
from tests.conftest import TestHomeserver, _running_homeserver

pytestmark = pytest.mark.synapse

TIMEOUT = 60.0


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse: transactions queued for our URL while no test listens
    # would back off and slow other modules' app services on the shared one.
    async with _running_homeserver(tmp_path_factory.mktemp("commands")) as hs:
        yield hs


def command_bridge(hs: TestHomeserver, db: Path) -> tuple[AppService, asyncio.Event]:
    """An app service whose bot joins the DMs it is invited to and runs commands there."""
    app = AppService(
        Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path),
                store=f"sqlite:///{db}",
                port=hs.appservice_port,
            ),
        )
    )
    registry: CommandRegistry[AppService] = CommandRegistry(
        Permissions.from_mapping({"test.local": "user"})
    )

    @registry.command("whoami", help="Say who you are to the bridge", level=Level.USER)
    async def whoami(ctx: CommandContext[AppService]) -> None:
        await ctx.reply(f"You are `{ctx.sender}`, level **{ctx.level}**.")

    @registry.command("sync", help="Sync everything", level=Level.ADMIN)
    async def sync(ctx: CommandContext[AppService]) -> None:
        raise AssertionError("a user may not run an admin command")

    joined = asyncio.Event()

    @app.on_event("m.room.member")
    async def on_invite(event: Event) -> None:
        invited = event.content.get("membership") == "invite"
        if invited and event.state_key == app.bot.user_id and event.room_id:
            await app.bot.join_room(event.room_id)
            joined.set()

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None:
        body = event.content.get("body")
        if event.sender == app.bot.user_id or not isinstance(body, str):
            return
        assert event.sender and event.room_id
        await registry.handle(
            sender=event.sender,
            room_id=event.room_id,
            body=body,
            event_id=event.event_id,
            reply=notice_reply(app.bot, event.room_id, reply_to=event.event_id),
            state=app,
            management=True,  # a DM with the bot is the management room
        )

    return app, joined


async def bot_notices(
    client: HomeserverClient, room_id: str, bot: str, count: int
) -> list[dict[str, Any]]:
    """The bot's first ``count`` messages in the room, as the human reads them."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    path = f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/messages"
    while True:
        reply = await client.request("GET", path, query={"dir": "f", "limit": 100})
        found = [
            event
            for event in reply["chunk"]
            if event["type"] == "m.room.message" and event["sender"] == bot
        ]
        if len(found) >= count:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"only {len(found)} replies"
        await asyncio.sleep(0.2)


async def test_a_user_runs_help_in_a_dm_with_the_bot(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    app, joined = command_bridge(homeserver, tmp_path / "bk.db")
    token = await homeserver.create_user(f"alice{unique}")
    async with app, HomeserverClient(homeserver.url, token) as client:
        alice = Intent(client, f"@alice{unique}:test.local", None)
        room_id = await alice.create_room(invite=[app.bot.user_id], is_direct=True)
        await asyncio.wait_for(joined.wait(), TIMEOUT)
        help_id = await alice.send_text(room_id, "help")
        await alice.send_text(room_id, "whoami")
        await alice.send_text(room_id, "sync")
        await alice.send_text(room_id, "frobnicate")
        notices = await bot_notices(client, room_id, app.bot.user_id, 4)

    help_reply, whoami, sync, unknown = (event["content"] for event in notices)
    assert help_reply["msgtype"] == "m.notice"
    assert help_reply["m.relates_to"] == {"m.in_reply_to": {"event_id": help_id}}
    assert help_reply["body"] == (
        "Commands you may run:\n\n"
        "- `help [command]`: List the commands you may run, or explain one\n"
        "- `whoami`: Say who you are to the bridge"
    )
    assert help_reply["format"] == "org.matrix.custom.html"
    assert (
        "<li><code>whoami</code>: Say who you are to the bridge</li>"
        in (help_reply["formatted_body"])
    )
    assert whoami["body"] == f"You are `@alice{unique}:test.local`, level **user**."
    assert sync["body"] == "`sync` needs the admin level; you have user."
    assert unknown["body"] == (
        "Unknown command `frobnicate`. Send `help` for the commands you may run."
    )
    assert all(notice["msgtype"] == "m.notice" for notice in (whoami, sync, unknown))
