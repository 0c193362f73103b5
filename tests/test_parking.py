"""Parked inbox items (bridge_kit.inbox.parking) against real stores, no homeserver.

A preprocessor stands in for the decryptor: an event whose content names a
``wait`` key raises :class:`Park` until the test opens that key, as a room key
arriving would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit.inbox.lanes import Inbox, InboxSettings
from bridge_kit.inbox.records import InboxItem, ItemKind, NewDeadLetter, Parking
from bridge_kit.inbox.signals import Park
from bridge_kit.metrics import Metrics
from bridge_kit.store import PostgresStore, SQLiteStore, Store, open_store
from bridge_kit.types import Event
from tests.test_inbox import (
    APPSERVICE,
    SETTINGS,
    A,
    B,
    C,
    accept,
    drained,
    message,
    metric,
    route_to,
    stop,
    until,
    until_store,
)
from tests.test_store import backend_url, emptied, run_sql

KEY = "megolm|!a:test.local|SESSION|@someone:test.local"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def any_store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def waiting(name: str, key: str, room: str = A, n: int = 0) -> dict[str, Any]:
    """A message that cannot be handled before ``key`` is opened."""
    event = message(name, room, n)
    event["content"]["wait"] = key
    return event


class Gate:
    """The preprocessor: parks an event until its ``wait`` key is opened."""

    def __init__(self, give_up_after: float = 60.0, recheck_opens: bool = False) -> None:
        self.opened: set[str] = set()
        self.give_up_after = give_up_after
        self.recheck_opens = recheck_opens
        self.parked: list[str] = []

    async def __call__(self, event: Event, record: InboxItem) -> Event:
        key = event.content.get("wait")
        if not isinstance(key, str) or key in self.opened:
            return event
        self.parked.append(event.content["body"])
        raise Park(
            key,
            give_up_after=self.give_up_after,
            reason="no room key",
            recheck=self._recheck(key) if self.recheck_opens else None,
        )

    def _recheck(self, key: str) -> Any:
        async def recheck() -> bool:
            # What the item waited for came while it was being parked.
            self.opened.add(key)
            return True

        return recheck


class Handled:
    """A handler that records the bodies it saw, in order."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.bodies: list[str] = []
        self.by: list[tuple[str, str]] = []

    async def __call__(self, event: Event) -> None:
        self.bodies.append(event.content["body"])
        self.by.append((self.tag, event.content["body"]))


def parking_inbox(
    store: Store,
    gate: Gate,
    handled: Handled,
    settings: InboxSettings = SETTINGS,
    metrics: Metrics | None = None,
) -> Inbox:
    inbox = Inbox(store, route_to(handled), appservice_id=APPSERVICE, settings=settings,
                  metrics=metrics)  # fmt: skip
    inbox.add_preprocessor(ItemKind.EVENT, gate)
    return inbox


async def parked_count(store: Store, key: str | None = None) -> int:
    return len(await store.parked_items(key=key))


# -- the lane goes on ---------------------------------------------------------------------


async def test_a_parked_event_does_not_hold_up_its_room(any_store: Store) -> None:
    """Events behind one waiting for a key are handled at once; when the key comes the
    parked ones are handled, after the room's later events, in their own order."""
    gate, handled = Gate(), Handled()
    inbox = parking_inbox(any_store, gate, handled)
    await accept(
        any_store,
        "t1",
        [
            waiting("w1", KEY, n=1),
            message("m2", n=2),
            waiting("w3", KEY, n=3),
            message("m4", n=4),
            waiting("other", "another key", room=B, n=5),
        ],
    )
    await inbox.start()
    try:
        await until(lambda: handled.bodies == ["m2", "m4"])
        await drained(any_store)
        assert await parked_count(any_store, KEY) == 2
        assert await parked_count(any_store) == 3
        assert await any_store.count_parked() == 3
        assert not await any_store.dead_letters()
        gate.opened.add(KEY)
        assert await inbox.unpark(KEY) == 2
        await until(lambda: handled.bodies == ["m2", "m4", "w1", "w3"])
        await drained(any_store)
        assert await parked_count(any_store, KEY) == 0
        assert await parked_count(any_store) == 1  # still waiting for its own key
        assert await inbox.unpark(KEY) == 0
    finally:
        await stop(inbox)


async def test_a_key_released_while_its_event_is_parked_is_not_missed(any_store: Store) -> None:
    """``recheck`` covers a key that came between the failed try and the parking."""
    gate, handled = Gate(recheck_opens=True), Handled()
    inbox = parking_inbox(any_store, gate, handled)
    await accept(any_store, "t1", [waiting("w1", KEY), message("m2", n=2)])
    await inbox.start()
    try:
        await until(lambda: sorted(handled.bodies) == ["m2", "w1"])
        assert gate.parked == ["w1"]
        await drained(any_store)
        assert await parked_count(any_store) == 0
    finally:
        await stop(inbox)


# -- giving up ------------------------------------------------------------------------------


async def test_a_parked_event_becomes_a_dead_letter_without_new_events(any_store: Store) -> None:
    """The wait runs out with no further transaction; the letter replays, and waits
    (parked) again from the start."""
    gate, handled, metrics = Gate(give_up_after=0.5), Handled(), Metrics()
    inbox = parking_inbox(any_store, gate, handled, metrics=metrics)
    await accept(any_store, "t1", [waiting("w1", KEY)])
    await inbox.start()
    try:

        async def buried() -> bool:
            return len(await any_store.dead_letters()) == 1

        await until_store(buried)
        (letter,) = await any_store.dead_letters()
        assert letter.error == "no room key"
        assert letter.event_id == "$w1"
        assert letter.last_failed_at - letter.first_failed_at >= 0.5
        assert await parked_count(any_store) == 0
        # Counted after the commit that the store read above may have seen first.
        await until(
            lambda: metric(metrics, "bridge_kit_dead_lettered_total", reason="not_ready") == 1
        )
        assert handled.bodies == []

        assert await any_store.replay_dead_letters() == 1
        inbox.wake()
        await until(lambda: gate.parked == ["w1", "w1"])

        async def parked_again() -> bool:
            return await parked_count(any_store, KEY) == 1

        await until_store(parked_again)
        gate.opened.add(KEY)
        assert await inbox.unpark(KEY) == 1
        await until(lambda: handled.bodies == ["w1"])
    finally:
        await stop(inbox)


async def test_give_up_parked_buries_at_once_with_the_reason(any_store: Store) -> None:
    gate, handled, metrics = Gate(), Handled(), Metrics()
    inbox = parking_inbox(any_store, gate, handled, metrics=metrics)
    await accept(
        any_store, "t1", [waiting("w1", KEY), waiting("w2", KEY, n=2), waiting("x", "other")]
    )
    await inbox.start()
    try:

        async def all_parked() -> bool:
            return await parked_count(any_store) == 3

        await until_store(all_parked)
        # The gauges are read from the store about once a second.
        await until(lambda: metric(metrics, "bridge_kit_parked_events") == 3)
        assert inbox.parked_events == 3
        reason = "the room key was withheld: m.unverified (not verified)"
        assert await inbox.give_up_parked(KEY, reason) == 2
        letters = await any_store.dead_letters()
        assert [(letter.event_id, letter.error) for letter in letters] == [
            ("$w1", reason),
            ("$w2", reason),
        ]
        assert await parked_count(any_store) == 1
        await until(lambda: metric(metrics, "bridge_kit_parked_events") == 1)
        assert await inbox.give_up_parked(KEY, reason) == 0
        assert metric(metrics, "bridge_kit_dead_lettered_total", reason="not_ready") == 2
        assert handled.bodies == []
    finally:
        await stop(inbox)


# -- durability and two processes -----------------------------------------------------------


async def test_parked_items_and_their_progress_survive_a_restart(durable_backend: str) -> None:
    """Parked by the second handler (the first had run): after a restart the item is
    still parked; unparked, only the second handler runs."""
    url = await emptied(durable_backend)
    runs: list[str] = []
    opened: set[str] = set()

    async def first(event: Event) -> None:
        runs.append("first " + event.content["body"])

    async def second(event: Event) -> None:
        if event.content["body"] == "w1" and KEY not in opened:
            raise Park(KEY, give_up_after=60, reason="no room key")
        runs.append("second " + event.content["body"])

    async with open_store(url) as store:
        inbox = Inbox(store, route_to(first, second), appservice_id=APPSERVICE, settings=SETTINGS)
        await accept(store, "t1", [waiting("w1", KEY), message("m2", n=2)])
        await inbox.start()
        await until(lambda: runs == ["first w1", "first m2", "second m2"])
        await drained(store)
        await stop(inbox)
    async with open_store(url) as store:
        (parked,) = await store.parked_items()
        assert parked.parking.key == KEY
        assert parked.parking.done_handlers == (f"{__name__}.{first.__qualname__}",)
        inbox = Inbox(store, route_to(first, second), appservice_id=APPSERVICE, settings=SETTINGS)
        await inbox.start()
        try:
            opened.add(KEY)
            assert await inbox.unpark(KEY) == 1
            await until(lambda: runs[3:] == ["second w1"])
            await drained(store)
        finally:
            await stop(inbox)
    assert runs == ["first w1", "first m2", "second m2", "second w1"]


async def test_two_daemons_on_postgresql_handle_an_unparked_event_once(postgres_dsn: str) -> None:
    """Both processes unpark the same key at once; each event is handled by one of them."""
    url = await emptied(postgres_dsn)
    rooms = (A, B, C)
    async with open_store(url) as one, open_store(url) as two:
        gate_one, gate_two = Gate(), Gate()
        handled_one, handled_two = Handled("one"), Handled("two")
        events = [waiting(f"w{n}", KEY, room=rooms[n % 3], n=n) for n in range(30)]
        await accept(one, "t1", [*events, message("plain", n=99)])
        inboxes = (
            parking_inbox(one, gate_one, handled_one),
            parking_inbox(two, gate_two, handled_two),
        )
        for inbox in inboxes:
            await inbox.start()
        try:

            async def all_parked() -> bool:
                return await parked_count(one, KEY) == 30

            await until_store(all_parked)
            gate_one.opened.add(KEY)
            gate_two.opened.add(KEY)
            released = await asyncio.gather(*(inbox.unpark(KEY) for inbox in inboxes))
            assert sorted(released) == [0, 30]
            everything = {f"w{n}" for n in range(30)} | {"plain"}
            await until(lambda: {*handled_one.bodies, *handled_two.bodies} == everything)
            await drained(one)
            assert sorted(handled_one.bodies + handled_two.bodies) == sorted(everything)
            assert len(handled_one.bodies) + len(handled_two.bodies) == len(everything)
        finally:
            for inbox in inboxes:
                await stop(inbox)


async def test_two_daemons_on_postgresql_bury_a_parked_event_once(postgres_dsn: str) -> None:
    """Both give up on (or time out) the same parked items at once: one letter each."""
    url = await emptied(postgres_dsn)
    async with open_store(url) as one, open_store(url) as two:
        await accept(one, "t1", [message(f"m{n}", n=n) for n in range(20)])
        parking = Parking(KEY, "no room key", time.time() - 1, time.time() - 2)
        for item in await one.lane_items(A, 100):
            assert await one.park_item(item.id, parking)
        metrics = Metrics(), Metrics()
        inboxes = [
            Inbox(store, route_to(), appservice_id=APPSERVICE, settings=SETTINGS, metrics=m)
            for store, m in zip((one, two), metrics, strict=True)
        ]
        buried = await asyncio.gather(*(inbox.parked.expire() for inbox in inboxes))
        assert sum(buried) == 20
        assert len(await one.dead_letters()) == 20
        counted = [metric(m, "bridge_kit_dead_lettered_total", reason="not_ready") for m in metrics]
        assert sum(counted) == 20
        assert await one.count_parked() == 0


# -- the store methods -------------------------------------------------------------------------


async def test_each_parked_item_moves_once(any_store: Store) -> None:
    await accept(any_store, "t1", [message("m1"), message("m2", n=2)])
    first, second = await any_store.lane_items(A, 10)
    parking = Parking(KEY, "no room key", time.time() + 60, time.time(), ("h",))
    assert await any_store.park_item(first.id, parking)
    assert not await any_store.park_item(first.id, parking)
    assert [item.id for item in await any_store.lane_items(A, 10)] == [second.id]
    (parked,) = await any_store.parked_items(key=KEY)
    assert parked.item.id == first.id
    assert parked.item.event_json == first.event_json
    assert parked.parking.reason == "no room key"
    assert await any_store.parked_items(key="nothing") == []
    assert await any_store.parked_items(due_by=time.time()) == []
    assert await any_store.parked_items(due_by=time.time() + 120) == [parked]
    letter = NewDeadLetter(A, ItemKind.EVENT, first.event_json, "gave up", event_id="$m1")
    assert await any_store.bury_parked(first.id, letter)
    assert not await any_store.bury_parked(first.id, letter)
    assert await any_store.unpark_items(KEY) == 0
    (buried,) = await any_store.dead_letters()
    assert buried.first_failed_at == parking.first_failed_at
    assert buried.error == "gave up"


async def test_unparked_items_go_to_the_end_of_their_lanes(any_store: Store) -> None:
    await accept(any_store, "t1", [message("m1"), message("m2", n=2), message("m3", n=3)])
    items = await any_store.lane_items(A, 10)
    first_failed = time.time() - 5
    for item in items[:2]:
        parking = Parking(KEY, "no room key", time.time() + 60, first_failed, ("done",))
        assert await any_store.park_item(item.id, parking)
    assert await any_store.unpark_items(KEY) == 2
    back = await any_store.lane_items(A, 10)
    assert [item.event_json for item in back] == [items[i].event_json for i in (2, 0, 1)]
    assert back[1].done_handlers == ("done",)
    assert back[1].first_failed_at == pytest.approx(first_failed)
    assert back[1].not_before <= time.time()
    assert await any_store.parked_items() == []


async def test_a_version_4_database_is_migrated_up_with_its_inbox(
    durable_backend: str,
) -> None:
    url = await emptied(durable_backend)
    cls = SQLiteStore if url.startswith("sqlite:") else PostgresStore
    v4 = [statement for step in cls.MIGRATIONS[:4] for statement in step]
    await run_sql(
        url,
        *v4,
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (4)",
        "INSERT INTO bridge_kit_inbox (lane, kind, event_json, received_at)"
        " VALUES ('!a:test.local', 'event', '{}', 1.0)",
    )
    async with open_store(url) as store:
        assert await store.schema_version() == cls.SCHEMA_VERSION
        (item,) = await store.lane_items(A, 10)
        parking = Parking(KEY, "no room key", time.time() + 60, time.time())
        assert await store.park_item(item.id, parking)
        assert len(await store.parked_items(key=KEY)) == 1
    assert await run_sql(url, "SELECT version FROM bridge_kit_schema") == [(cls.SCHEMA_VERSION,)]


async def test_an_item_whose_completion_is_committed_is_not_parked(any_store: Store) -> None:
    """A worker that lost its lane may park an item another worker handled meanwhile:
    the handled item stays handled (SQLite keeps it, marked done, until a checkpoint)."""
    await accept(any_store, "t1", [message("m1"), message("m2", n=2)])
    first, second = await any_store.lane_items(A, 10)
    await any_store.complete_items([first.id])
    parking = Parking(KEY, "no room key", time.time() + 60, time.time())
    assert not await any_store.park_item(first.id, parking)
    assert await any_store.parked_items() == []
    assert await any_store.unpark_items(KEY) == 0
    assert [item.id for item in await any_store.lane_items(A, 10)] == [second.id]
