"""The room-state store behind ``app.room_state``, ``ensure_joined`` and the profile
shortcut, against a real Synapse pushing real transactions to a running AppService.

Effects are read back by a real user's plain HTTP (:class:`tests.test_intent_api.Human`);
requests are counted with the client's ``request_count``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from bridge_kit import AppService, Banned
from tests.conftest import TestHomeserver, _running_homeserver
from tests.test_appservice_e2e import make_app
from tests.test_intent_api import CLIENT, Human, q

POWER_LEVELS = "m.room.power_levels"
MEGOLM = "m.megolm.v1.aes-sha2"


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse, as in test_appservice_e2e: transactions queued for our port while
    # no test listens would make the session's Synapse back off for the other tests.
    async with _running_homeserver(tmp_path_factory.mktemp("room_state")) as hs:
        yield hs


@pytest.fixture
async def app(homeserver: TestHomeserver, tmp_path: Path) -> AsyncIterator[AppService]:
    async with make_app(homeserver, tmp_path / "bk.db") as running:
        yield running


@pytest.fixture
async def human(homeserver: TestHomeserver, unique: str) -> Human:
    localpart = f"human_{unique}"
    token = await homeserver.create_user(localpart)
    return Human(homeserver, f"@{localpart}:{homeserver.server_name}", token)


async def invite_only_room(human: Human, bot: str, bot_level: int = 50, **extra: Any) -> str:
    """A private room the human made, where the bot (invited, joined by the test) may
    invite; the human, its creator, has every power (room version 12)."""
    body = {
        "preset": "private_chat",
        "invite": [bot],
        "power_level_content_override": {"invite": 50, "users": {bot: bot_level}},
        **extra,
    }
    status, reply = await human.call("POST", f"{CLIENT}/createRoom", body)
    assert status == 200, reply
    room_id: str = reply["room_id"]
    return room_id


async def joined(human: Human, room_id: str) -> set[str]:
    reply = await human.get(f"{CLIENT}/rooms/{q(room_id)}/joined_members")
    return set(reply["joined"])


async def requests_during(app: AppService, action: Callable[[], Awaitable[object]]) -> int:
    before = app.client.request_count
    await action()
    return app.client.request_count - before


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


@pytest.mark.synapse
async def test_ensure_joined_has_the_bot_invite_the_puppet(
    app: AppService, human: Human, unique: str
) -> None:
    room = await invite_only_room(human, app.bot.user_id)
    await app.bot.join_room(room)
    puppet = app.intent(f"_bk_joiner_{unique}")

    await puppet.ensure_joined(room)

    assert puppet.user_id in await joined(human, room)
    assert await app.room_state.is_joined(room, puppet.user_id)
    # Joined now: asking again costs nothing.
    assert await requests_during(app, lambda: puppet.ensure_joined(room)) == 0


@pytest.mark.synapse
async def test_ensure_joined_unbans_a_banned_puppet_only_when_asked(
    app: AppService, human: Human, unique: str
) -> None:
    room = await invite_only_room(
        human, app.bot.user_id, power_level_content_override={
            "invite": 50, "ban": 50, "users": {app.bot.user_id: 50},
        },
    )  # fmt: skip
    await app.bot.join_room(room)
    puppet = app.intent(f"_bk_banned_{unique}")
    await puppet.ensure_registered()
    status, body = await human.call(
        "POST", f"{CLIENT}/rooms/{q(room)}/ban", {"user_id": puppet.user_id}
    )
    assert status == 200, body

    with pytest.raises(Banned):
        await puppet.ensure_joined(room)
    assert puppet.user_id not in await joined(human, room)
    await puppet.ensure_joined(room, unban=True)

    assert puppet.user_id in await joined(human, room)


@pytest.mark.synapse
async def test_state_from_transactions_and_the_stale_rule(
    app: AppService, human: Human, unique: str
) -> None:
    room = await invite_only_room(human, app.bot.user_id)
    await app.bot.join_room(room)
    levels = await human.get(f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/")
    levels["users"][app.bot.user_id] = 60
    status, body = await human.call(
        "PUT", f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/", levels
    )
    assert status == 200, body

    async def bot_has_60() -> bool:
        stored = await app.store.power_levels(room)
        return stored is not None and stored.user_level(app.bot.user_id) == 60

    await eventually(bot_has_60)  # pushed by Synapse in a transaction, applied from the inbox
    current = await app.store.state_event(room, POWER_LEVELS)
    assert current is not None and current.origin_server_ts
    older = attrs.evolve(
        current,
        content={**levels, "users": {app.bot.user_id: 10}},
        origin_server_ts=current.origin_server_ts - 1,
    )
    await app.room_state.observe_event(older)
    assert await bot_has_60()
    # The bot's join is stored; the human's came before the bridge was in the room, so
    # the first question about it asks the homeserver for the room's state, once.
    assert await requests_during(app, lambda: app.room_state.is_joined(room, app.bot.user_id)) == 0
    assert await requests_during(app, lambda: app.room_state.is_joined(room, human.user_id)) == 1
    assert await requests_during(app, lambda: app.room_state.is_joined(room, human.user_id)) == 0
    assert await app.room_state.is_joined(room, human.user_id)


@pytest.mark.synapse
async def test_a_miss_asks_the_homeserver_once(
    homeserver: TestHomeserver, tmp_path: Path, human: Human
) -> None:
    async with make_app(homeserver, tmp_path / "first.db") as first:
        encryption = {"type": "m.room.encryption", "content": {"algorithm": MEGOLM}}
        room = await invite_only_room(human, first.bot.user_id, initial_state=[encryption])
        await first.bot.join_room(room)
    # A second bridge with an empty store: it never saw the room's events.
    async with make_app(homeserver, tmp_path / "second.db") as app:
        assert await requests_during(app, lambda: app.room_state.is_encrypted(room)) == 1
        assert await app.room_state.is_encrypted(room)
        assert await requests_during(app, lambda: app.room_state.get_members(room)) == 0
        assert set(await app.room_state.get_members(room)) == {human.user_id, app.bot.user_id}


@pytest.mark.synapse
async def test_the_store_remembers_rooms_after_a_restart(
    homeserver: TestHomeserver, tmp_path: Path, human: Human, unique: str
) -> None:
    db = tmp_path / "restart.db"
    async with make_app(homeserver, db) as app:
        room = await invite_only_room(human, app.bot.user_id, bot_level=100)
        await app.bot.join_room(room)
        puppet = app.intent(f"_bk_stayer_{unique}")
        await puppet.ensure_joined(room)
        await app.bot.ensure_power_level(room, puppet.user_id, 20)
    levels = await human.get(f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/")
    assert levels["users"][puppet.user_id] == 20

    async with make_app(homeserver, db) as again:
        puppet = again.intent(f"_bk_stayer_{unique}")
        assert await requests_during(again, lambda: puppet.ensure_joined(room)) == 0
        assert await again.room_state.is_joined(room, puppet.user_id)
        stored = await again.room_state.get_power_levels(room)
        assert stored.user_level(puppet.user_id) == 20
        ensure = again.bot.ensure_power_level(room, puppet.user_id, 20)
        assert await requests_during(again, lambda: ensure) == 0


@pytest.mark.synapse
async def test_setting_the_same_profile_again_sends_nothing(
    app: AppService, human: Human, unique: str
) -> None:
    puppet = app.intent(f"_bk_named_{unique}")
    await puppet.set_displayname("Alice")
    await puppet.set_avatar_url("mxc://test.local/alice")

    assert await requests_during(app, lambda: puppet.set_displayname("Alice")) == 0
    assert await requests_during(app, lambda: puppet.set_avatar_url("mxc://test.local/alice")) == 0
    assert await requests_during(app, lambda: puppet.set_displayname("Alice 2")) == 1
    profile = await human.get(f"{CLIENT}/profile/{q(puppet.user_id)}")
    assert profile == {"displayname": "Alice 2", "avatar_url": "mxc://test.local/alice"}


@pytest.mark.synapse
async def test_an_intents_own_membership_changes_reach_the_store(
    app: AppService, human: Human, unique: str
) -> None:
    room = await invite_only_room(human, app.bot.user_id)
    await app.bot.join_room(room)
    puppet = app.intent(f"_bk_leaver_{unique}")
    await puppet.ensure_joined(room)
    await puppet.leave_room(room)
    member = await app.store.membership(room, puppet.user_id)
    assert member is not None and member.membership == "leave"
    assert not await app.room_state.is_joined(room, puppet.user_id)
    assert puppet.user_id not in await joined(human, room)
