"""Issue 22: moderators win, and room version 12, against a real Synapse.

A real user (plain HTTP, its own token: :class:`tests.test_intent_api.Human`) is the
room's admin and creator; the appservice's bot has moderator power (50) unless a test
says otherwise. What the bridge did is read back by that user, and requests are
counted by a client observer (:class:`tests.test_bulk_joins.Requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web

from bridge_kit import (
    AppService,
    Banned,
    BridgeKitError,
    Event,
    Forbidden,
    HomeserverClient,
    Intent,
    MatrixRequestError,
    PowerLevelConflict,
    PowerLevelRefused,
    PuppetsConfig,
)
from bridge_kit.config import ConfigError
from bridge_kit.puppets.joins import room_problem
from bridge_kit.puppets.results import Ban
from bridge_kit.registration import Namespace, generate_registration
from bridge_kit.store import Store, open_store
from tests.conftest import TestHomeserver, _running_homeserver
from tests.test_appservice_e2e import make_app
from tests.test_bulk_cli import bridge_kit as bridge_kit_cli
from tests.test_bulk_joins import Requests
from tests.test_intent_api import CLIENT, Human, q
from tests.test_readme import block
from tests.test_room_state import eventually, invite_only_room, joined, requests_during
from tests.test_store import backend_url, emptied

pytestmark = pytest.mark.synapse

POWER_LEVELS = "m.room.power_levels"
STATE_PUT = ("PUT", "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}")


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse, as in test_room_state: its transactions go to a port only this
    # module's apps serve.
    async with _running_homeserver(tmp_path_factory.mktemp("moderation")) as hs:
        yield hs


@pytest.fixture
async def app(homeserver: TestHomeserver, tmp_path: Path) -> AsyncIterator[AppService]:
    async with make_app(homeserver, tmp_path / "bk.db") as running:
        yield running


@pytest.fixture
async def human(homeserver: TestHomeserver, unique: str) -> Human:
    localpart = f"admin_{unique}"
    token = await homeserver.create_user(localpart)
    return Human(homeserver, f"@{localpart}:{homeserver.server_name}", token)


@pytest.fixture
def requests(app: AppService) -> Iterator[Requests]:
    observer = Requests()
    app.client.observers.append(observer)
    yield observer
    app.client.observers.remove(observer)


async def moderated_room(app: AppService, human: Human, **extra: Any) -> str:
    """An invite-only room version 12 room of the human's, where the bot (joined) has
    power 50: enough to invite, kick and ban, below the human (its creator)."""
    room = await invite_only_room(human, app.bot.user_id, room_version="12", **extra)
    await app.bot.join_room(room)
    return room


async def ban(human: Human, room: str, user_id: str, reason: str) -> None:
    body = {"user_id": user_id, "reason": reason}
    status, reply = await human.call("POST", f"{CLIENT}/rooms/{q(room)}/ban", body)
    assert status == 200, reply


async def membership(human: Human, room: str, user_id: str) -> dict[str, Any] | None:
    """The user's member event as the human reads it; None for no membership."""
    path = f"{CLIENT}/rooms/{q(room)}/state/m.room.member/{q(user_id)}"
    status, event = await human.call("GET", path, params={"format": "event"})
    if status == 404:
        return None
    assert status == 200, event
    return dict(event)


async def power_levels(human: Human, room: str) -> dict[str, Any]:
    return dict(await human.get(f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/"))


# -- bans: never lifted unless asked -----------------------------------------------------


async def test_a_banned_puppet_is_not_unbanned_and_the_error_names_the_ban(
    app: AppService, human: Human, requests: Requests, unique: str
) -> None:
    room = await moderated_room(app, human)
    puppet = app.intent(f"_bk_banned_{unique}")
    await puppet.ensure_registered()
    await ban(human, room, puppet.user_id, "spam")
    requests.seen.clear()

    with pytest.raises(Banned) as caught:
        await puppet.ensure_joined(room)

    error = caught.value
    assert (error.room_id, error.user_id) == (room, puppet.user_id)
    assert (error.banner, error.reason) == (human.user_id, "spam")
    assert isinstance(error, Forbidden) and isinstance(error, BridgeKitError)
    assert error.status == 403
    assert f"banned from {room} by {human.user_id} (spam)" in str(error)
    after = await membership(human, room, puppet.user_id)
    assert after is not None and after["content"]["membership"] == "ban"
    assert after["sender"] == human.user_id
    assert not any(endpoint.endswith(("/unban", "/invite")) for _, endpoint in requests.seen)


async def test_join_many_counts_a_ban_as_failed_and_lifts_it_only_when_asked(
    app: AppService, human: Human, unique: str
) -> None:
    room = await moderated_room(app, human)
    banned, welcome = f"_bk_b_{unique}", f"_bk_w_{unique}"
    banned_id = f"@{banned}:{app.puppets.domain}"
    await app.puppets.ensure_registered(banned)
    await ban(human, room, banned_id, "flooding")
    problems: list[tuple[str, str, str]] = []

    result = await app.puppets.join_many(
        [(banned, room), (welcome, room)], on_problem=lambda *p: problems.append(p)
    )

    assert (result.joined, result.invited, result.failed, result.banned) == (1, 1, 1, 1)
    assert result.bans == [Ban(room, banned_id, human.user_id, "flooding")]
    reason = result.failures[f"{banned} {room}"]
    assert reason.startswith("banned, not unbanned:") and human.user_id in reason
    assert problems == [("failed", f"{banned} {room}", reason)]
    assert ("banned (not unbanned)", 1) in result.detail_rows()
    assert result.to_json()["bans"] == [
        {"room_id": room, "user_id": banned_id, "banner": human.user_id, "reason": "flooding"}
    ]
    assert await joined(human, room) >= {f"@{welcome}:{app.puppets.domain}"}
    assert banned_id not in await joined(human, room)
    still = await membership(human, room, banned_id)
    assert still is not None and still["content"]["membership"] == "ban"

    lifted = await app.puppets.join_many([(banned, room)], unban=True)

    assert (lifted.joined, lifted.banned, lifted.failed) == (1, 0, 0)
    assert banned_id in await joined(human, room)


async def test_the_join_command_lifts_a_ban_only_when_given_unban(
    app: AppService, human: Human, homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    room = await moderated_room(app, human)
    puppet = f"_bk_cli_{unique}"
    puppet_id = f"@{puppet}:{app.puppets.domain}"
    await app.puppets.ensure_registered(puppet)
    await ban(human, room, puppet_id, "flooding")
    (tmp_path / "pairs.tsv").write_text(f"{puppet}\t{room}\n")
    args = ["join", "-r", str(homeserver.registration_path), "--homeserver", homeserver.url,
            "--from-file", "pairs.tsv", "--store", "sqlite:///cli.db", "--no-progress"]  # fmt: skip

    refused = await bridge_kit_cli(*args, cwd=tmp_path)

    assert refused.status == 1, refused
    assert "banned (not unbanned)" in refused.stdout
    still = await membership(human, room, puppet_id)
    assert still is not None and still["content"]["membership"] == "ban"

    lifted = await bridge_kit_cli(*args, "--unban", cwd=tmp_path)

    assert lifted.status == 0, lifted
    assert puppet_id in await joined(human, room)


async def test_an_unban_in_a_room_anyone_may_join_is_not_counted_as_an_invite(
    app: AppService, human: Human, unique: str
) -> None:
    room = await moderated_room(app, human, preset="public_chat")
    banned = f"_bk_pub_{unique}"
    banned_id = f"@{banned}:{app.puppets.domain}"
    await app.puppets.ensure_registered(banned)
    await ban(human, room, banned_id, "testing")

    lifted = await app.puppets.join_many([(banned, room)], unban=True)

    assert (lifted.joined, lifted.invited, lifted.banned, lifted.failed) == (1, 0, 0, 0)
    assert banned_id in await joined(human, room)


async def test_a_refusal_that_is_not_about_an_invite_gets_no_invite(
    app: AppService, human: Human, unique: str
) -> None:
    room = await moderated_room(app, human)
    # A join rule no invite opens ("private" is reserved by the spec: nobody may join).
    path = f"{CLIENT}/rooms/{q(room)}/state/m.room.join_rules/"
    status, body = await human.call("PUT", path, {"join_rule": "private"})
    assert status == 200, body
    puppet = app.intent(f"_bk_outsider_{unique}")

    with pytest.raises(Forbidden) as caught:
        await puppet.ensure_joined(room)
    result = await app.puppets.join_many([(f"_bk_outsider2_{unique}", room)])

    assert not isinstance(caught.value, Banned)
    assert await membership(human, room, puppet.user_id) is None  # never invited
    assert (result.failed, result.invited, result.banned) == (1, 0, 0)
    assert await membership(human, room, f"@_bk_outsider2_{unique}:test.local") is None


async def test_a_refusal_about_the_account_not_the_room_gets_no_invite(
    app: AppService, homeserver: TestHomeserver, human: Human, unique: str
) -> None:
    """A suspended puppet's join is refused with 403 M_USER_SUSPENDED: no invite
    lets it in, so the bot must not invite it (nor read the room to find out)."""
    room = await moderated_room(app, human)
    localparts = [f"_bk_susp_{unique}", f"_bk_susp2_{unique}"]
    admin = {"Authorization": f"Bearer {await homeserver.admin_token()}"}
    for localpart in localparts:
        await app.puppets.ensure_registered(localpart)
        user_id = f"@{localpart}:{app.puppets.domain}"
        url = f"{homeserver.url}/_synapse/admin/v1/suspend/{q(user_id)}"
        async with homeserver.http.put(url, json={"suspend": True}, headers=admin) as reply:
            assert reply.status == 200, await reply.text()
    puppet = app.intent(localparts[0])

    with pytest.raises(MatrixRequestError) as caught:
        await puppet.ensure_joined(room)
    result = await app.puppets.join_many([(localparts[1], room)])

    assert caught.value.errcode == "M_USER_SUSPENDED"
    assert (result.failed, result.invited, result.banned) == (1, 0, 0)
    assert "M_USER_SUSPENDED" in result.failures[f"{localparts[1]} {room}"]
    for localpart in localparts:
        assert await membership(human, room, f"@{localpart}:{app.puppets.domain}") is None


async def test_a_kicked_puppet_is_invited_again(app: AppService, human: Human, unique: str) -> None:
    """A kick is not a ban: the puppet may come back, so the bot invites it."""
    room = await moderated_room(app, human)
    puppet = app.intent(f"_bk_kicked_{unique}")
    await puppet.ensure_joined(room)
    status, body = await human.call(
        "POST", f"{CLIENT}/rooms/{q(room)}/kick", {"user_id": puppet.user_id}
    )
    assert status == 200, body
    await eventually(lambda: _left(app, room, puppet.user_id))

    # The refused join, the bot's two reads (membership, join rule), its invite, the join.
    assert await requests_during(app, lambda: puppet.ensure_joined(room)) == 5

    assert puppet.user_id in await joined(human, room)


async def _left(app: AppService, room: str, user_id: str) -> bool:
    member = await app.store.membership(room, user_id)
    return member is not None and member.membership == "leave"


# -- power levels ---------------------------------------------------------------------------


async def test_the_bot_never_changes_whom_it_cannot_outrank(
    app: AppService, human: Human, requests: Requests, unique: str
) -> None:
    peer, below = f"@_bk_peer_{unique}:test.local", f"@_bk_below_{unique}:test.local"
    overrides = {
        "invite": 50,
        "events": {POWER_LEVELS: 50},
        "users": {app.bot.user_id: 50, peer: 50, below: 10},
    }
    room = await moderated_room(app, human, power_level_content_override=overrides)
    before = await power_levels(human, room)
    requests.seen.clear()

    refused = [
        (human.user_id, 0, "creator of the room"),  # room version 12: above every level
        (peer, 0, "not below"),
        (below, 60, "above"),
    ]
    for user_id, level, why in refused:
        with pytest.raises(PowerLevelRefused, match=why):
            await app.bot.set_power_level(room, user_id, level)
    await app.bot.ensure_power_level(room, human.user_id, 100)  # a creator: left alone

    assert requests.seen[STATE_PUT] == 0
    assert await power_levels(human, room) == before
    # Read (the levels, the create event), write, read back.
    assert await requests_during(app, lambda: app.bot.set_power_level(room, below, 40)) == 4
    assert (await power_levels(human, room))["users"][below] == 40


async def test_a_writer_below_the_power_levels_own_level_sends_nothing(
    app: AppService, human: Human, requests: Requests, unique: str
) -> None:
    """m.room.power_levels needs its level in events (else state_default) to be sent
    at all: a bot below it is refused before anything is sent."""
    below = f"@_bk_pl_{unique}:test.local"
    users = {app.bot.user_id: 50}
    for overrides in (
        {"invite": 50, "users": users, "events": {POWER_LEVELS: 100}},
        {"invite": 50, "users": users, "state_default": 75, "events": {}},
    ):
        room = await moderated_room(app, human, power_level_content_override=overrides)
        requests.seen.clear()

        with pytest.raises(PowerLevelRefused, match=f"sending {POWER_LEVELS} needs"):
            await app.bot.set_power_level(room, below, 10)

        assert requests.seen[STATE_PUT] == 0


async def test_concurrent_power_level_changes_in_one_room_all_stay(
    app: AppService, human: Human, unique: str
) -> None:
    overrides = {"invite": 50, "events": {POWER_LEVELS: 99}, "users": {app.bot.user_id: 99}}
    room = await moderated_room(app, human, power_level_content_override=overrides)
    users = {f"@_bk_lvl{n}_{unique}:test.local": 10 + n for n in range(8)}

    await asyncio.gather(*(app.bot.set_power_level(room, u, lvl) for u, lvl in users.items()))

    stored = (await power_levels(human, room))["users"]
    assert {user: stored.get(user) for user in users} == users


async def test_writers_with_their_own_clients_take_turns_in_one_room(
    app: AppService, homeserver: TestHomeserver, human: Human, unique: str
) -> None:
    """The lock is per room, not per client: a double puppet (here the admin, with its
    own token and client) and the bot write in turn, so nobody writes twice."""
    overrides = {"invite": 50, "events": {POWER_LEVELS: 99}, "users": {app.bot.user_id: 99}}
    room = await moderated_room(app, human, power_level_content_override=overrides)
    by_bot = {f"@_bk_pb{n}_{unique}:test.local": 10 + n for n in range(4)}
    by_admin = {f"@_bk_pa{n}_{unique}:test.local": 20 + n for n in range(4)}
    counted = Requests()

    async with HomeserverClient(homeserver.url, human.token) as own_client:
        admin = Intent(own_client, human.user_id)
        for client in (app.client, own_client):
            client.observers.append(counted)
        try:
            await asyncio.gather(
                *(app.bot.set_power_level(room, u, lvl) for u, lvl in by_bot.items()),
                *(admin.set_power_level(room, u, lvl) for u, lvl in by_admin.items()),
            )
        finally:
            app.client.observers.remove(counted)

    stored = (await power_levels(human, room))["users"]
    wanted = by_bot | by_admin
    assert {user: stored.get(user) for user in wanted} == wanted
    assert counted.seen[STATE_PUT] == len(wanted)  # each change written once


# -- room version 12 -------------------------------------------------------------------------


async def test_a_version_12_room_id_without_a_server_name_is_taken_everywhere(
    app: AppService, human: Human, unique: str
) -> None:
    arrived: asyncio.Queue[Event] = asyncio.Queue()

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None:
        await arrived.put(event)

    room = await moderated_room(
        app,
        human,
        creation_content={"additional_creators": [app.bot.user_id]},
        power_level_content_override={"invite": 50},  # a creator is never listed in users
    )
    assert room.startswith("!") and ":" not in room  # MSC4291: no server name
    assert room_problem(room) is None

    result = await app.puppets.join_many([(f"_bk_v12_{unique}", room)])
    assert (result.joined, result.invited, result.invalid, result.failed) == (1, 1, 0, 0)
    puppet = app.intent(f"_bk_v12_{unique}")
    stored = await app.store.membership(room, puppet.user_id)
    assert stored is not None and stored.membership == "join"
    await app.intent(f"_bk_v12b_{unique}").ensure_joined(room)
    event_id = await puppet.send_text(room, "no server in this room's ID")
    status, sent = await human.call(
        "PUT",
        f"{CLIENT}/rooms/{q(room)}/send/m.room.message/t{unique}",
        {"msgtype": "m.text", "body": "hi"},
    )
    assert status == 200, sent
    async with asyncio.timeout(30):
        event = await arrived.get()
        while event.sender != human.user_id:
            assert (event.room_id, event.event_id) == (room, event_id)  # the puppet's
            event = await arrived.get()
    assert event.room_id == room

    # MSC4289: the creators (the sender of m.room.create and additional_creators) rank
    # above every level, whether the levels come from the store or the homeserver.
    for levels in (
        await app.room_state.get_power_levels(room),
        await app.bot.get_power_levels(room),
    ):
        assert levels.creators == {human.user_id, app.bot.user_id}
        assert levels.user_level(app.bot.user_id) == levels.user_level(human.user_id) == math.inf
        assert levels.user_level(puppet.user_id) == 0
    await app.bot.ensure_power_level(room, app.bot.user_id, 50)  # a creator: nothing to do
    assert app.bot.user_id not in (await power_levels(human, room))["users"]
    await app.bot.set_power_level(room, puppet.user_id, 100)  # a creator outranks 100
    assert (await power_levels(human, room))["users"][puppet.user_id] == 100


async def test_creators_of_an_unstable_version_10_or_11_room_have_no_special_power(
    app: AppService, human: Human
) -> None:
    """Synapse still creates MSC3757's rooms (built on versions 10 and 11, before
    MSC4289): their creator is an ordinary user of level 100, whom a bot at 50 cannot
    change, for its level, not for being a creator."""
    for version in ("org.matrix.msc3757.10", "org.matrix.msc3757.11"):
        # Before MSC4289, the creator must be listed in the override's users.
        users = {human.user_id: 100, app.bot.user_id: 50}
        overrides = {"invite": 50, "users": users, "events": {POWER_LEVELS: 50}}
        room = await invite_only_room(
            human, app.bot.user_id, room_version=version, power_level_content_override=overrides
        )
        await app.bot.join_room(room)

        for levels in (
            await app.bot.get_power_levels(room),
            await app.room_state.get_power_levels(room),
        ):
            assert levels.creators == frozenset(), version
            assert levels.user_level(human.user_id) == 100
        with pytest.raises(PowerLevelRefused, match="its level 100 is not below"):
            await app.bot.set_power_level(room, human.user_id, 0)


# -- provisioning on query: a daily cap and an approval hook ------------------------------


def test_the_daily_cap_defaults_to_1000_and_must_be_positive() -> None:
    assert PuppetsConfig().provision_per_day == 1000
    with pytest.raises(ConfigError, match="provision_per_day must be at least 1"):
        PuppetsConfig(provision_per_day=0)


async def test_invites_provision_within_the_daily_cap_and_with_approval(
    homeserver: TestHomeserver, tmp_path: Path, human: Human, unique: str
) -> None:
    asked: list[str] = []
    app = make_app(homeserver, tmp_path / "cap.db", PuppetsConfig(provision_per_day=3))

    @app.on_provision_approval
    async def approve(user_id: str) -> bool:
        asked.append(user_id)
        return "_bk_no" not in user_id

    async def invite(localpart: str) -> int:
        """The human invites a puppet the homeserver does not know yet."""
        body = {"user_id": f"@{localpart}:test.local"}
        status, _ = await human.call("POST", f"{CLIENT}/rooms/{q(room)}/invite", body)
        return status

    async with app:
        status, reply = await human.call("POST", f"{CLIENT}/createRoom", {})
        assert status == 200, reply
        room = reply["room_id"]
        # Refused names first: they must not use up the day's three registrations.
        names = [f"_bk_no1_{unique}", f"_bk_no2_{unique}", f"_bk_no3_{unique}"]
        names += [f"_bk_yes1_{unique}", f"_bk_yes2_{unique}", f"_bk_yes3_{unique}"]
        for name in [*names, f"_bk_yes4_{unique}"]:
            # Synapse asks the appservice about an unknown invitee (and invites it anyway).
            assert await invite(name) == 200

        registered = [await app.store.is_registered(f"@{n}:test.local") for n in names]
        assert registered == [False] * 3 + [True] * 3
        assert not await app.store.is_registered(f"@_bk_yes4_{unique}:test.local")
        # The cap is looked at first, so past it nothing reaches the hook: yes4 was not
        # asked about.
        assert asked == [f"@{name}:test.local" for name in names]
        assert app.provisioning_daily.available < 1


def test_a_rooms_namespace_that_names_a_server_is_flagged_for_version_12() -> None:
    registration = generate_registration("bk", None, "test.local", "_bk_")
    namespaces = attrs.evolve(
        registration.namespaces,
        rooms=[Namespace(r"^!bridged.*:test\.local$", False), Namespace(r"^!.*", False)],
    )
    findings = attrs.evolve(registration, namespaces=namespaces).lint()

    [finding] = [f for f in findings if f.field and f.field.startswith("namespaces.rooms")]
    assert finding.field == "namespaces.rooms[0].regex"
    assert "version 12" in finding.message and "never matches" in finding.message


def test_a_rooms_namespace_with_groups_but_no_server_is_not_flagged() -> None:
    """The ':' of a non-capturing group or inline flags is the regex's, not a server's."""
    registration = generate_registration("bk", None, "test.local", "_bk_")
    regexes = [r"^!(?:bridged|portal)_.*", r"^!(?i:Bridged).*", r"^!(?:a|b)(?:c)?.*"]
    namespaces = attrs.evolve(
        registration.namespaces, rooms=[Namespace(regex, False) for regex in regexes]
    )
    findings = attrs.evolve(registration, namespaces=namespaces).lint()

    assert [f for f in findings if "version 12" in f.message] == []


async def test_the_approval_hook_of_the_configuration_page_runs_as_written(
    homeserver: TestHomeserver, tmp_path: Path
) -> None:
    app = make_app(homeserver, tmp_path / "docs.db")
    namespace: dict[str, Any] = {"app": app}
    exec(block("provision-approval"), namespace)  # noqa: S102 - our own documentation

    approve = namespace["approve"]
    assert app._provision_approval is approve
    assert await approve("@_echo_alice:example.org")
    assert not await approve("@_echo_mallory:example.org")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def each_store(backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(backend)) as opened:
        yield opened


async def test_every_store_keeps_a_version_12_room_by_its_id(each_store: Store) -> None:
    store = each_store
    room, alice, bob = "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM", "@a:test.local", "@b:x"

    def event(event_type: str, content: dict[str, Any], key: str, sender: str = alice) -> Event:
        return Event(event_type, content, room, sender, state_key=key, origin_server_ts=1)

    await store.apply_state(
        room,
        [
            event("m.room.create", {"room_version": "12", "additional_creators": [bob]}, ""),
            event(POWER_LEVELS, {"users": {"@c:test.local": 50}}, ""),
            event("m.room.member", {"membership": "join"}, alice),
        ],
        complete=True,
    )

    assert await store.room_state_known(room)
    assert await store.joined_among([(room, alice), (room, bob)]) == {(room, alice)}
    levels = await store.power_levels(room)
    assert levels is not None and levels.creators == {alice, bob}
    assert levels.user_level(bob) == math.inf and levels.user_level("@c:test.local") == 50


@contextlib.asynccontextmanager
async def rival_writer(
    target: str, rival: Callable[[], Awaitable[None]], times: int
) -> AsyncIterator[tuple[str, list[str]]]:
    """A pass-through proxy in front of Synapse that, after each of the first ``times``
    power-levels writes through it, lets ``rival`` write the power levels it had read
    before (another process's writer, which Synapse cannot stage on demand)."""
    writes: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method,
                target + str(request.rel_url),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as reply,
        ):
            body = await reply.read()
        if request.method == "PUT" and POWER_LEVELS in request.path:
            writes.append(request.path)
            if len(writes) <= times:
                await rival()
        content_type = reply.headers.get("Content-Type", "application/json")
        return web.Response(status=reply.status, body=body, content_type=content_type)

    server = web.Application()
    server.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", writes
    finally:
        await runner.cleanup()


async def test_a_level_a_moderator_set_after_ours_stands(
    app: AppService, homeserver: TestHomeserver, human: Human, unique: str
) -> None:
    """The read-back writes again only over a stale copy of the levels; a moderator who
    gave the user another level after our write keeps it (moderators win)."""
    overrides = {"invite": 50, "events": {POWER_LEVELS: 99}, "users": {app.bot.user_id: 99}}
    room = await moderated_room(app, human, power_level_content_override=overrides)
    target = f"@_bk_demoted_{unique}:test.local"

    async def moderator() -> None:
        levels = await power_levels(human, room)
        path = f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/"
        content = {**levels, "users": {**levels["users"], target: 7}}
        status, body = await human.call("PUT", path, content)
        assert status == 200, body

    async with (
        rival_writer(homeserver.url, moderator, 1) as (url, writes),
        HomeserverClient(url, homeserver.as_token) as proxied,
    ):
        bot = Intent(proxied, app.bot.user_id)
        with pytest.raises(PowerLevelConflict, match="set it to 7; theirs stands") as caught:
            await bot.set_power_level(room, target, 42)

    assert caught.value.theirs == 7
    assert (await power_levels(human, room))["users"][target] == 7
    assert len(writes) == 1


@pytest.mark.parametrize("rival_writes", [1, 3])
async def test_a_change_another_writer_replaced_is_written_again_then_given_up(
    app: AppService, homeserver: TestHomeserver, human: Human, unique: str, rival_writes: int
) -> None:
    overrides = {"invite": 50, "events": {POWER_LEVELS: 99}, "users": {app.bot.user_id: 99}}
    room = await moderated_room(app, human, power_level_content_override=overrides)
    before = await power_levels(human, room)
    target = f"@_bk_target_{unique}:test.local"

    async def rival() -> None:
        path = f"{CLIENT}/rooms/{q(room)}/state/{POWER_LEVELS}/"
        status, body = await human.call("PUT", path, {**before, "ban": before["ban"] + 1})
        assert status == 200, body

    async with (
        rival_writer(homeserver.url, rival, rival_writes) as (url, writes),
        HomeserverClient(url, homeserver.as_token) as proxied,
    ):
        bot = Intent(proxied, app.bot.user_id)
        if rival_writes < 3:
            await bot.set_power_level(room, target, 42)
            assert (await power_levels(human, room))["users"][target] == 42
        else:
            with pytest.raises(PowerLevelConflict, match="after each of 3 writes"):
                await bot.set_power_level(room, target, 42)
            assert target not in (await power_levels(human, room))["users"]
    assert len(writes) == min(rival_writes + 1, 3)
