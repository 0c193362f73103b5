"""Intent against a real Synapse: puppets registered on first use, acting via ``?user_id=``.

Then the fault homeserver, for what Synapse will not do on demand: lose a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge_kit.client.homeserver import (
    ClientObserver,
    HomeserverClient,
    RetryPolicy,
    quote_segment,
)
from bridge_kit.errors import Forbidden, HomeserverUnreachable, MatrixRequestError, UserInUse
from bridge_kit.inbox.delivery import handling
from bridge_kit.intent import Intent
from bridge_kit.types.register import RegisterRequest
from bridge_kit.types.room import CreateRoomRequest, RoomPreset, TextMessage
from tests.conftest import TestHomeserver
from tests.helpers.fault_homeserver import CREATE_ROOM_PATH, Fault, FaultHomeserver

CLIENT = "/_matrix/client/v3"


class EndpointRecorder(ClientObserver):
    def __init__(self) -> None:
        self.endpoints: list[str] = []

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        self.endpoints.append(f"{method} {endpoint}")


class Puppets:
    """Makes intents for fresh ``_bk_`` puppets and counts their registrations."""

    def __init__(self, client: HomeserverClient, synapse: TestHomeserver, unique: str) -> None:
        self.client = client
        self.synapse = synapse
        self.unique = unique
        self.registrations: dict[str, int] = {}

    def user_id(self, name: str) -> str:
        return f"@_bk_{name}_{self.unique}:{self.synapse.server_name}"

    def intent(self, name: str) -> Intent:
        localpart = f"_bk_{name}_{self.unique}"

        async def register() -> None:
            self.registrations[name] = self.registrations.get(name, 0) + 1
            with contextlib.suppress(UserInUse):
                await self.client.register(RegisterRequest.for_puppet(localpart))

        return Intent(self.client, self.user_id(name), register)


@pytest.fixture
async def client(synapse: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse.url, synapse.as_token) as client:
        yield client


@pytest.fixture
def puppets(client: HomeserverClient, synapse: TestHomeserver, unique: str) -> Puppets:
    return Puppets(client, synapse, unique)


async def get_as(client: HomeserverClient, user_id: str, path: str) -> dict[str, Any]:
    return await client.request("GET", CLIENT + path, user_id=user_id)


async def get_event(client: HomeserverClient, user_id: str, room_id: str, event_id: str) -> Any:
    return await get_as(
        client, user_id, f"/rooms/{quote_segment(room_id)}/event/{quote_segment(event_id)}"
    )


@pytest.mark.synapse
async def test_puppet_is_registered_on_first_use_then_never_again(
    puppets: Puppets, client: HomeserverClient, synapse: TestHomeserver
) -> None:
    alice = puppets.intent("alice")
    assert not await synapse.user_exists(alice.user_id)

    await alice.set_displayname("Alice")
    await alice.set_displayname("Alice Liddell")

    assert await synapse.user_exists(alice.user_id)
    assert puppets.registrations == {"alice": 1}
    assert alice.is_registered
    profile = await get_as(
        client, alice.user_id, f"/profile/{quote_segment(alice.user_id)}/displayname"
    )
    assert profile["displayname"] == "Alice Liddell"


@pytest.mark.synapse
async def test_concurrent_first_uses_share_one_registration(puppets: Puppets) -> None:
    carol = puppets.intent("carol")

    await asyncio.gather(*(carol.set_displayname(f"Carol {i}") for i in range(5)))

    assert puppets.registrations == {"carol": 1}


@pytest.mark.synapse
async def test_failed_registration_is_tried_again(
    client: HomeserverClient, synapse: TestHomeserver, unique: str
) -> None:
    attempts = 0
    localpart = f"_bk_flaky_{unique}"

    async def register() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("store down")
        await client.register(RegisterRequest.for_puppet(localpart))

    flaky = Intent(client, f"@{localpart}:{synapse.server_name}", register)

    with pytest.raises(RuntimeError, match="store down"):
        await flaky.set_displayname("Flaky")
    assert not flaky.is_registered
    await flaky.set_displayname("Flaky")

    assert attempts == 2
    assert await synapse.user_exists(flaky.user_id)


@pytest.mark.synapse
async def test_avatar_url(puppets: Puppets, client: HomeserverClient) -> None:
    dave = puppets.intent("dave")

    await dave.set_avatar_url("mxc://test.local/AvatarOfDave")

    profile = await get_as(client, dave.user_id, f"/profile/{quote_segment(dave.user_id)}")
    assert profile["avatar_url"] == "mxc://test.local/AvatarOfDave"


@pytest.mark.synapse
async def test_room_life_cycle(puppets: Puppets, client: HomeserverClient) -> None:
    alice, bob = puppets.intent("alice"), puppets.intent("bob")

    room_id = await alice.create_room(name="Tea party", preset=RoomPreset.PRIVATE_CHAT)
    await alice.invite(room_id, bob.user_id, reason="tea")
    assert await bob.join_room(room_id) == room_id
    text_id = await alice.send_text(room_id, "hello bob")
    topic_id = await alice.send_state(room_id, "m.room.topic", {"topic": "Mad hatters"})

    text = await get_event(client, bob.user_id, room_id, text_id)
    assert text["sender"] == alice.user_id
    assert text["content"] == {"msgtype": "m.text", "body": "hello bob"}
    topic = await get_event(client, bob.user_id, room_id, topic_id)
    assert (topic["type"], topic["state_key"]) == ("m.room.topic", "")
    name = await get_as(client, bob.user_id, f"/rooms/{quote_segment(room_id)}/state/m.room.name/")
    assert name == {"name": "Tea party"}

    await bob.leave_room(room_id, reason="late")

    member = await get_as(
        client,
        alice.user_id,
        f"/rooms/{quote_segment(room_id)}/state/m.room.member/{quote_segment(bob.user_id)}",
    )
    assert member["membership"] == "leave"
    assert member["reason"] == "late"
    with pytest.raises(Forbidden):
        await bob.send_text(room_id, "still here?")


@pytest.mark.synapse
async def test_join_by_alias_with_via(puppets: Puppets, synapse: TestHomeserver) -> None:
    alice, bob = puppets.intent("alice"), puppets.intent("bob")
    alias_name = f"_bk_lobby_{puppets.unique}"
    room_id = await alice.create_room(
        CreateRoomRequest(preset=RoomPreset.PUBLIC_CHAT, room_alias_name=alias_name)
    )

    joined = await bob.join_room(f"#{alias_name}:{synapse.server_name}", via=[synapse.server_name])

    assert joined == room_id


@pytest.mark.synapse
async def test_html_text_and_attrs_content(puppets: Puppets, client: HomeserverClient) -> None:
    alice = puppets.intent("alice")
    room_id = await alice.create_room()

    html_id = await alice.send_text(room_id, "bold", html="<b>bold</b>")
    notice_id = await alice.send_event(
        room_id, "m.room.message", TextMessage(body="n", extra={"m.mentions": {}})
    )

    html = await get_event(client, alice.user_id, room_id, html_id)
    assert html["content"] == {
        "msgtype": "m.text",
        "body": "bold",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>bold</b>",
    }
    notice = await get_event(client, alice.user_id, room_id, notice_id)
    assert notice["content"] == {"msgtype": "m.text", "body": "n", "m.mentions": {}}


@pytest.mark.synapse
async def test_timestamp_sets_origin_server_ts(puppets: Puppets, client: HomeserverClient) -> None:
    alice = puppets.intent("alice")
    room_id = await alice.create_room()
    past = 1_500_000_000_000

    message_id = await alice.send_event(room_id, "org.example.old", {"v": 1}, timestamp=past)
    state_id = await alice.send_state(room_id, "m.room.topic", {"topic": "old"}, timestamp=past + 1)

    message = await get_event(client, alice.user_id, room_id, message_id)
    state = await get_event(client, alice.user_id, room_id, state_id)
    assert message["origin_server_ts"] == past
    assert state["origin_server_ts"] == past + 1


@pytest.mark.synapse
async def test_same_txn_id_is_deduplicated(puppets: Puppets) -> None:
    alice = puppets.intent("alice")
    room_id = await alice.create_room()

    first = await alice.send_event(room_id, "org.example.x", {"v": 1}, txn_id="t1")
    again = await alice.send_event(room_id, "org.example.x", {"v": 1}, txn_id="t1")
    other = await alice.send_event(room_id, "org.example.x", {"v": 1})

    assert first == again
    assert other != first


@pytest.mark.synapse
async def test_odd_state_keys_and_types_are_quoted(
    puppets: Puppets, client: HomeserverClient
) -> None:
    alice = puppets.intent("alice")
    room_id = await alice.create_room()
    state_key = "a/b c?d#e%f"

    await alice.send_state(room_id, "org.example/odd type", {"v": 1}, state_key)

    path = (
        f"/rooms/{quote_segment(room_id)}/state/"
        f"{quote_segment('org.example/odd type')}/{quote_segment(state_key)}"
    )
    assert await get_as(client, alice.user_id, path) == {"v": 1}


@pytest.mark.synapse
async def test_requests_report_templated_endpoints(
    puppets: Puppets, client: HomeserverClient
) -> None:
    recorder = EndpointRecorder()
    client.observers.append(recorder)
    alice = puppets.intent("alice")

    room_id = await alice.create_room()
    await alice.send_text(room_id, "hi")
    await alice.send_state(room_id, "m.room.topic", {"topic": "t"})

    assert recorder.endpoints[-3:] == [
        "POST /_matrix/client/v3/createRoom",
        "PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}",
        "PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}",
    ]


@pytest.mark.synapse
async def test_sender_needs_no_registration(
    client: HomeserverClient, synapse: TestHomeserver
) -> None:
    bot = Intent(client, f"@{synapse.sender_localpart}:{synapse.server_name}", None)

    room_id = await bot.create_room(name="bot room")

    assert room_id.startswith("!")
    assert bot.is_registered


@pytest.mark.synapse
async def test_unregistered_puppet_is_forbidden(
    client: HomeserverClient, synapse: TestHomeserver, unique: str
) -> None:
    ghost = Intent(client, f"@_bk_ghost_{unique}:{synapse.server_name}", None)

    with pytest.raises(Forbidden, match="has not registered this user"):
        await ghost.set_displayname("Ghost")


@pytest.mark.synapse
async def test_user_outside_the_namespace_is_forbidden(
    client: HomeserverClient, synapse: TestHomeserver, unique: str
) -> None:
    stranger = Intent(client, f"@human_{unique}:{synapse.server_name}", None)

    with pytest.raises(Forbidden):
        await stranger.create_room()


@pytest.mark.synapse
async def test_content_must_be_a_mapping_or_attrs_model(client: HomeserverClient) -> None:
    intent = Intent(client, "@_bk_x:test.local", None)

    with pytest.raises(TypeError, match="mapping or an attrs model"):
        await intent.send_event("!r:test.local", "m.room.message", ["not", "a", "dict"])
    assert client.request_count == 0


# -- the fault homeserver: a reply lost after the room was made --------------------------

FAULT_TOKEN = "intent-fault-token"
FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.005)


@pytest.fixture
async def fault_hs() -> AsyncIterator[FaultHomeserver]:
    async with FaultHomeserver(as_token=FAULT_TOKEN) as server:
        yield server


@pytest.fixture
async def sender(fault_hs: FaultHomeserver) -> AsyncIterator[Intent]:
    async with HomeserverClient(fault_hs.url, FAULT_TOKEN, retry=FAST) as fault_client:
        yield Intent(fault_client, fault_hs.sender)


async def test_create_room_is_not_sent_again_after_a_504(
    fault_hs: FaultHomeserver, sender: Intent
) -> None:
    fault_hs.inject(Fault.COMMIT_THEN_504, path=CREATE_ROOM_PATH)

    with pytest.raises(MatrixRequestError) as raised:
        await sender.create_room(name="Lobby")

    assert raised.value.status == 504
    assert fault_hs.create_room_requests == 1
    assert len(fault_hs.rooms) == 1  # made once; a retry would have made a second


async def test_create_room_is_not_sent_again_after_a_reset(
    fault_hs: FaultHomeserver, sender: Intent
) -> None:
    fault_hs.inject(Fault.COMMIT_THEN_RESET, path=CREATE_ROOM_PATH)

    with pytest.raises(HomeserverUnreachable, match="not sent again"):
        await sender.create_room(name="Lobby")

    assert fault_hs.create_room_requests == len(fault_hs.rooms) == 1


async def test_create_room_waits_out_a_429(fault_hs: FaultHomeserver, sender: Intent) -> None:
    fault_hs.inject(Fault.RATE_LIMIT, path=CREATE_ROOM_PATH)

    room_id = await sender.create_room(name="Lobby")

    assert fault_hs.rooms == [room_id]
    assert fault_hs.create_room_requests == 2


# -- derived transaction IDs -------------------------------------------------------


async def room_messages(client: HomeserverClient, user_id: str, room_id: str) -> list[Any]:
    reply = await client.request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote_segment(room_id)}/messages",
        query={"dir": "b", "limit": "50"},
        user_id=user_id,
    )
    return [e for e in reply["chunk"] if e["type"] == "m.room.message"]


@pytest.mark.synapse
async def test_a_handler_run_twice_posts_one_copy_on_synapse(
    puppets: Puppets, client: HomeserverClient
) -> None:
    alice, bob = puppets.intent("alice_d"), puppets.intent("bob_d")
    room_id = await alice.create_room()
    await alice.invite(room_id, bob.user_id)
    await bob.join_room(room_id)

    async def handler_body() -> list[str]:
        with handling("bridge_kit_test", "$incoming:test.local", "tests.echo"):
            return [
                await alice.send_text(room_id, "one"),
                await bob.send_text(room_id, "two"),  # same room, type and counter: other user
            ]

    first = await handler_body()
    again = await handler_body()  # as after a crash before the event was marked done

    assert first == again
    bodies = [e["content"]["body"] for e in await room_messages(client, alice.user_id, room_id)]
    assert sorted(bodies) == ["one", "two"]
