"""``app.puppets.join_many`` and ``sync_profiles`` against a real Synapse.

Memberships and profiles are read back through the homeserver by a real user
(plain HTTP, its own token); requests are counted by a :class:`ClientObserver`
on the client, which sees every attempt that got an HTTP reply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit import AppService
from bridge_kit.client.homeserver import REGISTER_ENDPOINT, ClientObserver
from bridge_kit.types.room_state import Member
from tests.conftest import TestHomeserver, _running_homeserver
from tests.test_appservice_e2e import make_app
from tests.test_intent_api import CLIENT, Human, q
from tests.test_room_state import invite_only_room, joined

pytestmark = pytest.mark.synapse


class Requests(ClientObserver):
    """Counts the requests a client sends, by method and endpoint."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        self.seen[method, endpoint] += 1

    def on_retry(self, reason: str, delay: float) -> None:
        self.seen["retry", reason] += 1

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse, as in test_room_state: the joins make transactions for our
    # appservice, which the session's Synapse must not queue for a port nobody serves.
    async with _running_homeserver(tmp_path_factory.mktemp("bulk_joins")) as hs:
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


@pytest.fixture
def requests(app: AppService) -> Iterator[Requests]:
    observer = Requests()
    app.client.observers.append(observer)
    yield observer
    app.client.observers.remove(observer)


async def public_room(human: Human, **extra: Any) -> str:
    status, reply = await human.call(
        "POST", f"{CLIENT}/createRoom", {"preset": "public_chat", **extra}
    )
    assert status == 200, reply
    room_id: str = reply["room_id"]
    return room_id


# Enough to run at the concurrency used (16) with every room shared by several puppets and
# joins of one puppet in several rooms; more would only take longer.
PUPPETS, ROOMS, ROOMS_EACH = 30, 10, 3


@pytest.mark.slow
async def test_join_many_joins_90_pairs_in_10_rooms_and_a_rerun_sends_nothing(
    app: AppService, human: Human, requests: Requests, unique: str
) -> None:
    server = app.puppets.domain
    alias = f"#pub{unique}:{server}"
    public = [await public_room(human, room_alias_name=f"pub{unique}")]
    public += [await public_room(human) for _ in range(ROOMS // 2 - 1)]
    private = [await invite_only_room(human, app.bot.user_id) for _ in range(ROOMS // 2)]
    for room_id in private:
        await app.bot.join_room(room_id)
    rooms = public + private
    puppets = [f"_bk_j{unique}_{i:03d}" for i in range(PUPPETS)]
    # Each puppet joins 3 rooms, each room gets 9 puppets; room 0 is named by its alias.
    pairs = [
        (puppets[i], rooms[(ROOMS_EACH * i + k) % ROOMS])
        for i in range(PUPPETS)
        for k in range(ROOMS_EACH)
    ]
    total = PUPPETS * ROOMS_EACH
    named = [(lp, alias if room == public[0] else room) for lp, room in pairs]
    assert len(set(pairs)) == total and {room for _, room in pairs} == set(rooms)
    bad = [("Not A Localpart", public[1]), (puppets[0], f"#missing{unique}:{server}")]

    result = await app.puppets.join_many([*named, *bad, named[0]], concurrency=16)

    assert (result.joined, result.skipped_known, result.invalid, result.failed) == (total, 0, 1, 1)
    assert result.invited == sum(1 for _, room in pairs if room in private) == total // 2
    assert (result.registered, result.duplicates, result.unresolved_aliases) == (PUPPETS, 1, 1)
    assert result.failures == {
        f"{puppets[0]} #missing{unique}:{server}": ("alias not resolved: no such alias (404)")
    }
    assert set(result.invalid_reasons) == {f"Not A Localpart {public[1]}"}
    assert requests.seen["GET", CLIENT + "/directory/room/{roomAlias}"] == 2  # once per alias
    # Every membership, as the homeserver tells a member of each room.
    for room_id in rooms:
        expected = {f"@{lp}:{server}" for lp, room in pairs if room == room_id}
        assert expected <= await joined(human, room_id), room_id

    # A re-run by room ID sends nothing at all.
    before = requests.total
    again = await app.puppets.join_many(pairs, concurrency=16)
    assert (again.skipped_known, again.joined, requests.total - before) == (total, 0, 0)
    # By alias, the alias is resolved once more (the store keeps no aliases), nothing else.
    before = requests.total
    again = await app.puppets.join_many(named, concurrency=16)
    assert again.skipped_known == total and requests.total - before == 1


async def test_sync_profiles_sets_what_a_real_user_reads_and_a_rerun_sends_nothing(
    app: AppService, homeserver: TestHomeserver, human: Human, requests: Requests, unique: str
) -> None:
    puppets = [f"_bk_p{unique}_{i:02d}" for i in range(40)]
    items = [(lp, f"Puppet {i}", None) for i, lp in enumerate(puppets[:30])]
    items += [(lp, "", "") for lp in puppets[30:35]]  # nothing to set: left alone
    avatar = f"mxc://{homeserver.server_name}/avatar{unique}"
    items += [(lp, None, avatar) for lp in puppets[35:]]

    result = await app.puppets.sync_profiles(items, concurrency=8)

    assert (result.updated, result.skipped_known, result.failed) == (35, 5, 0), result
    assert (result.displaynames_set, result.avatars_set, result.registered) == (30, 5, 35)
    for i, lp in enumerate(puppets[:30]):
        reply = await human.get(f"{CLIENT}/profile/{q(f'@{lp}:{homeserver.server_name}')}")
        assert reply.get("displayname") == f"Puppet {i}"
    reply = await human.get(f"{CLIENT}/profile/{q(f'@{puppets[36]}:{homeserver.server_name}')}")
    assert reply.get("avatar_url") == avatar
    assert reply.get("displayname") == puppets[36]  # Synapse's default: left alone

    before = requests.total
    again = await app.puppets.sync_profiles(items, concurrency=8)
    assert (again.skipped_known, again.updated, requests.total - before) == (40, 0, 0)
    # A changed name is sent; the unchanged ones are not.
    before = requests.total
    changed = await app.puppets.sync_profiles([(puppets[0], "Renamed", None), *items[1:30]])
    assert (changed.updated, changed.skipped_known, requests.total - before) == (1, 29, 1)
    reply = await human.get(f"{CLIENT}/profile/{q(f'@{puppets[0]}:{homeserver.server_name}')}")
    assert reply.get("displayname") == "Renamed"


async def test_join_many_sets_member_profiles_first_and_the_joins_carry_them(
    app: AppService, homeserver: TestHomeserver, human: Human, requests: Requests, unique: str
) -> None:
    server = homeserver.server_name
    room_id = await public_room(human)
    puppets = [f"_bk_m{unique}_{i}" for i in range(4)]
    avatar = f"mxc://{server}/avatar{unique}"
    # One with a name the store knows as set already: no profile request for it.
    await app.puppets.sync_profiles([(puppets[3], "Known", None)])
    profiles = {
        puppets[0]: Member("Zero", None),
        puppets[1]: Member("One", avatar),
        puppets[3]: Member("Known", None),
    }  # puppets[2]: none given, joins with its global profile
    before = Counter(requests.seen)

    result = await app.puppets.join_many(
        [(lp, room_id) for lp in puppets], concurrency=4, member_profiles=profiles
    )

    assert (result.joined, result.failed) == (4, 0), result.summary()
    sent = requests.seen - before
    assert sent["PUT", CLIENT + "/profile/{userId}/displayname"] == 2
    assert sent["PUT", CLIENT + "/profile/{userId}/avatar_url"] == 1
    state = await human.get(f"{CLIENT}/rooms/{q(room_id)}/state")
    members = {e["state_key"]: e["content"] for e in state if e["type"] == "m.room.member"}
    assert members[f"@{puppets[0]}:{server}"].get("displayname") == "Zero"
    assert members[f"@{puppets[1]}:{server}"].get("avatar_url") == avatar
    assert members[f"@{puppets[2]}:{server}"].get("displayname") == puppets[2]
    assert members[f"@{puppets[3]}:{server}"].get("displayname") == "Known"
    for lp, name in ((puppets[0], "Zero"), (puppets[1], "One")):
        reply = await human.get(f"{CLIENT}/profile/{q(f'@{lp}:{server}')}")
        assert reply.get("displayname") == name  # the global profile, set before the join
    # Stored: a sync of the same profiles sends nothing, and the room-state store
    # knows each member's name.
    again = await app.puppets.sync_profiles(
        [(puppets[0], "Zero", None), (puppets[1], "One", avatar)]
    )
    assert (again.skipped_known, again.updated) == (2, 0)
    member = await app.store.membership(room_id, f"@{puppets[0]}:{server}")
    assert member is not None and member.displayname == "Zero"


async def test_a_room_named_by_alias_and_by_id_is_joined_once(
    app: AppService, human: Human, requests: Requests, unique: str
) -> None:
    server = app.puppets.domain
    alias = f"#both{unique}:{server}"
    room_id = await public_room(human, room_alias_name=f"both{unique}")
    first, second = f"_bk_d{unique}_1", f"_bk_d{unique}_2"
    # The same membership twice over: by alias then by ID, and by ID then by alias.
    pairs = [(first, alias), (first, room_id), (second, room_id), (second, alias)]

    result = await app.puppets.join_many(pairs, concurrency=4)

    assert (result.joined, result.duplicates, result.failed) == (2, 2, 0), result.summary()
    assert requests.seen["POST", CLIENT + "/join/{roomIdOrAlias}"] == 2
    assert {f"@{first}:{server}", f"@{second}:{server}"} <= await joined(human, room_id)


async def test_join_many_takes_pairs_as_lists_as_sync_profiles_takes_items(
    app: AppService, human: Human, unique: str
) -> None:
    # Pairs read from JSON are lists; they were refused as "unhashable type: 'list'".
    room_id = await public_room(human)
    pairs = [[f"_bk_l{unique}", room_id], [f"_bk_l{unique}", room_id]]

    result = await app.puppets.join_many(pairs)  # type: ignore[arg-type]

    assert (result.joined, result.duplicates) == (1, 1), result.summary()
    assert f"@_bk_l{unique}:{app.puppets.domain}" in await joined(human, room_id)


async def test_a_puppet_the_homeserver_refuses_is_asked_for_once_however_many_pairs(
    app: AppService, requests: Requests, unique: str
) -> None:
    # shared_ is the rival appservice's exclusive namespace: Synapse answers M_EXCLUSIVE.
    # 1,001 pairs span two chunks of input; the second chunk's pair used to ask again.
    server = app.puppets.domain
    pairs = [(f"shared_{unique}", f"!never{i}:{server}") for i in range(1001)]

    result = await app.puppets.join_many(pairs, concurrency=4)

    assert (result.failed, result.joined, result.registered) == (1001, 0, 0), result.summary()
    assert all("M_EXCLUSIVE" in reason for reason in result.failures.values())
    assert requests.seen["POST", REGISTER_ENDPOINT] == 1
