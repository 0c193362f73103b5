"""Strings from the homeserver or a user that a database may refuse: NUL and lone
surrogates, on every backend (issue 10, defect 5)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge_kit.inbox.records import Acceptance, ItemKind, NewDeadLetter, NewInboxItem, Parking
from bridge_kit.server.appservice_api import create_app
from bridge_kit.store import Store, open_store
from bridge_kit.types.events import Event
from tests.test_store import backend_url, emptied

HS_TOKEN = "hs-token-strings"
AUTH = {"Authorization": f"Bearer {HS_TOKEN}"}
TXN = "/_matrix/app/v1/transactions"
#: JSON escapes: a str with a lone surrogate, a NUL, and both in one room ID.
SURROGATE, NUL = "\\ud800", "\\u0000"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(backend)) as opened:
        yield opened


@pytest.fixture
async def client(store: Store) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(create_app(hs_token=HS_TOKEN, store=store))) as test_client:
        yield test_client


def event_json(escape: str, *, ts: str = "1", room: str | None = None) -> str:
    """An event with ``escape`` in its type, event ID, body and (unless ``room`` says
    otherwise) room ID."""
    room = escape if room is None else room
    return (
        f'{{"type": "m.room.message{escape}", "room_id": "!room{room}:test.local",'
        f' "event_id": "$e{escape}", "sender": "@a:test.local", "origin_server_ts": {ts},'
        f' "content": {{"body": "x{escape}y"}}}}'
    )


@pytest.mark.parametrize("path", [f"{TXN}/%00x", f"{TXN}/%ED%A0%80x", f"{TXN}/a%C3%A9"])
async def test_any_txn_id_is_accepted_once(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    for _ in range(2):
        response = await client.put(path, json={"events": []}, headers=AUTH)
        assert response.status == 200


@pytest.mark.parametrize("escape", [SURROGATE, NUL], ids=["surrogate", "nul"])
async def test_an_event_with_such_strings_is_stored_and_handed_over_unchanged(
    store: Store, client: TestClient[web.Request, web.Application], escape: str
) -> None:
    # A room ID with a lone surrogate is no room ID: that event is a dead letter (below).
    raw = event_json(escape, room="" if escape == SURROGATE else escape)
    response = await client.put(f"{TXN}/t1", data=f'{{"events": [{raw}]}}', headers=AUTH)
    assert response.status == 200
    [lane] = await store.claim_lanes("owner", 30, 10)
    [item] = await store.lane_items(lane, 10)
    # The event a handler gets is the one sent, escapes and all.
    assert json.loads(item.event_json) == json.loads(raw)
    assert await store.renew_lanes("owner", [lane], 30) == {lane}
    await store.release_lane("owner", lane)


@pytest.mark.parametrize(
    ("escape", "ts", "why"),
    [
        (SURROGATE, "1.5", "expected an integer"),
        (NUL, "1.5", "expected an integer"),
        (SURROGATE, "1", "room_id is not Unicode"),
    ],
    ids=["surrogate", "nul", "surrogate-room"],
)
async def test_an_invalid_event_with_such_strings_becomes_a_dead_letter(
    store: Store,
    client: TestClient[web.Request, web.Application],
    escape: str,
    ts: str,
    why: str,
) -> None:
    raw = event_json(escape, ts=ts)
    response = await client.put(f"{TXN}/t2", data=f'{{"events": [{raw}]}}', headers=AUTH)
    assert response.status == 200
    [letter] = await store.dead_letters()
    assert json.loads(letter.event_json) == json.loads(raw)
    assert why in letter.error


async def test_a_handler_failure_with_such_strings_is_buried(store: Store) -> None:
    event = event_json(SURROGATE)
    lane_given = "!room\ud800\x00:test.local"
    # ensure_ascii=False: the JSON text holds the lone surrogate itself, not its escape.
    text = json.dumps(json.loads(event), ensure_ascii=False)
    assert await store.accept_transaction("t3", [NewInboxItem(lane_given, ItemKind.EVENT, text)])
    [lane] = await store.claim_lanes("owner\x00\ud800", 30, 10, exclude=["\ud800"])
    [item] = await store.lane_items(lane, 10)
    await store.fail_item(item.id, ["handler\ud800"], 0.0)
    letter = NewDeadLetter(
        lane=lane,
        kind=ItemKind.EVENT,
        event_json=item.event_json,
        error="Traceback: bad \ud800 and \x00",
        handler="module.handler\ud800",
        attempts=2,
        event_id="$e\ud800",
        event_type="m.room.message\x00",
    )
    await store.bury_item(item.id, letter)
    [buried] = await store.dead_letters()
    assert buried.attempts == 2 and "Traceback: bad" in buried.error
    assert json.loads(buried.event_json) == json.loads(event)


@pytest.mark.parametrize("bad", ["@a\x00:test.local", "@a\ud800:test.local"])
async def test_a_user_id_no_store_can_hold_is_refused_the_same_everywhere(
    store: Store, bad: str
) -> None:
    with pytest.raises(ValueError, match="not a user ID a store can hold"):
        await store.mark_registered(["@ok:test.local", bad])
    assert await store.registered_among([bad, "@ok:test.local"]) == set()
    await store.forget_registered([bad])
    await store.mark_registered(["@ok:test.local"])
    assert await store.registered_among([bad, "@ok:test.local"]) == {"@ok:test.local"}


#: NUL and a lone surrogate in one string: what a JSON escape hands the store.
HOSTILE = "a\x00b\ud800c"


async def stored_values(store: Store) -> dict[str, object]:
    """What ``store`` gives back after hostile input went into each of its concerns
    (ids and times left out: they differ by nature)."""
    raw_event = json.dumps({"type": "m.room.message", "content": {"body": HOSTILE}})
    letter = NewDeadLetter(
        lane=HOSTILE,
        kind=ItemKind.EVENT,
        event_json=raw_event,
        error=HOSTILE,
        handler=HOSTILE,
        event_id=HOSTILE,
        event_type=HOSTILE,
    )
    # ensure_ascii=False: the JSON text holds the characters themselves, not escapes.
    item_json = json.dumps({"body": HOSTILE}, ensure_ascii=False)
    await store.accept_transaction(
        "t", [NewInboxItem(HOSTILE, ItemKind.EVENT, item_json)], [letter]
    )
    [lane] = await store.claim_lanes(HOSTILE, 30, 10, exclude=[HOSTILE + "x"])
    [item] = await store.lane_items(HOSTILE, 10)
    await store.park_item(item.id, Parking(HOSTILE, HOSTILE, 1e12, 1.0))
    [parked] = await store.parked_items(key=HOSTILE)
    [dead] = await store.dead_letters()
    member = Event(
        type="m.room.member",
        content={"membership": HOSTILE, "displayname": HOSTILE, "avatar_url": HOSTILE},
        room_id=HOSTILE,
        sender=HOSTILE,
        state_key=HOSTILE,
        origin_server_ts=1,
    )
    topic = Event(
        type="m.room.topic",
        content={"topic": HOSTILE},
        room_id=HOSTILE,
        sender=HOSTILE,
        state_key="",
        origin_server_ts=1,
    )
    await store.apply_state(HOSTILE, [member, topic])
    await store.set_profile(HOSTILE, HOSTILE, HOSTILE)
    await store.remember_device("@a:test.local", "DEVICE", HOSTILE)
    with pytest.raises(ValueError, match="lone surrogate"):
        await store.crypto_put("@a:test.local", "kind", HOSTILE, b"v")
    # Any str is a txnId, each its own (no cleaning: two must not become one).
    txn = HOSTILE + "t"
    txns = [await store.accept_transaction(txn, []), await store.accept_transaction(txn, [])]
    await store.mark_transaction_done("\ud800")
    txns += [await store.is_transaction_done("\ud800"), await store.is_transaction_done("\ufffd")]
    return {
        "txns": txns,
        "lane": lane,
        "item": (item.lane, json.loads(item.event_json)),
        "parked": (parked.item.lane, parked.parking.key, parked.parking.reason),
        "dead": (dead.lane, dead.error, dead.handler, dead.event_id, dead.event_type),
        "dead event": json.loads(dead.event_json),
        "members": await store.members(HOSTILE, HOSTILE),
        "membership": await store.membership(HOSTILE, HOSTILE),
        "topic": await store.state_event(HOSTILE, "m.room.topic"),
        "profile": await store.profile(HOSTILE),
        "profiles": await store.profiles_among([HOSTILE]),
        "devices": await store.known_devices("@a:test.local"),
    }


async def test_the_same_hostile_input_is_stored_the_same_on_every_backend(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # One front cleans for every backend: none may store its own variant (issue 23).
    found = []
    for url in ("memory://", f"sqlite:///{tmp_path / 'drift.db'}", await emptied(postgres_dsn)):
        async with open_store(url) as store:
            found.append(await stored_values(store))
    assert found[0] == found[1] == found[2]
    assert found[0]["lane"] == "a\ufffdb\ufffdc"  # cleaned, not refused
    assert found[0]["txns"] == [Acceptance.NEW, Acceptance.DUPLICATE, True, False]
    assert found[0]["item"] == ("a\ufffdb\ufffdc", {"body": HOSTILE})  # the event unchanged
    assert found[0]["profile"] == {"a\ufffdb\ufffdc": "a\ufffdb\ufffdc"}
