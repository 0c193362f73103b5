"""The Intent API against a real Synapse; each effect is read back by a separate real user.

The reading side never uses bridge_kit's own reading calls: a real user's
plain HTTP requests (or, for what only the puppet itself may see, such as its
account data, a plain ``client.request`` as that puppet).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge_kit.client.homeserver import (
    ClientObserver,
    HomeserverClient,
    RetryPolicy,
    quote_segment,
)
from bridge_kit.errors import InvalidMxc, LimitExceeded, MediaTooLarge, NotFound, UserInUse
from bridge_kit.intent import Intent
from bridge_kit.types.media import MediaInfo
from bridge_kit.types.register import RegisterRequest
from bridge_kit.types.room import RoomPreset
from bridge_kit.types.room_state import PowerLevels
from tests.conftest import TestHomeserver

CLIENT = "/_matrix/client/v3"


class Human:
    """A real Matrix user (password account), talking plain HTTP with its own token."""

    def __init__(self, synapse: TestHomeserver, user_id: str, token: str) -> None:
        self.synapse = synapse
        self.user_id = user_id
        self.token = token

    async def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.synapse.http.request(
            method, self.synapse.url + path, json=body, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, raw

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        status, body = await self.call("GET", path, params=params)
        assert status == 200, (path, status, body)
        return body

    async def event(self, room_id: str, event_id: str) -> Any:
        return await self.get(f"{CLIENT}/rooms/{q(room_id)}/event/{q(event_id)}")

    async def state(self, room_id: str, event_type: str, state_key: str = "") -> tuple[int, Any]:
        return await self.call(
            "GET", f"{CLIENT}/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}"
        )

    async def join(self, room_id: str) -> None:
        status, body = await self.call("POST", f"{CLIENT}/join/{q(room_id)}", {})
        assert status == 200, body

    async def room_sync(self, room_id: str, since: str | None = None) -> tuple[Any, str]:
        """The room's part of a /sync (incremental after ``since``), and the next token.

        Synapse caches an identical /sync for a while, so a later look needs ``since``.
        """
        params = {"timeout": "0"} | ({} if since is None else {"since": since})
        sync = await self.get(f"{CLIENT}/sync", params)
        return sync["rooms"]["join"].get(room_id, {}), sync["next_batch"]


def q(value: str) -> str:
    return quote_segment(value)


class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.endpoints: list[str] = []

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        self.endpoints.append(f"{method} {endpoint}")


@pytest.fixture
async def client(synapse: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse.url, synapse.as_token) as client:
        yield client


@pytest.fixture
def make_puppet(client: HomeserverClient, synapse: TestHomeserver, unique: str) -> Any:
    def make(name: str) -> Intent:
        localpart = f"_bk_{name}_{unique}"

        async def register() -> None:
            with contextlib.suppress(UserInUse):
                await client.register(RegisterRequest.for_puppet(localpart))

        return Intent(client, f"@{localpart}:{synapse.server_name}", register)

    return make


@pytest.fixture
async def human(synapse: TestHomeserver, unique: str) -> Human:
    localpart = f"human_{unique}"
    token = await synapse.create_user(localpart)
    return Human(synapse, f"@{localpart}:{synapse.server_name}", token)


@pytest.fixture
async def alice(make_puppet: Any) -> Intent:
    intent: Intent = make_puppet("alice")
    return intent


@pytest.fixture
async def room(alice: Intent, human: Human) -> str:
    """A private room made by the puppet alice, which the human has joined."""
    room_id = await alice.create_room(preset=RoomPreset.PRIVATE_CHAT, invite=[human.user_id])
    await human.join(room_id)
    return room_id


# -- messaging ---------------------------------------------------------------------


@pytest.mark.synapse
async def test_notice_emote_and_reply(alice: Intent, human: Human, room: str) -> None:
    first = await alice.send_text(room, "first")
    notice = await alice.send_notice(room, "a bot says", html="<i>a bot says</i>")
    emote = await alice.send_emote(room, "waves")
    reply = await alice.send_text(room, "answer", reply_to=first)

    assert (await human.event(room, notice))["content"] == {
        "msgtype": "m.notice",
        "body": "a bot says",
        "format": "org.matrix.custom.html",
        "formatted_body": "<i>a bot says</i>",
    }
    assert (await human.event(room, emote))["content"] == {"msgtype": "m.emote", "body": "waves"}
    replied = await human.event(room, reply)
    assert replied["sender"] == alice.user_id
    assert replied["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": first}}
    assert replied["content"]["body"] == "answer"


@pytest.mark.synapse
async def test_edit_is_an_m_replace_with_new_content(
    alice: Intent, human: Human, room: str
) -> None:
    original = await alice.send_text(room, "helo")

    edit = await alice.edit_message(room, original, "hello", html="<b>hello</b>")

    content = (await human.event(room, edit))["content"]
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": original}
    assert content["body"] == "* hello"
    assert content["formatted_body"] == "* <b>hello</b>"
    assert content["m.new_content"] == {
        "msgtype": "m.text",
        "body": "hello",
        "format": "org.matrix.custom.html",
        "formatted_body": "<b>hello</b>",
    }
    # The server applies it: the original as the human sees it now carries the edit.
    relations = await human.get(
        f"/_matrix/client/v1/rooms/{q(room)}/relations/{q(original)}/m.replace"
    )
    assert [e["event_id"] for e in relations["chunk"]] == [edit]


@pytest.mark.synapse
async def test_reaction_is_an_annotation(alice: Intent, human: Human, room: str) -> None:
    target = await alice.send_text(room, "react to me")

    reaction = await alice.send_reaction(room, target, "👍")

    event = await human.event(room, reaction)
    assert event["type"] == "m.reaction"
    assert event["content"]["m.relates_to"] == {
        "rel_type": "m.annotation",
        "event_id": target,
        "key": "👍",
    }


@pytest.mark.synapse
async def test_redact_removes_the_content(alice: Intent, human: Human, room: str) -> None:
    target = await alice.send_text(room, "oops, a secret")

    redaction = await alice.redact(room, target, reason="secret")
    again = await alice.redact(room, target, reason="secret", txn_id=None)

    seen = await human.event(room, target)
    assert seen["content"] == {}
    assert seen["unsigned"]["redacted_because"]["event_id"] == redaction
    assert (await human.event(room, redaction))["content"].get("reason") == "secret"
    assert again != redaction  # outside a handler, each call is a new redaction


@pytest.mark.synapse
async def test_redact_with_the_same_txn_id_is_deduplicated(alice: Intent, room: str) -> None:
    target = await alice.send_text(room, "once")

    first = await alice.redact(room, target, txn_id="redact-1")
    again = await alice.redact(room, target, txn_id="redact-1")

    assert first == again


# -- ephemeral ---------------------------------------------------------------------


def _typing(room_sync: Any) -> list[str]:
    for event in room_sync.get("ephemeral", {}).get("events", []):
        if event["type"] == "m.typing":
            return list(event["content"]["user_ids"])
    return []


@pytest.mark.synapse
async def test_typing_on_and_off(alice: Intent, human: Human, room: str) -> None:
    await alice.set_typing(room, 30_000)
    typing, since = await human.room_sync(room)
    assert _typing(typing) == [alice.user_id]

    await alice.set_typing(room, False)
    stopped, _ = await human.room_sync(room, since)
    assert [e["content"] for e in stopped["ephemeral"]["events"]] == [{"user_ids": []}]


def _receipts(room_sync: Any) -> dict[str, Any]:
    for event in room_sync.get("ephemeral", {}).get("events", []):
        if event["type"] == "m.receipt":
            return dict(event["content"])
    return {}


async def _fully_read(client: HomeserverClient, user_id: str, room_id: str) -> Any:
    return await client.request(
        "GET",
        f"{CLIENT}/user/{q(user_id)}/rooms/{q(room_id)}/account_data/m.fully_read",
        user_id=user_id,
    )


@pytest.mark.synapse
async def test_mark_read_public_receipt_and_fully_read(
    alice: Intent, human: Human, room: str, client: HomeserverClient
) -> None:
    status, sent = await human.call(
        "PUT",
        f"{CLIENT}/rooms/{q(room)}/send/m.room.message/{uuid.uuid4().hex}",
        {"msgtype": "m.text", "body": "read me"},
    )
    assert status == 200
    event_id = sent["event_id"]

    await alice.mark_read(room, event_id)

    receipts = _receipts((await human.room_sync(room))[0])
    assert alice.user_id in receipts[event_id]["m.read"]
    assert await _fully_read(client, alice.user_id, room) == {"event_id": event_id}


@pytest.mark.synapse
async def test_mark_read_private_is_not_shown_to_others(
    alice: Intent, human: Human, room: str, client: HomeserverClient
) -> None:
    event_id = await alice.send_text(room, "mine")
    status, sent = await human.call(
        "PUT",
        f"{CLIENT}/rooms/{q(room)}/send/m.room.message/{uuid.uuid4().hex}",
        {"msgtype": "m.text", "body": "theirs"},
    )
    assert status == 200

    await alice.mark_read(room, sent["event_id"], private=True)

    receipts = _receipts((await human.room_sync(room))[0])
    readers = {
        user for per_event in receipts.values() for kind in per_event.values() for user in kind
    }
    assert alice.user_id not in readers
    assert await _fully_read(client, alice.user_id, room) == {"event_id": sent["event_id"]}
    # Alice's own sync does see its private receipt.
    own = await client.request(
        "GET", f"{CLIENT}/sync", query={"timeout": "0"}, user_id=alice.user_id
    )
    mine = _receipts(own["rooms"]["join"][room])
    assert alice.user_id in mine[sent["event_id"]]["m.read.private"]
    assert event_id


@pytest.mark.synapse
async def test_presence_is_seen_by_a_room_mate(alice: Intent, human: Human, room: str) -> None:
    await alice.set_presence("unavailable", "brb")

    status = await human.get(f"{CLIENT}/presence/{q(alice.user_id)}/status")
    assert status["presence"] == "unavailable"
    assert status["status_msg"] == "brb"

    await alice.set_presence("online")
    assert (await human.get(f"{CLIENT}/presence/{q(alice.user_id)}/status"))["presence"] == (
        "online"
    )


# -- membership --------------------------------------------------------------------


async def _membership(human: Human, room: str, user_id: str) -> Any:
    status, content = await human.state(room, "m.room.member", user_id)
    assert status == 200, content
    return content


@pytest.mark.synapse
async def test_kick_ban_unban(alice: Intent, make_puppet: Any, human: Human, room: str) -> None:
    bob: Intent = make_puppet("bob")
    await alice.invite(room, bob.user_id)
    await bob.join_room(room)

    await alice.kick(room, bob.user_id, reason="out")
    kicked = await _membership(human, room, bob.user_id)
    assert (kicked["membership"], kicked["reason"]) == ("leave", "out")

    await alice.ban(room, bob.user_id, reason="spam")
    banned = await _membership(human, room, bob.user_id)
    assert (banned["membership"], banned["reason"]) == ("ban", "spam")

    await alice.unban(room, bob.user_id)
    assert (await _membership(human, room, bob.user_id))["membership"] == "leave"
    await alice.invite(room, bob.user_id)  # banned people cannot be invited: the ban is gone
    assert await bob.join_room(room) == room


@pytest.mark.synapse
async def test_joined_members_and_members(
    alice: Intent, make_puppet: Any, human: Human, room: str
) -> None:
    carol: Intent = make_puppet("carol")
    await alice.set_displayname("Alice A.")
    await alice.set_avatar_url("mxc://test.local/alice")
    await alice.invite(room, carol.user_id)

    # Synapse copies a new profile into the rooms' member events in the background.
    for _ in range(50):
        seen = (await human.get(f"{CLIENT}/rooms/{q(room)}/joined_members"))["joined"]
        if seen[alice.user_id].get("avatar_url"):
            break
        await asyncio.sleep(0.1)

    joined = await alice.get_joined_members(room)
    members = await alice.get_members(room)
    invited = await alice.get_members(room, membership="invite")

    assert set(joined) == set(seen) == {alice.user_id, human.user_id}
    assert joined[alice.user_id].displayname == seen[alice.user_id]["display_name"] == "Alice A."
    assert joined[alice.user_id].avatar_url == "mxc://test.local/alice"
    assert members[carol.user_id].membership == "invite"
    assert members[human.user_id].membership == "join"
    assert list(invited) == [carol.user_id]


# -- state -------------------------------------------------------------------------


@pytest.mark.synapse
async def test_room_name_topic_avatar(alice: Intent, human: Human, room: str) -> None:
    await alice.set_room_name(room, "Tea")
    await alice.set_room_topic(room, "Mad hatters")
    await alice.set_room_avatar(room, "mxc://test.local/teapot")

    assert await human.state(room, "m.room.name") == (200, {"name": "Tea"})
    assert await human.state(room, "m.room.topic") == (200, {"topic": "Mad hatters"})
    assert await human.state(room, "m.room.avatar") == (200, {"url": "mxc://test.local/teapot"})
    with pytest.raises(InvalidMxc):
        await alice.set_room_avatar(room, "https://example.org/a.png")


@pytest.mark.synapse
async def test_get_state_event_and_state(alice: Intent, human: Human, room: str) -> None:
    status, _ = await human.call("PUT", f"{CLIENT}/rooms/{q(room)}/state/org.example.x/k", {"v": 2})
    assert status == 403  # the human has no power for custom state: alice sets it
    await alice.send_state(room, "org.example.x", {"v": 1}, "k")

    assert await alice.get_state_event(room, "org.example.x", "k") == {"v": 1}
    with pytest.raises(NotFound):
        await alice.get_state_event(room, "org.example.absent")
    state = await alice.get_state(room)
    seen = await human.get(f"{CLIENT}/rooms/{q(room)}/state")
    assert {(e.type, e.state_key, e.event_id) for e in state} == {
        (e["type"], e["state_key"], e["event_id"]) for e in seen
    }
    assert any(e.type == "m.room.create" for e in state)


@pytest.mark.synapse
async def test_power_levels_read_and_set(alice: Intent, human: Human, room: str) -> None:
    levels = await alice.get_power_levels(room)
    seen = (await human.state(room, "m.room.power_levels"))[1]

    create = await human.get(f"{CLIENT}/rooms/{q(room)}/state/m.room.create/", {"format": "event"})
    assert create["content"]["room_version"] == "12"  # creators have infinite power
    assert create["sender"] == alice.user_id
    assert alice.user_id not in seen.get("users", {})
    assert levels.user_level(alice.user_id) == math.inf
    assert levels.creators == {alice.user_id}
    assert levels.user_level(human.user_id) == seen.get("users_default", 0) == 0
    assert levels.event_level("m.room.name", state=True) == seen["events"]["m.room.name"]
    assert levels.event_level("org.example.custom", state=True) == seen["state_default"]
    assert levels.event_level("m.room.message") == seen["events_default"]

    await alice.set_power_level(room, human.user_id, 50)

    after = (await human.state(room, "m.room.power_levels"))[1]
    assert after["users"][human.user_id] == 50
    assert alice.user_id not in after["users"]
    assert {k: v for k, v in after.items() if k != "users"} == {
        k: v for k, v in seen.items() if k != "users"
    }


def test_power_levels_defaults_follow_the_spec() -> None:
    empty = PowerLevels()

    assert empty.user_level("@x:y") == 0
    assert empty.event_level("m.room.message") == 0
    assert empty.event_level("m.room.name", state=True) == 50
    assert (empty.ban, empty.kick, empty.redact, empty.invite) == (50, 50, 50, 0)
    custom = PowerLevels(users={"@a:y": 10}, users_default=5, events={"m.x": 7})
    assert (custom.user_level("@a:y"), custom.user_level("@b:y")) == (10, 5)
    assert custom.event_level("m.x") == custom.event_level("m.x", state=True) == 7


# -- aliases and directory ---------------------------------------------------------


@pytest.mark.synapse
async def test_alias_create_resolve_delete(
    alice: Intent, human: Human, room: str, synapse: TestHomeserver, unique: str
) -> None:
    alias = f"#_bk_alias_{unique}:{synapse.server_name}"

    await alice.create_alias(alias, room)
    await alice.create_alias(alias, room)  # done already: no error

    seen = await human.get(f"{CLIENT}/directory/room/{q(alias)}")
    assert seen["room_id"] == room
    resolved = await alice.resolve_alias(alias)
    assert (resolved.room_id, resolved.servers) == (room, seen["servers"])

    await alice.delete_alias(alias)
    status, _ = await human.call("GET", f"{CLIENT}/directory/room/{q(alias)}")
    assert status == 404
    with pytest.raises(NotFound):
        await alice.resolve_alias(alias)


@pytest.mark.synapse
async def test_directory_visibility(alice: Intent, human: Human, room: str) -> None:
    path = f"{CLIENT}/directory/list/room/{q(room)}"
    assert (await human.get(path))["visibility"] == "private"

    await alice.set_room_directory_visibility(room, "public")
    assert (await human.get(path))["visibility"] == "public"

    await alice.set_room_directory_visibility(room, "private")
    assert (await human.get(path))["visibility"] == "private"


# -- account data and tags (the puppet's own, read back by plain requests) --------


@pytest.mark.synapse
async def test_account_data_global_and_per_room(
    alice: Intent, room: str, client: HomeserverClient
) -> None:
    user = f"{CLIENT}/user/{q(alice.user_id)}"
    with pytest.raises(NotFound):
        await alice.get_account_data("org.example.settings")

    await alice.set_account_data("org.example.settings", {"theme": "dark"})
    await alice.set_account_data("org.example.room", {"muted": True}, room_id=room)

    assert await client.request(
        "GET", f"{user}/account_data/org.example.settings", user_id=alice.user_id
    ) == {"theme": "dark"}
    assert await client.request(
        "GET", f"{user}/rooms/{q(room)}/account_data/org.example.room", user_id=alice.user_id
    ) == {"muted": True}
    assert await alice.get_account_data("org.example.settings") == {"theme": "dark"}
    assert await alice.get_account_data("org.example.room", room_id=room) == {"muted": True}


@pytest.mark.synapse
async def test_room_tags(alice: Intent, room: str, client: HomeserverClient) -> None:
    tags_path = f"{CLIENT}/user/{q(alice.user_id)}/rooms/{q(room)}/tags"

    await alice.set_room_tag(room, "m.favourite", 0.25)
    await alice.set_room_tag(room, "u.work")

    tags = await client.request("GET", tags_path, user_id=alice.user_id)
    assert tags["tags"] == {"m.favourite": {"order": 0.25}, "u.work": {}}

    await alice.remove_room_tag(room, "m.favourite")
    tags = await client.request("GET", tags_path, user_id=alice.user_id)
    assert tags["tags"] == {"u.work": {}}


# -- media -------------------------------------------------------------------------

MB = 1024 * 1024


async def _human_download(human: Human, mxc: str) -> bytes:
    server, media_id = mxc.removeprefix("mxc://").split("/")
    status, body = await human.call(
        "GET", f"/_matrix/client/v1/media/download/{q(server)}/{q(media_id)}"
    )
    assert status == 200
    assert isinstance(body, bytes)
    return body


@pytest.mark.synapse
async def test_upload_bytes_and_download(alice: Intent, human: Human) -> None:
    data = os.urandom(100_000)

    mxc = await alice.upload_media(data, "application/octet-stream", "blob.bin")

    assert mxc.startswith("mxc://test.local/")
    assert await _human_download(human, mxc) == data
    assert await alice.download_media(mxc) == data


@pytest.mark.synapse
async def test_upload_of_20_mb_from_a_file_is_streamed(
    alice: Intent, human: Human, tmp_path: Path
) -> None:
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(20):
            chunk = os.urandom(MB)
            digest.update(chunk)
            file.write(chunk)
    await alice.media_config()  # fetched (and cached) outside the measurement

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        mxc = await alice.upload_media(path, "application/octet-stream", "big.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak - before < 5 * MB, f"upload held {(peak - before) / MB:.1f} MB"
    streamed = hashlib.sha256()
    size = 0
    async for chunk in alice.download_media_stream(mxc):
        streamed.update(chunk)
        size += len(chunk)
    assert size == 20 * MB
    assert streamed.hexdigest() == digest.hexdigest()
    assert hashlib.sha256(await _human_download(human, mxc)).hexdigest() == digest.hexdigest()


async def _chunks(data: bytes, size: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.synapse
async def test_upload_from_an_iterable_with_and_without_size(alice: Intent, human: Human) -> None:
    data = os.urandom(123_456)

    sized = await alice.upload_media(_chunks(data), "application/octet-stream", size=len(data))
    spooled = await alice.upload_media(_chunks(data), "image/png", "x.png")

    assert await _human_download(human, sized) == data
    assert await _human_download(human, spooled) == data


@pytest.mark.synapse
async def test_upload_over_the_limit_is_refused_before_sending(
    alice: Intent, client: HomeserverClient, tmp_path: Path
) -> None:
    limit = (await alice.media_config()).upload_size
    assert limit is not None  # Synapse states one (max_upload_size, 50M by default)
    recorder = Recorder()
    client.observers.append(recorder)
    path = tmp_path / "huge.bin"
    with path.open("wb") as file:
        file.truncate(limit + 1)  # sparse: nothing is written

    with pytest.raises(MediaTooLarge, match=str(limit)):
        await alice.upload_media(path, "application/octet-stream")
    with pytest.raises(MediaTooLarge):
        await alice.upload_media(_chunks(b"x" * (limit + 1), MB), "application/octet-stream")

    assert recorder.endpoints == []


@pytest.mark.synapse
async def test_send_image_and_file(alice: Intent, human: Human, room: str) -> None:
    image = await alice.upload_media(b"\x89PNG fake", "image/png", "cat.png")
    info = MediaInfo(mimetype="image/png", size=10, w=4, h=3)

    image_id = await alice.send_image(room, image, info, filename="cat.png")
    file_id = await alice.send_file(
        room, image, {"mimetype": "application/pdf", "size": 10}, body="the report"
    )

    assert (await human.event(room, image_id))["content"] == {
        "msgtype": "m.image",
        "body": "cat.png",
        "url": image,
        "info": {"mimetype": "image/png", "size": 10, "w": 4, "h": 3},
    }
    assert (await human.event(room, file_id))["content"] == {
        "msgtype": "m.file",
        "body": "the report",
        "url": image,
        "info": {"mimetype": "application/pdf", "size": 10},
    }
    with pytest.raises(InvalidMxc):
        await alice.send_image(room, "mxc://nomediaid", info)


# -- resend rules of raw bodies (a local fake: Synapse will not 429 on demand) -----

UPLOAD_PATH = "/_matrix/media/v3/upload"


class FlakyUpload:
    """Answers the first ``failures`` uploads with 429 (or 503), then 200; records bodies."""

    def __init__(self, failures: list[int]) -> None:
        self.failures = list(failures)
        self.bodies: list[bytes] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        if self.failures:
            status = self.failures.pop(0)
            errcode = "M_LIMIT_EXCEEDED" if status == 429 else "M_UNKNOWN"
            body = {"errcode": errcode, "error": "again", "retry_after_ms": 1}
            return web.json_response(body, status=status)
        return web.json_response({"content_uri": "mxc://fake/1"})


@contextlib.asynccontextmanager
async def flaky_upload(*failures: int) -> AsyncIterator[tuple[FlakyUpload, HomeserverClient]]:
    fake = FlakyUpload(list(failures))
    app = web.Application()
    app.router.add_post(UPLOAD_PATH, fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    retry = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002)
    try:
        async with HomeserverClient(f"http://127.0.0.1:{port}", "t", retry=retry) as client:
            yield fake, client
    finally:
        await runner.cleanup()


async def test_a_file_upload_is_sent_again_whole_after_a_429_and_a_503(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(300_000))
    async with flaky_upload(429, 503) as (fake, client):
        reply = await client.request_raw(
            "POST", UPLOAD_PATH, data=path, content_type="application/octet-stream"
        )

    assert reply == {"content_uri": "mxc://fake/1"}
    assert fake.bodies == [path.read_bytes()] * 3


async def test_an_iterable_upload_is_never_sent_twice() -> None:
    data = os.urandom(50_000)
    async with flaky_upload(429) as (fake, client):
        with pytest.raises(LimitExceeded):
            await client.request_raw(
                "POST",
                UPLOAD_PATH,
                data=_chunks(data),
                content_type="application/octet-stream",
                size=len(data),
            )

    assert fake.bodies == [data]
