"""Message send status on a real Synapse: a failed send is seen in the room."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bridge_kit import AppService
from bridge_kit.bridge.send_status import (
    MESSAGE_STATUS_EVENT,
    NoticeMode,
    SendStatus,
    SendStatusReporter,
    StatusReason,
)
from bridge_kit.config import AppServiceConfig, Config, HomeserverConfig
from bridge_kit.errors import InvalidInput, SendFailed, UnknownChat
from bridge_kit.store import MemoryStore
from tests.conftest import TestHomeserver, _running_homeserver

# A private Synapse (fixture ``hs``): -m "not synapse" leaves these out.
pytestmark = pytest.mark.synapse


@pytest.fixture(scope="module")
async def hs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    async with _running_homeserver(tmp_path_factory.mktemp("send-status")) as homeserver:
        yield homeserver


@pytest.fixture
async def app(hs: TestHomeserver, tmp_path: Path) -> AsyncIterator[AppService]:
    config = Config(
        homeserver=HomeserverConfig(url=hs.url),
        appservice=AppServiceConfig(
            registration=str(hs.registration_path),
            store=f"sqlite:///{tmp_path / 'bk.db'}",
            port=hs.appservice_port,
        ),
    )
    async with AppService(config, store=MemoryStore()) as running:
        yield running


class Room:
    """A room of the bridge bot's with a real user in it, who sent one message."""

    def __init__(self, hs: TestHomeserver, room_id: str, token: str, event_id: str) -> None:
        self.hs, self.room_id, self.token, self.event_id = hs, room_id, token, event_id

    async def events(self) -> list[dict[str, Any]]:
        """The room's events after the user's message, as the user sees them."""
        url = f"{self.hs.url}/_matrix/client/v3/rooms/{quote(self.room_id)}/messages"
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.hs.http.get(url, params={"dir": "b", "limit": "50"}, headers=headers) as r:
            chunk: list[dict[str, Any]] = (await r.json())["chunk"]
        after = []
        for event in chunk:  # newest first
            if event["event_id"] == self.event_id:
                break
            after.append(event)
        return after[::-1]

    def statuses(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e["content"] for e in events if e["type"] == MESSAGE_STATUS_EVENT]

    def notices(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e["content"] for e in events if e["content"].get("msgtype") == "m.notice"]


@pytest.fixture
async def room(app: AppService, hs: TestHomeserver, unique: str) -> Room:
    token = await hs.create_user(f"mss{unique}")
    user_id = f"@mss{unique}:test.local"
    room_id = await app.bot.create_room(invite=[user_id])
    headers = {"Authorization": f"Bearer {token}"}
    async with hs.http.post(
        f"{hs.url}/_matrix/client/v3/join/{quote(room_id)}", json={}, headers=headers
    ) as resp:
        assert resp.status == 200
    url = f"{hs.url}/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/t{unique}"
    body = {"msgtype": "m.text", "body": "hello remote side"}
    async with hs.http.put(url, json=body, headers=headers) as resp:
        event_id: str = (await resp.json())["event_id"]
    return Room(hs, room_id, token, event_id)


async def no_wait(_: float) -> None:
    return None


async def test_a_permanent_failure_is_told_with_status_and_notice(
    app: AppService, room: Room
) -> None:
    reporter = SendStatusReporter(app.bot, "flownet", sleep=no_wait)
    calls = 0

    async def send() -> str:
        nonlocal calls
        calls += 1
        raise SendFailed("the channel is moderated", reason=StatusReason.NO_PERMISSION)

    outcome, result = await reporter.deliver(room.room_id, room.event_id, send)
    assert (outcome.status, outcome.attempts, result, calls) == (
        SendStatus.FAIL_PERMANENT,
        1,
        None,
        1,
    )
    events = await room.events()
    assert room.statuses(events) == [
        {
            "network": "flownet",
            "m.relates_to": {"rel_type": "m.reference", "event_id": room.event_id},
            "status": "FAIL_PERMANENT",
            "reason": "m.no_permission",
            "message": "the channel is moderated",
        }
    ]
    (notice,) = room.notices(events)
    assert notice["body"].endswith("Your message was not bridged: the channel is moderated")
    assert notice["m.relates_to"]["m.in_reply_to"]["event_id"] == room.event_id


async def test_a_transient_failure_is_retried_then_cleared(app: AppService, room: Room) -> None:
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)

    reporter = SendStatusReporter(app.bot, "flownet", retries=3, backoff=0.5, sleep=record_wait)
    failures = [ConnectionResetError("peer reset"), TimeoutError()]

    async def send() -> str:
        if failures:
            raise failures.pop(0)
        return "remote-42"

    outcome, result = await reporter.deliver(room.room_id, room.event_id, send)
    assert (outcome.status, outcome.attempts, result) == (SendStatus.SUCCESS, 3, "remote-42")
    assert waits == [0.5, 1.0]
    events = await room.events()
    assert [s["status"] for s in room.statuses(events)] == ["PENDING", "SUCCESS"]
    assert room.notices(events) == []


async def test_a_failure_that_stays_transient_ends_retriable(app: AppService, room: Room) -> None:
    reporter = SendStatusReporter(app.bot, "flownet", retries=1, sleep=no_wait)

    async def send() -> None:
        raise ConnectionRefusedError("network down")

    outcome, _ = await reporter.deliver(room.room_id, room.event_id, send)
    assert (outcome.status, outcome.attempts) == (SendStatus.FAIL_RETRIABLE, 2)
    events = await room.events()
    assert [s["status"] for s in room.statuses(events)] == ["PENDING", "FAIL_RETRIABLE"]
    (notice,) = room.notices(events)
    assert "may not have been bridged: network down" in notice["body"]


async def test_a_refusal_by_the_network_is_permanent_and_not_retried(
    app: AppService, room: Room
) -> None:
    reporter = SendStatusReporter(app.bot, "flownet", retries=3, sleep=no_wait)
    tries: list[int] = []

    async def send() -> None:
        tries.append(1)
        raise UnknownChat("no such channel #gone")

    outcome, _ = await reporter.deliver(room.room_id, room.event_id, send)
    assert (outcome.status, outcome.attempts, len(tries)) == (SendStatus.FAIL_PERMANENT, 1, 1)
    events = await room.events()
    assert [s["status"] for s in room.statuses(events)] == ["FAIL_PERMANENT"]


async def test_notice_mode_sends_only_the_notice_and_off_sends_nothing(
    app: AppService, room: Room
) -> None:
    async def refused() -> None:
        raise InvalidInput("stickers do not exist on FlowNet")

    notice_only = SendStatusReporter(app.bot, "flownet", mode=NoticeMode.NOTICE)
    outcome, _ = await notice_only.deliver(room.room_id, room.event_id, refused, what="sticker")
    assert outcome.status is SendStatus.FAIL_PERMANENT
    silent = SendStatusReporter(app.bot, "flownet", mode=NoticeMode.OFF)
    await silent.deliver(room.room_id, room.event_id, refused)
    events = await room.events()
    assert room.statuses(events) == []
    (notice,) = room.notices(events)
    assert "Your sticker was not bridged: stickers do not exist on FlowNet" in notice["body"]


async def test_a_bug_in_the_connector_is_not_retried_nor_shown(app: AppService, room: Room) -> None:
    reporter = SendStatusReporter(app.bot, "flownet", sleep=no_wait)

    async def buggy() -> None:
        raise KeyError("secret internals")

    outcome, _ = await reporter.deliver(room.room_id, room.event_id, buggy)
    assert (outcome.status, outcome.attempts) == (SendStatus.FAIL_PERMANENT, 1)
    (notice,) = room.notices(await room.events())
    assert "secret" not in notice["body"] and "internal error" in notice["body"]
