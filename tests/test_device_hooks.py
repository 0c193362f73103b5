"""To-device events, device lists and one-time-key counts through the durable inbox,
and the inbox's preprocessor seam (NotReady), against real stores; no homeserver.

The transactions go in as the route puts them (``TransactionProcessor``); the handlers
are chosen by a real :class:`HandlerRegistry`, as an AppService's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from bridge_kit.inbox.dead_letters import DeadLetters
from bridge_kit.inbox.device_items import count_device_items, split_device_items
from bridge_kit.inbox.handlers import HandlerRegistry
from bridge_kit.inbox.lanes import Inbox, InboxSettings, handler_name
from bridge_kit.inbox.records import InboxItem, ItemKind
from bridge_kit.inbox.signals import ErrorReply, NotReady
from bridge_kit.inbox.transactions import TransactionProcessor, split_transaction
from bridge_kit.metrics import Metrics
from bridge_kit.store import Store, open_store
from bridge_kit.types import DeviceListUpdate, Event, OtkCounts, ToDeviceEvent
from tests.test_inbox import drained, message, metric, stop, until, until_store
from tests.test_store import backend_url, emptied

ALICE, BOB = "@alice:test.local", "@_bk_bob:test.local"
SETTINGS = InboxSettings(
    concurrency=8, attempts=3, backoff=0.05, backoff_max=0.2, timeout=0.5, lease=1.0, poll=0.05
)


@pytest.fixture(params=["memory", "sqlite"])
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


# Synchronous, as in test_store: the PostgreSQL fixture is looked up outside the loop.
@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(local_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(local_backend)) as opened:
        yield opened


@pytest.fixture
async def any_store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def to_device(
    n: int, device: str = "DEV1", user: str = BOB, type_: str = "m.test"
) -> dict[str, Any]:
    return {
        "type": type_,
        "sender": ALICE,
        "content": {"n": n},
        "to_user_id": user,
        "to_device_id": device,
    }


# A transaction as Synapse 1.163 sends it: only unstable names, both key-count spellings.
SYNAPSE_BODY: dict[str, Any] = {
    "events": [],
    "de.sorunome.msc2409.to_device": [to_device(1), to_device(2, "DEV2"), to_device(3)],
    "org.matrix.msc3202.device_lists": {"changed": [ALICE], "left": ["@carol:test.local"]},
    "org.matrix.msc3202.device_one_time_key_counts": {
        BOB: {"DEV1": {"signed_curve25519": 50}, "DEV2": {"signed_curve25519": 0}}
    },
    "org.matrix.msc3202.device_one_time_keys_count": {
        BOB: {"DEV1": {"signed_curve25519": 50}, "DEV2": {"signed_curve25519": 0}}
    },
    "org.matrix.msc3202.device_unused_fallback_key_types": {
        BOB: {"DEV1": ["signed_curve25519"], "DEV3": []}
    },
}


def lanes_of(body: dict[str, Any]) -> dict[str, list[tuple[ItemKind, Any]]]:
    items, rejected = split_transaction(body)
    assert rejected == []
    lanes: dict[str, list[tuple[ItemKind, Any]]] = {}
    for item in items:
        lanes.setdefault(item.lane, []).append((item.kind, json.loads(item.event_json)))
    return lanes


# -- splitting ---------------------------------------------------------------------


def test_synapse_s_device_parts_become_items_in_lanes_per_receiving_device() -> None:
    lanes = lanes_of(SYNAPSE_BODY)
    assert lanes[f"~to-device:{BOB}|DEV1"] == [
        (ItemKind.TO_DEVICE, to_device(1)),
        (ItemKind.TO_DEVICE, to_device(3)),
    ]
    assert lanes[f"~to-device:{BOB}|DEV2"] == [(ItemKind.TO_DEVICE, to_device(2, "DEV2"))]
    assert lanes["~device-lists"] == [
        (ItemKind.DEVICE_LISTS, {"changed": [ALICE], "left": ["@carol:test.local"]})
    ]
    # The counts come under two names with the same content: one item per device, not two.
    assert lanes[f"~otk:{BOB}|DEV1"] == [
        (
            ItemKind.OTK_COUNTS,
            {
                "user_id": BOB,
                "device_id": "DEV1",
                "counts": {"signed_curve25519": 50},
                "unused_fallback_key_types": ["signed_curve25519"],
            },
        )
    ]
    assert lanes[f"~otk:{BOB}|DEV2"][0][1] == {
        "user_id": BOB, "device_id": "DEV2", "counts": {"signed_curve25519": 0},
    }  # fmt: skip
    # A device only the fallback map names still gets an item (no counts known).
    assert lanes[f"~otk:{BOB}|DEV3"][0][1] == {
        "user_id": BOB, "device_id": "DEV3", "unused_fallback_key_types": [],
    }  # fmt: skip
    assert len(lanes) == 6


def test_the_stable_names_are_read_and_win_over_the_unstable_ones() -> None:
    body = {
        "events": [],
        "to_device": [to_device(1)],
        "de.sorunome.msc2409.to_device": [to_device(2)],  # the same events, under the old name
        "device_lists": {"changed": ["@stable:x"]},
        "org.matrix.msc3202.device_lists": {"changed": ["@unstable:x"]},
        "device_one_time_keys_count": {BOB: {"D": {"a": 1}}},
        "org.matrix.msc3202.device_one_time_keys_count": {BOB: {"D": {"a": 99}}},
        "device_unused_fallback_key_types": {BOB: {"D": ["a"]}},
        "org.matrix.msc3202.device_unused_fallback_key_types": {BOB: {"D": ["b"]}},
    }
    lanes = lanes_of(body)
    assert [c["content"]["n"] for _, c in lanes[f"~to-device:{BOB}|DEV1"]] == [1]
    assert lanes["~device-lists"] == [(ItemKind.DEVICE_LISTS, {"changed": ["@stable:x"]})]
    [(_, counts)] = lanes[f"~otk:{BOB}|D"]
    assert (counts["counts"], counts["unused_fallback_key_types"]) == ({"a": 1}, ["a"])


def test_the_oldest_unstable_key_count_name_is_read_alone() -> None:
    body = {"events": [], "org.matrix.msc3202.device_one_time_key_counts": {BOB: {"D": {"a": 2}}}}
    [(_, counts)] = lanes_of(body)[f"~otk:{BOB}|D"]
    assert counts["counts"] == {"a": 2}


@pytest.mark.parametrize(
    ("body", "kind", "lane", "error"),
    [
        (
            {"to_device": {"not": "a list"}},
            ItemKind.TO_DEVICE,
            "~invalid",
            "'to_device' must be an array, not an object",
        ),
        (
            {"to_device": [{**to_device(1), "content": "text"}]},
            ItemKind.TO_DEVICE,
            f"~to-device:{BOB}|DEV1",
            "invalid to-device event at to_device[0]",
        ),
        (
            {"to_device": [{k: v for k, v in to_device(1).items() if k != "to_device_id"}]},
            ItemKind.TO_DEVICE,
            "~invalid",
            "to_device_id",
        ),
        (
            {"org.matrix.msc3202.device_lists": {"changed": ["@a:x", 5]}},
            ItemKind.DEVICE_LISTS,
            "~device-lists",
            "invalid device lists in 'org.matrix.msc3202.device_lists'",
        ),
        (
            {"org.matrix.msc3202.device_lists": ["@a:x"]},
            ItemKind.DEVICE_LISTS,
            "~device-lists",
            "invalid device lists",
        ),
        (
            {"org.matrix.msc3202.device_one_time_keys_count": {BOB: {"D": {"curve": "3"}}}},
            ItemKind.OTK_COUNTS,
            f"~otk:{BOB}|D",
            f"invalid one-time-key counts of {BOB}'s device D",
        ),
        (
            {"org.matrix.msc3202.device_one_time_keys_count": {BOB: {"D": {"curve": True}}}},
            ItemKind.OTK_COUNTS,
            f"~otk:{BOB}|D",
            "expected an integer",
        ),
        (
            {"org.matrix.msc3202.device_one_time_keys_count": {BOB: ["D"]}},
            ItemKind.OTK_COUNTS,
            "~invalid",
            f"'org.matrix.msc3202.device_one_time_keys_count' of {BOB} must be an object",
        ),
        (
            {"org.matrix.msc3202.device_unused_fallback_key_types": {BOB: {"D": "curve"}}},
            ItemKind.OTK_COUNTS,
            f"~otk:{BOB}|D",
            "unused_fallback_key_types",
        ),
        (
            {"org.matrix.msc3202.device_unused_fallback_key_types": 7},
            ItemKind.OTK_COUNTS,
            "~invalid",
            "must be an object, not a number",
        ),
    ],
)
def test_a_malformed_device_part_is_one_dead_letter_with_a_clear_reason(
    body: dict[str, Any], kind: ItemKind, lane: str, error: str
) -> None:
    good = to_device(9, "GOOD")
    body = {"events": [message("e1")], **body}
    # A good to-device event beside the bad part: in the same list when the bad part is
    # a to-device event (only the first name present is read), else under its own name.
    if isinstance(bad := body.get("to_device"), list):
        body["to_device"] = [*bad, good]
    elif bad is None:
        body["de.sorunome.msc2409.to_device"] = [good]
    items, rejected = split_transaction(body)
    # The rest of the transaction is accepted: the event and the good to-device event
    # (none when the to-device part itself is not a list).
    expected = (
        [ItemKind.EVENT]
        if bad is not None and not isinstance(bad, list)
        else [
            ItemKind.EVENT,
            ItemKind.TO_DEVICE,
        ]
    )
    assert [item.kind for item in items] == expected
    [letter] = [r for r in rejected if r.kind is kind]
    assert len(rejected) == 1
    assert error in letter.error, letter.error
    assert letter.lane == lane
    assert "Traceback" not in letter.error


def test_a_device_id_that_is_not_unicode_is_a_dead_letter_not_a_stuck_transaction() -> None:
    items, rejected = split_device_items({"to_device": [to_device(1, "D\ud800")]})
    assert items == []
    [letter] = rejected
    assert "not Unicode" in letter.error


def test_the_item_limit_counts_to_device_events_and_device_lists() -> None:
    half = 5_000
    body: dict[str, Any] = {
        "events": [message(f"e{i}") for i in range(half)],
        "de.sorunome.msc2409.to_device": [to_device(i) for i in range(half)],
    }
    assert count_device_items(body) == half
    # Key counts have a limit of their own (tests/test_device_key_count_limit.py).
    body["org.matrix.msc3202.device_one_time_keys_count"] = {BOB: {"D": {"a": 1}}}
    assert count_device_items(body) == half
    split_transaction(body)  # exactly the limit: accepted
    body["org.matrix.msc3202.device_lists"] = {"changed": [ALICE]}
    assert count_device_items(body) == half + 1
    with pytest.raises(ErrorReply) as refused:
        split_transaction(body)
    assert (refused.value.status, refused.value.errcode) == (413, "M_TOO_LARGE")
    assert "10001" in str(refused.value)


# -- dispatch ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    store: Store, registry: HandlerRegistry, settings: InboxSettings = SETTINGS, **kwargs: Any
) -> AsyncIterator[tuple[Inbox, TransactionProcessor]]:
    inbox = Inbox(store, registry.route, appservice_id="test_devices", settings=settings, **kwargs)
    await inbox.start()
    try:
        yield inbox, TransactionProcessor(store, inbox.wake)
    finally:
        await stop(inbox)


async def test_each_hook_gets_its_typed_model_in_order_per_device(store: Store) -> None:
    registry = HandlerRegistry()
    got: list[Any] = []

    @registry.decorator(ItemKind.TO_DEVICE, "m.test")
    async def on_test(event: ToDeviceEvent) -> None:
        await asyncio.sleep(0.01 if event.content["n"] == 1 else 0)  # order must still hold
        got.append(("test", event.to_device_id, event.content["n"]))

    @registry.decorator(ItemKind.TO_DEVICE, "m.other")
    async def on_other(event: ToDeviceEvent) -> None:
        got.append(("other", event.to_device_id, event.content["n"]))

    @registry.decorator(ItemKind.DEVICE_LISTS)
    async def on_lists(update: DeviceListUpdate) -> None:
        got.append(update)

    @registry.decorator(ItemKind.OTK_COUNTS)
    async def on_counts(counts: OtkCounts) -> None:
        got.append(counts)

    async with running(store, registry) as (_, processor):
        assert await processor.process("t1", SYNAPSE_BODY)
        second = {"events": [], "to_device": [to_device(4), to_device(5, type_="m.other")]}
        assert await processor.process("t2", second)
        await drained(store)
    to_device_calls = [g for g in got if isinstance(g, tuple)]
    assert [c for c in to_device_calls if c[1] == "DEV1"] == [
        ("test", "DEV1", 1), ("test", "DEV1", 3), ("test", "DEV1", 4), ("other", "DEV1", 5),
    ]  # fmt: skip
    assert ("test", "DEV2", 2) in to_device_calls
    assert DeviceListUpdate(changed=[ALICE], left=["@carol:test.local"]) in got
    counts = sorted((g for g in got if isinstance(g, OtkCounts)), key=lambda c: c.device_id)
    assert counts == [
        OtkCounts(BOB, "DEV1", {"signed_curve25519": 50}, ["signed_curve25519"]),
        OtkCounts(BOB, "DEV2", {"signed_curve25519": 0}, None),
        OtkCounts(BOB, "DEV3", {}, []),
    ]
    # A to-device event is typed with its recipient, unknown keys kept.
    assert ToDeviceEvent("m.x", ALICE, BOB, "D", {}, {"new": 1}) == ToDeviceEvent(
        type="m.x", sender=ALICE, to_user_id=BOB, to_device_id="D", extra={"new": 1}
    )


async def test_internal_handlers_run_before_the_bridge_s(store: Store) -> None:
    registry = HandlerRegistry()
    order: list[str] = []

    @registry.decorator(ItemKind.DEVICE_LISTS)
    async def bridge(update: DeviceListUpdate) -> None:
        order.append("bridge")

    async def tracker(update: DeviceListUpdate) -> None:
        order.append("tracker")

    registry.add_internal(ItemKind.DEVICE_LISTS, tracker)
    async with running(store, registry) as (_, processor):
        assert await processor.process("t", {"events": [], "device_lists": {"changed": [ALICE]}})
        await drained(store)
    assert order == ["tracker", "bridge"]
    assert registry.handled_types() == set()  # internal ones are not the bridge's types


async def test_a_failing_to_device_hook_is_retried_then_a_dead_letter_that_replays(
    any_store: Store,
) -> None:
    store = any_store
    registry = HandlerRegistry()
    tries: list[int] = []
    state = {"fixed": False}

    @registry.decorator(ItemKind.TO_DEVICE)
    async def forward(event: ToDeviceEvent) -> None:
        tries.append(event.content["n"])
        if event.content["n"] == 1 and not state["fixed"]:
            raise RuntimeError("cannot forward")

    metrics = Metrics()
    async with running(store, registry, metrics=metrics) as (inbox, processor):
        assert await processor.process(
            "t", {"events": [], "to_device": [to_device(1), to_device(2)]}
        )
        await drained(store)
        # The device's later event waited for the first to be set aside: order holds.
        assert tries == [1] * SETTINGS.attempts + [2]
        [letter] = await store.dead_letters()
        assert (letter.kind, letter.lane) == (ItemKind.TO_DEVICE, f"~to-device:{BOB}|DEV1")
        assert (letter.handler, letter.attempts) == (handler_name(forward), SETTINGS.attempts)
        assert letter.event_type == "m.test" and letter.event_id is None
        assert "RuntimeError: cannot forward" in letter.error
        assert metric(metrics, "bridge_kit_dead_lettered_total", reason="handler") == 1
        state["fixed"] = True
        assert await DeadLetters(store, inbox.wake).replay([letter.id]) == 1
        await until(lambda: len(tries) == SETTINGS.attempts + 2)
        await drained(store)
    assert tries[-1] == 1 and await store.dead_letters() == []


async def test_a_malformed_stored_item_is_buried_as_invalid_of_its_kind(store: Store) -> None:
    registry = HandlerRegistry()
    calls: list[Any] = []
    registry.decorator(ItemKind.OTK_COUNTS)(_record(calls))
    # A dead letter of a malformed part, replayed: back in the inbox as it came.
    _, rejected = split_device_items({"device_one_time_keys_count": {BOB: {"D": {"a": "x"}}}})
    assert await store.accept_transaction("t", [], rejected)
    async with running(store, registry) as (inbox, _):
        [letter] = await store.dead_letters()
        assert await DeadLetters(store, inbox.wake).replay([letter.id]) == 1
        await until_store(lambda: _letters_are(store, 1))
        await drained(store)
    [again] = await store.dead_letters()
    assert again.kind is ItemKind.OTK_COUNTS and again.handler is None
    assert again.error.startswith("invalid otk_counts item: ")
    assert calls == []


def _record(calls: list[Any]) -> Any:
    async def record(item: Any) -> None:
        calls.append(item)

    return record


async def _letters_are(store: Store, count: int) -> bool:
    return len(await store.dead_letters()) == count and (await store.inbox_stats()).depth == 0


# -- preprocessors and NotReady (the seam for the encryption layer) ------------------------


class ToyDecryptor:
    """A stand-in for decryption: ``m.room.encrypted`` carries its inner event in
    ``content.inner``, readable once ``key`` was set for its ``content.session``."""

    def __init__(self, wait: float, retry: float = 0.05) -> None:
        self.keys: set[str] = set()
        self.wait = wait
        self.retry = retry
        self.calls: list[tuple[str | None, int]] = []

    async def __call__(self, event: Event, record: InboxItem) -> Event:
        self.calls.append((event.event_id, record.attempts))
        if event.type != "m.room.encrypted":
            return event
        if event.content["session"] not in self.keys:
            raise NotReady("no room key", retry_after=self.retry, give_up_after=self.wait)
        inner = event.content["inner"]
        return attrs.evolve(event, type=inner["type"], content=inner["content"])


def encrypted(name: str, session: str, room: str = "!r:test.local") -> dict[str, Any]:
    inner = {"type": "m.room.message", "content": {"msgtype": "m.text", "body": name}}
    return {**message(name, room), "type": "m.room.encrypted", "content": {
        "session": session, "inner": inner,
    }}  # fmt: skip


async def test_a_preprocessor_turns_an_item_into_what_handlers_get(store: Store) -> None:
    registry = HandlerRegistry()
    bodies: list[tuple[str, str]] = []

    @registry.decorator(ItemKind.EVENT, "m.room.message")
    async def on_message(event: Event) -> None:
        bodies.append((event.type, event.content["body"]))

    seen: list[str] = []

    async def first(event: Event, record: InboxItem) -> Event:
        seen.append(f"first:{event.type}")
        return event

    async def after(event: Event, record: InboxItem) -> Event:
        seen.append(f"after:{event.type}")
        return event

    decryptor = ToyDecryptor(wait=5)
    decryptor.keys.add("s1")
    async with running(store, registry) as (inbox, processor):
        inbox.add_preprocessor(ItemKind.EVENT, first)
        inbox.add_preprocessor(ItemKind.EVENT, decryptor)
        inbox.add_preprocessor(ItemKind.EVENT, after)
        assert await processor.process("t", {"events": [encrypted("secret", "s1")]})
        await drained(store)
    # Routed by the decrypted type; each preprocessor got the one before's result.
    assert bodies == [("m.room.message", "secret")]
    assert seen == ["first:m.room.encrypted", "after:m.room.message"]


async def test_not_ready_waits_without_attempts_and_holds_the_lane_in_order(
    any_store: Store,
) -> None:
    store = any_store
    registry = HandlerRegistry()
    handled: list[str] = []

    @registry.decorator(ItemKind.EVENT)
    async def on_any(event: Event) -> None:
        handled.append(event.content["body"])

    settings = attrs.evolve(SETTINGS, attempts=2)  # far fewer than the deferrals below
    decryptor = ToyDecryptor(wait=30, retry=0.05)
    room, other = "!r:test.local", "!other:test.local"
    async with running(store, registry, settings) as (inbox, processor):
        inbox.add_preprocessor(ItemKind.EVENT, decryptor)
        first = encrypted("first", "late", room)
        events = [first, message("plain", room), message("elsewhere", other)]
        assert await processor.process("t", {"events": events})
        await until(lambda: len(decryptor.calls) >= 6)
        # Other rooms go on; this room's later event waits behind the first.
        assert handled == ["elsewhere"]
        [head, *_] = await store.lane_items(room, 10)
        assert head.attempts == 0 and head.first_failed_at is not None
        assert head.not_before > time.time() - 1
        decryptor.keys.add("late")  # the key arrives
        await drained(store)
    assert handled == ["elsewhere", "first", "plain"]
    assert await store.dead_letters() == []
    # Every try of the waiting event saw no attempt counted.
    assert {attempts for event_id, attempts in decryptor.calls if event_id == "$first"} == {0}


async def test_not_ready_past_its_deadline_is_a_dead_letter_that_replays(any_store: Store) -> None:
    store = any_store
    registry = HandlerRegistry()
    handled: list[str] = []

    @registry.decorator(ItemKind.EVENT)
    async def on_any(event: Event) -> None:
        handled.append(event.content["body"])

    decryptor = ToyDecryptor(wait=0.4, retry=10)  # the deadline, not the retry, decides
    metrics = Metrics()
    room = "!r:test.local"
    async with running(store, registry, metrics=metrics) as (inbox, processor):
        inbox.add_preprocessor(ItemKind.EVENT, decryptor)
        started = time.monotonic()
        events = [encrypted("lost", "never", room), message("next", room)]
        assert await processor.process("t", {"events": events})
        await until(lambda: handled == ["next"])
        waited = time.monotonic() - started
        assert 0.4 <= waited < 5  # buried at its deadline, not after retry_after
        [letter] = await store.dead_letters()
        assert (letter.error, letter.attempts) == ("no room key", 0)
        assert letter.handler == handler_name(decryptor)
        assert letter.event_id == "$lost" and letter.event_type == "m.room.encrypted"
        assert json.loads(letter.event_json)["type"] == "m.room.encrypted"  # as received
        assert metric(metrics, "bridge_kit_dead_lettered_total", reason="not_ready") == 1
        decryptor.keys.add("never")
        assert await DeadLetters(store, inbox.wake).replay([letter.id]) == 1
        await until(lambda: handled == ["next", "lost"])
        await drained(store)


async def test_a_preprocessor_that_raises_is_retried_then_named_in_the_dead_letter(
    store: Store,
) -> None:
    registry = HandlerRegistry()
    calls: list[Any] = []
    registry.decorator(ItemKind.TO_DEVICE)(_record(calls))

    async def broken(event: ToDeviceEvent, record: InboxItem) -> ToDeviceEvent:
        if event.content["n"] == 1:
            raise ValueError("bad olm message")
        return None  # type: ignore[return-value]  # a bug: it forgot to return the event

    async with running(store, registry) as (inbox, processor):
        inbox.add_preprocessor(ItemKind.TO_DEVICE, broken)
        body = {"events": [], "to_device": [to_device(1), to_device(2, "OTHER")]}
        assert await processor.process("t", body)
        await drained(store)
    first, second = sorted(await store.dead_letters(), key=lambda letter: letter.lane)
    assert first.handler == handler_name(broken) and first.attempts == SETTINGS.attempts
    assert "ValueError: bad olm message" in first.error
    assert second.error == f"TypeError: {handler_name(broken)} returned NoneType, not ToDeviceEvent"
    assert calls == []


async def test_a_handler_may_say_not_ready_and_keeps_its_progress(store: Store) -> None:
    registry = HandlerRegistry()
    log: list[str] = []
    state = {"ready": False}

    async def tracker(update: DeviceListUpdate) -> None:
        log.append("tracker")

    @registry.decorator(ItemKind.DEVICE_LISTS)
    async def waiter(update: DeviceListUpdate) -> None:
        log.append("waiter")
        if not state["ready"]:
            raise NotReady("waiting", retry_after=0.05, give_up_after=30)

    registry.add_internal(ItemKind.DEVICE_LISTS, tracker)
    async with running(store, registry) as (_, processor):
        assert await processor.process("t", {"events": [], "device_lists": {"left": [ALICE]}})
        await until(lambda: log.count("waiter") >= 3)
        state["ready"] = True
        await drained(store)
    # The internal handler returned once; it is not run again on the retries.
    assert log.count("tracker") == 1 and log[0] == "tracker"


def test_not_ready_refuses_a_retry_that_would_spin() -> None:
    with pytest.raises(ValueError, match="retry_after"):
        NotReady("x", retry_after=0, give_up_after=1)
    assert str(NotReady("no room key", retry_after=1, give_up_after=10)) == "no room key"


async def test_a_deferral_counts_no_attempt_in_every_store(any_store: Store) -> None:
    store = any_store
    items, _ = split_transaction({"events": [], "to_device": [to_device(1)]})
    assert await store.accept_transaction("t", items)
    [item] = await store.lane_items(items[0].lane, 5)
    await store.fail_item(item.id, ["a"], 1.0, count_attempt=False)
    await store.fail_item(item.id, ["a", "b"], 2.0, count_attempt=False)
    [deferred] = await store.lane_items(items[0].lane, 5)
    assert (deferred.attempts, deferred.done_handlers, deferred.not_before) == (0, ("a", "b"), 2.0)
    assert deferred.first_failed_at is not None
    await store.fail_item(item.id, ["a", "b"], 3.0)
    [failed] = await store.lane_items(items[0].lane, 5)
    assert (failed.attempts, failed.first_failed_at) == (1, deferred.first_failed_at)


def test_ephemeral_events_under_both_names_are_split_once() -> None:
    """Synapse sends the same ephemeral events under 'ephemeral' and
    'de.sorunome.msc2409.ephemeral' when a registration has both flags."""
    typing = {"type": "m.typing", "room_id": "!r:x", "content": {"user_ids": []}}
    body = {"events": [], "ephemeral": [typing], "de.sorunome.msc2409.ephemeral": [typing]}
    items, rejected = split_transaction(body)
    assert rejected == []
    assert [(item.lane, item.kind) for item in items] == [("~ephemeral:!r:x", ItemKind.EPHEMERAL)]
