"""The inbox's workers against real stores (memory, SQLite, PostgreSQL), no homeserver.

Handlers are plain async functions that record what they get. Events go in the
way the route puts them there (``split_transaction`` + ``accept_transaction``,
or a :class:`TransactionProcessor`), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest

from bridge_kit.errors import StoreError
from bridge_kit.inbox.dead_letters import DeadLetters
from bridge_kit.inbox.delivery import next_txn_id
from bridge_kit.inbox.handlers import EventHandler
from bridge_kit.inbox.lanes import HandlerRoute, Inbox, InboxSettings, handler_name
from bridge_kit.inbox.records import ItemKind
from bridge_kit.inbox.signals import NotHere
from bridge_kit.inbox.transactions import TransactionProcessor, split_transaction
from bridge_kit.metrics import Metrics
from bridge_kit.store import MemoryStore, PostgresStore, Store, open_store
from bridge_kit.types import Event
from tests.test_store import backend_url, emptied

A, B, C = "!a:test.local", "!b:test.local", "!c:test.local"
APPSERVICE = "test_inbox"
PUPPET = "@_bk_puppet:test.local"
SETTINGS = InboxSettings(
    concurrency=8, attempts=3, backoff=0.05, backoff_max=0.2, timeout=0.5, lease=1.0, poll=0.05
)
WAIT = 15.0  # the bound on every wait for the inbox; generous, it only matters on failure


# -- stores ------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


# Synchronous, as in test_store: the PostgreSQL fixture is looked up outside the loop.
@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(local_backend: str) -> AsyncIterator[Store]:
    """An empty memory or SQLite store."""
    async with open_store(await emptied(local_backend)) as opened:
        yield opened


@pytest.fixture
async def memory() -> AsyncIterator[Store]:
    """An empty memory store, for what does not depend on the backend."""
    async with MemoryStore() as opened:
        yield opened


@pytest.fixture
async def any_store(any_backend: str) -> AsyncIterator[Store]:
    """An empty store of each backend, PostgreSQL included."""
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


# -- events in, handlers out ----------------------------------------------------------------


def message(name: str, room: str = A, n: int = 0) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": f"${name}",
        "room_id": room,
        "sender": "@someone:test.local",
        "content": {"msgtype": "m.text", "body": name, "n": n},
        "origin_server_ts": 1_700_000_000_000 + n,
    }


def typing(room: str) -> dict[str, Any]:
    return {"type": "m.typing", "room_id": room, "content": {"user_ids": []}}


async def accept(
    store: Store, txn_id: str, events: Iterable[dict[str, Any]], ephemeral: Iterable[Any] = ()
) -> None:
    """Put a transaction in the inbox, as the route does."""
    items, rejected = split_transaction({"events": list(events), "ephemeral": list(ephemeral)})
    assert not rejected
    assert await store.accept_transaction(txn_id, items, rejected)


def route_to(*handlers: EventHandler) -> HandlerRoute:
    """Every item gets ``handlers``, in that order."""
    return lambda kind, event_type: handlers


@contextlib.asynccontextmanager
async def running(
    store: Store,
    route: HandlerRoute,
    settings: InboxSettings = SETTINGS,
    metrics: Metrics | None = None,
) -> AsyncIterator[Inbox]:
    inbox = Inbox(store, route, appservice_id=APPSERVICE, settings=settings, metrics=metrics)
    await inbox.start()
    try:
        yield inbox
    finally:
        await stop(inbox)


async def stop(inbox: Inbox, grace: float = 0) -> None:
    """``inbox.stop(grace)``, failing the test rather than hanging it."""
    stopping = asyncio.ensure_future(inbox.stop(grace))
    done, _ = await asyncio.wait([stopping], timeout=grace + 10)
    if not done:
        _cancel_again(inbox)
        await asyncio.wait([stopping], timeout=5)
        pytest.fail("Inbox.stop() did not return")


def _cancel_again(inbox: Inbox) -> None:
    """Cancel the inbox's tasks again, should one have swallowed a cancellation."""
    # private, but only to clean up after a failed test
    for task in (inbox._scheduler, inbox._renewer, *(lane.task for lane in inbox._lanes.values())):
        if task is not None:
            task.cancel()


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def until_store(
    condition: Callable[[], Awaitable[bool]], timeout: float = WAIT, every: float = 0.02
) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(every)


async def drained(store: Store) -> None:
    """Wait until the inbox is empty (every item completed or buried)."""

    async def empty() -> bool:
        return (await store.inbox_stats()).depth == 0

    await until_store(empty)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- failures: retries, dead letters, replay ---------------------------------------------


async def test_a_poison_event_is_buried_without_holding_up_other_rooms(any_store: Store) -> None:
    store = any_store
    # One worker: room B gets it while the poison waits 0.15-0.3 s, then 0.3-0.6 s, for
    # its retries, or not at all if a lane waiting for a retry kept its worker.
    settings = attrs.evolve(SETTINGS, concurrency=1, backoff=0.3, backoff_max=1.0)
    log: list[tuple[str, str | None]] = []
    state = {"fixed": False}

    async def forward(event: Event) -> None:
        log.append(("try", event.event_id))
        if event.event_id == "$poison" and not state["fixed"]:
            raise RuntimeError(f"cannot forward {event.event_id}")
        log.append(("done", event.event_id))

    metrics = Metrics()
    async with running(store, route_to(forward), settings, metrics) as inbox:
        processor = TransactionProcessor(store, inbox.wake, metrics=metrics)
        poison = message("poison", A)
        assert await processor.process("t1", {"events": [poison, message("a2", A)]})
        assert await processor.process("t2", {"events": [message("b1", B)]})
        await until(lambda: ("done", "$a2") in log)

        tries = [i for i, entry in enumerate(log) if entry == ("try", "$poison")]
        assert len(tries) == settings.attempts
        # Room B went on while the poison waited for its retries (the lane held no worker) ...
        assert log.index(("done", "$b1")) < tries[1]
        # ... and room A went on only once the poison was set aside.
        assert log.index(("try", "$a2")) > tries[-1]

        [letter] = await store.dead_letters()
        assert letter.handler == handler_name(forward)
        assert letter.handler.endswith(
            "test_a_poison_event_is_buried_without_holding_up_other_rooms.<locals>.forward"
        )
        assert "Traceback" in letter.error
        assert "RuntimeError: cannot forward $poison" in letter.error
        assert letter.attempts == settings.attempts
        # Two backoffs (at least 0.15 s and 0.3 s) separate the first and last failures.
        assert letter.first_failed_at + 0.4 <= letter.last_failed_at
        assert (letter.lane, letter.kind) == (A, ItemKind.EVENT)
        assert (letter.event_id, letter.event_type) == ("$poison", "m.room.message")
        assert json.loads(letter.event_json) == poison
        assert metric(metrics, "bridge_kit_handler_retries_total") == settings.attempts - 1
        assert metric(metrics, "bridge_kit_dead_lettered_total", reason="handler") == 1
        assert (await inbox.refresh_stats()).dead_letters == 1
        assert metric(metrics, "bridge_kit_dead_letters") == 1

        # The handler is fixed; the operator replays the letter.
        state["fixed"] = True
        assert await DeadLetters(store, inbox.wake).replay([letter.id]) == 1
        await until(lambda: ("done", "$poison") in log)
        await drained(store)
        await asyncio.sleep(5 * settings.poll)  # time for a second (wrong) run to show
    done = [str(event_id) for what, event_id in log if what == "done"]
    assert sorted(done) == ["$a2", "$b1", "$poison"]
    assert await store.dead_letters() == []


async def test_an_invalid_item_in_the_inbox_is_buried_without_a_handler(store: Store) -> None:
    calls: list[str | None] = []

    async def handler(event: Event) -> None:
        calls.append(event.event_id)

    # A replayed letter of a malformed event is back in the inbox as it was received.
    items, rejected = split_transaction({"events": [{"type": 5, "room_id": A}, message("a1")]})
    assert await store.accept_transaction("t1", items, rejected)
    assert await store.replay_dead_letters() == 1
    metrics = Metrics()
    async with running(store, route_to(handler), metrics=metrics) as inbox:
        inbox.wake()
        await drained(store)
    assert calls == ["$a1"]
    [letter] = await store.dead_letters()
    assert letter.handler is None
    assert "invalid event" in letter.error and "type" in letter.error
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="invalid") == 1


async def test_a_handler_past_the_timeout_fails_and_is_retried(store: Store) -> None:
    settings = attrs.evolve(SETTINGS, timeout=0.3, attempts=2)
    calls: list[str | None] = []
    cancelled: list[str | None] = []

    async def slow(event: Event) -> None:
        calls.append(event.event_id)
        if event.event_id == "$always" or calls.count(event.event_id) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(event.event_id)
                raise

    metrics = Metrics()
    async with running(store, route_to(slow), settings, metrics) as inbox:
        await accept(store, "t1", [message("once", A), message("always", B)])
        inbox.wake()
        await drained(store)
    assert calls.count("$once") == 2
    assert calls.count("$always") == settings.attempts
    assert sorted(map(str, cancelled)) == ["$always", "$always", "$once"]
    [letter] = await store.dead_letters()
    assert letter.event_id == "$always"
    assert "TimeoutError" in letter.error and "0.3" in letter.error
    assert letter.attempts == settings.attempts
    assert metric(metrics, "bridge_kit_handler_retries_total") == 2
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="handler") == 1


class Calls:
    """Handlers that record their calls per handler; ``fail`` makes one fail N times."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str | None]] = collections.defaultdict(list)
        self.failures: dict[str, int] = {}

    async def run(self, name: str, event: Event) -> None:
        self.calls[name].append(event.event_id)
        if self.failures.get(name):
            self.failures[name] -= 1
            raise RuntimeError(f"{name} failed")


async def test_handlers_that_succeeded_are_not_run_again_on_a_retry(store: Store) -> None:
    settings = attrs.evolve(SETTINGS, backoff=0.5, backoff_max=0.5)  # a retry after 0.25-0.5 s
    calls = Calls()
    calls.failures["second"] = 1

    async def first(event: Event) -> None:
        await calls.run("first", event)

    async def second(event: Event) -> None:
        await calls.run("second", event)

    async def third(event: Event) -> None:
        await calls.run("third", event)

    async def failed_once() -> bool:
        items = await store.lane_items(A, 10)
        return bool(items) and items[0].attempts == 1

    async with running(store, route_to(first, second, third), settings) as inbox:
        await accept(store, "t1", [message("x", A)])
        inbox.wake()
        await until_store(failed_once, every=0.01)
        # What already succeeded is in the store, not only in the worker's memory.
        [item] = await store.lane_items(A, 10)
        assert item.done_handlers == (handler_name(first),)
        assert item.not_before > time.time()
        await drained(store)
    assert calls.calls == {"first": ["$x"], "second": ["$x", "$x"], "third": ["$x"]}


async def test_a_retry_runs_when_its_log_line_says_not_at_the_next_poll(store: Store) -> None:
    # A retry after 0.1-0.2 s, and a poll (5 s) that would make it far later.
    settings = attrs.evolve(SETTINGS, backoff=0.2, backoff_max=0.2, poll=5.0)
    calls = Calls()
    calls.failures["flaky"] = 1
    ran_at: list[float] = []

    async def flaky(event: Event) -> None:
        ran_at.append(time.monotonic())
        await calls.run("flaky", event)

    async with running(store, route_to(flaky), settings) as inbox:
        await accept(store, "t1", [message("x", A)])
        inbox.wake()
        await until(lambda: calls.calls.get("flaky") == ["$x", "$x"])
    assert 0.1 <= ran_at[1] - ran_at[0] < 0.2 + 1.0, ran_at


async def test_handlers_that_succeeded_are_not_run_again_after_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    settings = attrs.evolve(SETTINGS, backoff=0.4, backoff_max=0.4)
    calls = Calls()
    calls.failures["second"] = 1

    async def first(event: Event) -> None:
        await calls.run("first", event)

    async def second(event: Event) -> None:
        await calls.run("second", event)

    async with open_store(url) as store, running(store, route_to(first, second), settings) as inbox:
        await accept(store, "t1", [message("x", A)])
        inbox.wake()
        await until(lambda: calls.calls["second"] == ["$x"])
        await until_store(lambda: _attempts_are(store, A, 1))
    # A new process, with new function objects of the same names.
    async with open_store(url) as store, running(store, route_to(first, second), settings):
        await drained(store)
    assert calls.calls == {"first": ["$x"], "second": ["$x", "$x"]}


async def _attempts_are(store: Store, lane: str, attempts: int) -> bool:
    items = await store.lane_items(lane, 1)
    return bool(items) and items[0].attempts == attempts


def forwarder(target: str, log: list[tuple[str, str]], failures: dict[str, int]) -> EventHandler:
    """A handler per target, all with one qualified name (as a factory makes them)."""

    async def forward(event: Event) -> None:
        assert event.room_id is not None
        log.append((target, next_txn_id(PUPPET, event.room_id, "m.room.message")))
        if failures.get(target):
            failures[target] -= 1
            raise RuntimeError(f"{target} is down")

    return forward


async def test_two_handlers_with_the_same_qualified_name_are_kept_apart(store: Store) -> None:
    log: list[tuple[str, str]] = []
    failures = {"xmpp": 1}
    to_irc, to_xmpp = forwarder("irc", log, failures), forwarder("xmpp", log, failures)
    assert handler_name(to_irc) == handler_name(to_xmpp)
    async with running(store, route_to(to_irc, to_xmpp)) as inbox:
        await accept(store, "t1", [message("x", A)])
        inbox.wake()
        await drained(store)
    # Both ran; the retry after the second one failed did not run the first again.
    assert [target for target, _ in log] == ["irc", "xmpp", "xmpp"]
    irc_ids = {txn for target, txn in log if target == "irc"}
    xmpp_ids = {txn for target, txn in log if target == "xmpp"}
    # Each derives its own (stable) txn ids, so the homeserver takes both sends.
    assert len(irc_ids) == len(xmpp_ids) == 1
    assert irc_ids != xmpp_ids


def test_a_handler_s_name_has_no_memory_address() -> None:
    async def relay(event: Event, network: str) -> None:
        pass

    class Relay:
        async def __call__(self, event: Event) -> None:
            pass

    # The name keys done_handlers and the derived txn ids: it must be the same next run.
    for handler in (functools.partial(relay, network="irc"), Relay()):
        name = handler_name(handler)
        assert "0x" not in name and name.startswith(f"{__name__}.")
    plain = handler_name(relay)  # type: ignore[arg-type]  # (it takes one more argument)
    assert handler_name(functools.partial(relay, network="irc")) == plain


async def test_a_replayed_huge_number_does_not_reach_a_handler_as_infinity(memory: Store) -> None:
    store = memory
    got: list[dict[str, Any]] = []

    async def handler(event: Event) -> None:
        got.append(event.content)

    body = json.loads(
        '{"events": [{"type": "m.room.message", "room_id": "' + A + '", "event_id": "$huge",'
        ' "content": {"n": 1e999}}]}'
    )
    items, rejected = split_transaction(body)
    assert await store.accept_transaction("t1", items, rejected)
    [letter] = await store.dead_letters()
    async with running(store, route_to(handler)) as inbox:
        assert await DeadLetters(store, inbox.wake).replay([letter.id]) == 1
        await drained(store)
    assert got == []
    [again] = await store.dead_letters()
    assert again.handler is None and "invalid event" in again.error
    json.loads(again.event_json, parse_constant=_no_constants)  # valid JSON, no Infinity


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def test_a_handler_s_own_timeout_error_keeps_its_traceback(memory: Store) -> None:
    store = memory

    async def handler(event: Event) -> None:
        raise TimeoutError("the remote network did not answer")

    settings = attrs.evolve(SETTINGS, attempts=1)
    async with running(store, route_to(handler), settings) as inbox:
        await accept(store, "t1", [message("x", A)])
        inbox.wake()
        await drained(store)
    [letter] = await store.dead_letters()
    assert "Traceback" in letter.error
    assert "TimeoutError: the remote network did not answer" in letter.error
    assert "ran past" not in letter.error


# -- order and concurrency -----------------------------------------------------------------


async def test_each_room_is_handled_in_order_one_event_at_a_time(any_store: Store) -> None:
    store = any_store
    rng = random.Random(1234)
    rooms = {A: 60, B: 50, C: 50}  # A crosses the worker's 50-item batch
    events = [
        message(f"{room}/{n}", room, n) for room, count in rooms.items() for n in range(count)
    ]
    rng.shuffle(events)
    events.sort(key=lambda e: e["content"]["n"])  # per room in order, rooms interleaved
    handled: dict[str, list[int]] = collections.defaultdict(list)
    active: collections.Counter[str] = collections.Counter()
    peak: collections.Counter[str] = collections.Counter()
    overall = {"active": 0, "peak": 0}

    async def handler(event: Event) -> None:
        assert event.room_id is not None
        room = event.room_id
        active[room] += 1
        overall["active"] += 1
        peak[room] = max(peak[room], active[room])
        overall["peak"] = max(overall["peak"], overall["active"])
        try:
            await asyncio.sleep(rng.uniform(0, 0.02))
            handled[room].append(event.content["n"])
        finally:
            active[room] -= 1
            overall["active"] -= 1

    async with running(store, route_to(handler)) as inbox:
        # Some transactions before the workers start, the rest while they work.
        batches = [events[i : i + 10] for i in range(0, len(events), 10)]
        for number, batch in enumerate(batches[:4]):
            await accept(store, f"t{number}", batch)
        inbox.wake()
        for number, batch in enumerate(batches[4:], start=4):
            await accept(store, f"t{number}", batch)
            inbox.wake()
            await asyncio.sleep(rng.uniform(0, 0.03))
        await until(lambda: sum(map(len, handled.values())) == len(events))
        await drained(store)
    assert {room: handled[room] for room in rooms} == {
        room: list(range(count)) for room, count in rooms.items()
    }
    assert max(peak.values()) == 1
    assert overall["peak"] > 1  # while the rooms themselves ran side by side


async def test_a_slow_handler_in_one_room_does_not_delay_another(store: Store) -> None:
    settings = attrs.evolve(SETTINGS, timeout=10.0)
    slow_started, slow_finished = asyncio.Event(), asyncio.Event()
    fast: list[str | None] = []

    async def handler(event: Event) -> None:
        if event.event_id == "$slow":
            slow_started.set()
            await asyncio.sleep(1.5)
            slow_finished.set()
        else:
            fast.append(event.event_id)

    async with running(store, route_to(handler), settings) as inbox:
        await accept(store, "t1", [message("slow", A)])
        inbox.wake()
        await asyncio.wait_for(slow_started.wait(), WAIT)
        await accept(store, "t2", [message(f"b{n}", B) for n in range(5)], [typing(A)])
        inbox.wake()
        # Room B's events and room A's typing notice (a lane of its own) go past.
        await until(lambda: len(fast) == 6)
        assert not slow_finished.is_set()
        await asyncio.wait_for(slow_finished.wait(), WAIT)
        await drained(store)
    assert [event_id for event_id in fast if event_id] == [f"$b{n}" for n in range(5)]


# -- stopping, restarting, exactly-once sends ---------------------------------------------------


async def test_stop_leaves_pending_items_for_the_next_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    rooms = (A, B, C)
    done: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # room: (run, n)
    txn_ids: dict[tuple[int, str | None], str] = {}  # (run, event id): its send's txn id
    blocked: list[str | None] = []
    cancelled: list[str | None] = []
    never = asyncio.Event()

    state = {"run": 1}

    # One function for both "processes": its name is what derived txn ids depend on.
    async def relay(event: Event) -> None:
        assert event.room_id is not None
        n = event.content["n"]
        txn_ids[state["run"], event.event_id] = next_txn_id(PUPPET, event.room_id, "m.text")
        if state["run"] == 1 and n == 4:
            blocked.append(event.event_id)
            try:
                await never.wait()  # the process goes down while this handler runs
            except asyncio.CancelledError:
                cancelled.append(event.event_id)
                raise
        done[event.room_id].append((state["run"], n))

    async with open_store(url) as store:
        inbox = Inbox(store, route_to(relay), appservice_id=APPSERVICE, settings=SETTINGS)
        await inbox.start()
        try:
            for n in range(10):
                await accept(store, f"t{n}", [message(f"{room}/{n}", room, n) for room in rooms])
            inbox.wake()
            await until(lambda: len(blocked) == len(rooms))
        finally:
            await stop(inbox)
        assert sorted(map(str, cancelled)) == sorted(map(str, blocked))
        assert (await store.inbox_stats()).depth == 6 * len(rooms)
    assert all(done[room] == [(1, n) for n in range(4)] for room in rooms)

    state["run"] = 2
    async with open_store(url) as store:
        assert (await store.inbox_stats()).depth == 6 * len(rooms)
        async with running(store, route_to(relay)):
            await drained(store)
            await asyncio.sleep(5 * SETTINGS.poll)
    for room in rooms:
        assert done[room] == [(1, n) for n in range(4)] + [(2, n) for n in range(4, 10)]
        # The interrupted send gets the same transaction ID from the next process.
        assert txn_ids[1, f"${room}/4"] == txn_ids[2, f"${room}/4"]


async def test_sends_in_a_handler_get_the_same_txn_ids_on_every_attempt(store: Store) -> None:
    sends: dict[str | None, list[list[str]]] = collections.defaultdict(list)
    attempts: collections.Counter[str | None] = collections.Counter()

    async def relay(event: Event) -> None:
        room = event.room_id or "!none:test.local"
        key = event.event_id or event.type
        sends[key].append([next_txn_id(PUPPET, room, "m.room.message") for _ in range(2)])
        attempts[key] += 1
        if (key == "$x" and attempts[key] < 3) or (key == "m.typing" and attempts[key] < 2):
            raise RuntimeError("the homeserver did not answer")

    async with running(store, route_to(relay)) as inbox:
        await accept(store, "t1", [message("x", A), message("y", B)], [typing(A)])
        inbox.wake()
        await drained(store)
    assert attempts == {"$x": 3, "$y": 1, "m.typing": 2}
    first_x = sends["$x"][0]
    assert sends["$x"] == [first_x] * 3
    assert first_x[0] != first_x[1]  # two sends in one run differ
    # An event without an ID (typing) gets stable IDs too, unlike sends outside a handler.
    assert sends["m.typing"][0] == sends["m.typing"][1]
    everything = [*first_x, *sends["$y"][0], *sends["m.typing"][0]]
    assert len(set(everything)) == len(everything)
    outside = next_txn_id(PUPPET, A, "m.room.message")
    assert outside != next_txn_id(PUPPET, A, "m.room.message")
    assert outside not in everything


async def test_stop_starts_no_new_event_during_the_grace_period(memory: Store) -> None:
    store = memory
    started: list[str | None] = []
    finished: list[str | None] = []

    async def handler(event: Event) -> None:
        started.append(event.event_id)
        await asyncio.sleep(0.1)
        finished.append(event.event_id)

    inbox = Inbox(store, route_to(handler), appservice_id=APPSERVICE, settings=SETTINGS)
    await inbox.start()
    await accept(store, "t1", [message(f"a{n}", A, n) for n in range(10)])
    inbox.wake()
    await until(lambda: bool(started))
    await stop(inbox, grace=5)
    # The running handler finished within the grace period; the rest waits for the next run.
    assert started == finished == ["$a0"]
    assert (await store.inbox_stats()).depth == 9


async def test_stop_right_after_a_wake_returns(memory: Store) -> None:
    store = memory
    settings = attrs.evolve(SETTINGS, poll=5.0)  # no poll timeout in the way
    hung = []
    for yields in range(3):
        inbox = Inbox(store, route_to(), appservice_id=APPSERVICE, settings=settings)
        await inbox.start()
        await asyncio.sleep(0.05)  # the scheduler waits for a wake-up
        inbox.wake()
        for _ in range(yields):
            await asyncio.sleep(0)
        # (Python 3.11's asyncio.wait_for would swallow this cancellation.)
        stopping = asyncio.ensure_future(inbox.stop(grace=0))
        done, _ = await asyncio.wait([stopping], timeout=0.5)
        if not done:
            hung.append(yields)
            _cancel_again(inbox)
            await asyncio.wait_for(stopping, 5)
    assert hung == []


# -- several processes on one PostgreSQL ------------------------------------------------------


class SharedLog:
    """What the handlers of several inboxes did, per room, with a check on overlap."""

    def __init__(self) -> None:
        self.handled: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        self.first_at: dict[str, float] = {}
        self.active: collections.Counter[str] = collections.Counter()
        self.overlaps = 0

    def handler(self, who: str, latency: float = 0.005) -> EventHandler:
        rng = random.Random(who)

        async def handle(event: Event) -> None:
            assert event.room_id is not None
            room = event.room_id
            self.active[room] += 1
            self.overlaps += self.active[room] > 1
            try:
                await asyncio.sleep(rng.uniform(0, latency))
                self.first_at.setdefault(room, time.monotonic())
                self.handled[room].append((who, event.content["n"]))
            finally:
                self.active[room] -= 1

        return handle

    def total(self) -> int:
        return sum(map(len, self.handled.values()))

    def numbers(self, room: str) -> list[int]:
        return [n for _, n in self.handled[room]]

    def workers(self) -> set[str]:
        return {who for entries in self.handled.values() for who, _ in entries}


def rooms_of(count: int) -> list[str]:
    return [f"!room{r}:test.local" for r in range(count)]


async def accept_rooms(store: Store, rooms: list[str], per_room: int) -> None:
    """``per_room`` events in each room, in transactions that mix the rooms."""
    for n in range(per_room):
        await accept(store, f"t{n}", [message(f"{room}/{n}", room, n) for room in rooms])


async def test_two_processes_share_one_postgresql_inbox(postgres_dsn: str) -> None:
    dsn = await emptied(postgres_dsn)
    settings = attrs.evolve(SETTINGS, concurrency=5)
    rooms = rooms_of(20)
    log = SharedLog()
    async with PostgresStore(dsn) as one_store, PostgresStore(dsn) as other_store:
        await accept_rooms(one_store, rooms, 10)
        async with (
            running(one_store, route_to(log.handler("one")), settings) as one,
            running(other_store, route_to(log.handler("other")), settings) as other,
        ):
            assert one.owner != other.owner
            await until(lambda: log.total() == 200)
            await drained(one_store)
            await asyncio.sleep(5 * settings.poll)  # time for a second (wrong) run to show
    assert log.total() == 200
    assert all(log.numbers(room) == list(range(10)) for room in rooms)
    assert log.overlaps == 0
    assert log.workers() == {"one", "other"}  # 5 lanes each at most: both had work


async def test_a_lane_not_here_is_left_to_the_process_that_can_handle_it(
    postgres_dsn: str,
) -> None:
    """One process cannot handle any item (NotHere: what it needs is another's): the
    other process, started later, gets every lane and handles each item once, in order.

    The first retries each item long before the next poll: without setting its lanes
    aside it would claim each again the moment it is due, and the other (which only
    polls) would almost never find one free and due."""
    dsn = await emptied(postgres_dsn)
    settings = attrs.evolve(SETTINGS, poll=0.5)
    rooms = rooms_of(4)
    log = SharedLog()
    refused: list[str] = []

    async def not_here(event: Event) -> None:
        assert event.event_id is not None
        refused.append(event.event_id)
        raise NotHere("not this process", retry_after=0.05, give_up_after=WAIT * 4)

    async with PostgresStore(dsn) as one_store, PostgresStore(dsn) as other_store:
        await accept_rooms(one_store, rooms, 5)
        async with running(one_store, route_to(not_here), settings):
            await until(lambda: len(set(refused)) == len(rooms))  # each lane tried here
            before = len(refused)
            async with running(other_store, route_to(log.handler("other")), settings):
                await until(lambda: log.total() == 20)
                await drained(one_store)
            # Set aside, each lane is tried here again once at most while the other has it
            # (without it: dozens of times).
            assert len(refused) - before <= len(rooms)
        assert await one_store.dead_letters() == []
    assert all(log.numbers(room) == list(range(5)) for room in rooms)
    assert log.overlaps == 0 and log.workers() == {"other"}


class DyingStore(PostgresStore):
    """A PostgreSQL store whose process dies: once ``dead``, it can't reach the database."""

    dead = False

    def _check_alive(self) -> None:
        if self.dead:
            raise ConnectionError("the process is gone")

    async def renew_lanes(self, owner: str, lanes: Collection[str], lease: float) -> set[str]:
        self._check_alive()
        return await super().renew_lanes(owner, lanes, lease)

    async def release_lane(self, owner: str, lane: str) -> None:
        self._check_alive()
        await super().release_lane(owner, lane)

    async def claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        self._check_alive()
        return await super().claim_lanes(owner, lease, limit, exclude)


async def test_a_dead_process_s_rooms_are_taken_over_when_its_lease_runs_out(
    postgres_dsn: str,
) -> None:
    dsn = await emptied(postgres_dsn)
    # A hung handler, not a slow one: no timeout releases its rooms in the meantime.
    settings = attrs.evolve(SETTINGS, concurrency=5, lease=1.0, timeout=60.0)
    rooms = rooms_of(20)
    log = SharedLog()
    stuck: set[str] = set()
    never = asyncio.Event()

    async def hang(event: Event) -> None:
        assert event.room_id is not None
        stuck.add(event.room_id)
        await never.wait()

    dying_store = DyingStore(dsn)
    async with dying_store, PostgresStore(dsn) as live_store:
        await accept_rooms(dying_store, rooms, 5)
        dying = Inbox(dying_store, route_to(hang), appservice_id=APPSERVICE, settings=settings)
        await dying.start()
        try:
            await until(lambda: len(stuck) == settings.concurrency)
            async with running(live_store, route_to(log.handler("live")), settings):
                others = set(rooms) - stuck
                await until(lambda: all(len(log.handled[room]) == 5 for room in others))
                # The hanging process still renews its leases, so its rooms wait.
                await asyncio.sleep(1.5 * settings.lease)
                assert not stuck & set(log.handled)
                died_at = time.monotonic()
                dying_store.dead = True
                await stop(dying)  # its leases stay behind, as after a crash
                await until(lambda: log.total() == 100)
                await drained(live_store)
        finally:
            dying_store.dead = False
            await stop(dying)
    assert all(log.numbers(room) == list(range(5)) for room in rooms)
    assert log.overlaps == 0
    # Taken over when the lease ran out (it was renewed at most lease/3 before the end).
    for room in stuck:
        assert log.first_at[room] - died_at >= 0.5 * settings.lease


# -- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_retries_dead_letters_and_the_inbox_depth(store: Store) -> None:
    metrics = Metrics()
    calls: collections.Counter[str | None] = collections.Counter()

    async def handler(event: Event) -> None:
        calls[event.event_id] += 1
        if event.event_id == "$bad" or (event.event_id == "$flaky" and calls["$flaky"] == 1):
            raise RuntimeError("no")

    inbox = Inbox(
        store, route_to(handler), appservice_id=APPSERVICE, settings=SETTINGS, metrics=metrics,
        event_types=lambda: {"m.room.message"},
    )  # fmt: skip
    events = [message("ok1", A), message("flaky", A), message("ok2", A), message("bad", B)]
    items, rejected = split_transaction({"events": [*events, {"type": None}]})
    before = time.time()
    assert await store.accept_transaction("t1", items, rejected)
    stats = await inbox.refresh_stats()
    assert (stats.depth, stats.dead_letters) == (4, 1)
    assert stats.oldest_received_at is not None and stats.oldest_received_at >= before - 1
    assert metric(metrics, "bridge_kit_inbox_events") == 4
    assert metric(metrics, "bridge_kit_dead_letters") == 1
    assert 0 <= metric(metrics, "bridge_kit_inbox_oldest_seconds") < 60

    await inbox.start()
    try:
        inbox.wake()
        await drained(store)
    finally:
        await stop(inbox)
    stats = await inbox.refresh_stats()
    assert (stats.depth, stats.oldest_received_at, stats.dead_letters) == (0, None, 2)
    assert metric(metrics, "bridge_kit_inbox_events") == 0
    assert metric(metrics, "bridge_kit_inbox_oldest_seconds") == 0
    assert metric(metrics, "bridge_kit_dead_letters") == 2
    assert metric(metrics, "bridge_kit_handler_retries_total") == 1 + (SETTINGS.attempts - 1)
    assert metric(metrics, "bridge_kit_dead_lettered_total", reason="handler") == 1
    runs = sum(calls.values())
    assert runs == 2 + 2 + SETTINGS.attempts
    count = metric(metrics, "bridge_kit_handler_seconds_count", event_type="m.room.message")
    assert count == runs


# -- found in review: failures around the handler, leases, odd text -------------------------


async def test_a_traceback_that_no_store_can_encode_still_ends_as_a_dead_letter(
    any_store: Store,
) -> None:
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        name = os.fsdecode(b"/tmp/\xff.png")  # a lone surrogate, as from a non-UTF-8 file name
        raise RuntimeError(f"upload of {name} failed")

    async with running(any_store, route_to(handler)) as inbox:
        await accept(any_store, "t1", [message("x", A)])
        inbox.wake()
        await drained(any_store)
    [letter] = await any_store.dead_letters()
    assert calls == SETTINGS.attempts
    assert "upload of /tmp/\\udcff.png failed" in letter.error


async def test_a_failing_store_backs_the_lane_off_instead_of_looping(memory: Store) -> None:
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1

    async def broken_complete(item_ids: Collection[int]) -> None:
        raise StoreError("the disk is full")

    memory.complete_items = broken_complete  # type: ignore[method-assign]
    settings = attrs.evolve(SETTINGS, backoff=0.2, backoff_max=0.4)
    async with running(memory, route_to(handler), settings) as inbox:
        await accept(memory, "t1", [message("x", A)])
        inbox.wake()
        await asyncio.sleep(1.0)
    # Without a back-off the handler ran hundreds of times a second.
    assert 1 <= calls <= 15, calls


async def test_a_cancelled_sub_task_counts_as_a_handler_failure(memory: Store) -> None:
    calls = 0

    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        task = asyncio.ensure_future(asyncio.sleep(10))
        task.cancel()
        await task  # raises CancelledError inside the handler, not for the worker

    async with running(memory, route_to(handler)) as inbox:
        await accept(memory, "t1", [message("x", A)])
        inbox.wake()
        await drained(memory)
    [letter] = await memory.dead_letters()
    assert calls == SETTINGS.attempts
    assert "CancelledError" in letter.error


def test_the_backoff_of_a_huge_attempt_number_is_the_cap() -> None:
    settings = InboxSettings(backoff=1.0, backoff_max=300.0)
    assert 150.0 <= settings.retry_delay(100_000, random.Random(1)) <= 300.0


async def test_a_lease_that_cannot_be_renewed_stops_the_lane_before_it_runs_out(
    memory: Store,
) -> None:
    started: list[str | None] = []

    async def handler(event: Event) -> None:
        started.append(event.event_id)
        await asyncio.sleep(0.3)

    async def unreachable(owner: str, lanes: Collection[str], lease: float) -> set[str]:
        raise StoreError("the database went away")

    real_claim = memory.claim_lanes
    claims = 0

    async def claim_once(
        owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        nonlocal claims
        claims += 1
        if claims > 1:
            raise StoreError("the database went away")
        return await real_claim(owner, lease, limit, exclude)

    # The database is gone after the first claim: no renewal, no new claim.
    memory.claim_lanes = claim_once  # type: ignore[method-assign]
    memory.renew_lanes = unreachable  # type: ignore[method-assign]
    settings = attrs.evolve(SETTINGS, lease=1.0)
    async with running(memory, route_to(handler), settings) as inbox:
        await accept(memory, "t1", [message(f"e{n}", A, n) for n in range(20)])
        inbox.wake()
        await asyncio.sleep(0.8)  # past half the lease, before it ends
        during = len(started)
        await asyncio.sleep(0.4)  # the lease has run out: another process may have the room
        after = len(started)
    # Work stopped at half the lease (a handler takes 0.3 s) and not later.
    assert 1 <= during <= 3, started
    assert after == during, started
    assert len(set(started)) == len(started), started


async def test_a_released_lane_is_not_claimed_again_before_the_release_is_done(
    memory: Store,
) -> None:
    handled: list[str | None] = []
    releases = 0
    real_release = memory.release_lane

    async def slow_release(owner: str, lane: str) -> None:
        nonlocal releases
        releases += 1
        await asyncio.sleep(0.2)
        await real_release(owner, lane)

    async def handler(event: Event) -> None:
        handled.append(event.event_id)

    memory.release_lane = slow_release  # type: ignore[method-assign]
    async with running(memory, route_to(handler)) as inbox:
        await accept(memory, "t1", [message("first", A)])
        inbox.wake()
        await until(lambda: len(handled) == 1)
        await asyncio.sleep(0.05)  # the release of the now empty lane is under way
        await accept(memory, "t2", [message("second", A, 1)])
        inbox.wake()
        await until(lambda: len(handled) == 2)
        await asyncio.sleep(0.5)
        held = await memory.renew_lanes(inbox.owner, [A], 1.0)
    assert handled == ["$first", "$second"]
    assert held == set(), "a stale release must not leave a lease behind, nor delete a new one"


async def test_stop_returns_even_when_a_handler_ignores_its_cancellation(memory: Store) -> None:
    async def stubborn(event: Event) -> None:
        for _ in range(3):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3)

    inbox = Inbox(memory, route_to(stubborn), appservice_id=APPSERVICE, settings=SETTINGS)
    await inbox.start()
    await accept(memory, "t1", [message("x", A)])
    inbox.wake()
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await stop(inbox, grace=0.1)
    # The handler would have held stop() for about 9 s: it was abandoned instead.
    assert time.monotonic() - started < 8


async def test_the_handler_time_metric_names_only_handled_types(memory: Store) -> None:
    metrics = Metrics()

    async def handler(event: Event) -> None:
        pass

    inbox = Inbox(
        memory, route_to(handler), appservice_id=APPSERVICE, settings=SETTINGS, metrics=metrics,
        event_types=lambda: {"m.room.message"},
    )  # fmt: skip
    await inbox.start()
    try:
        odd = [{**message(f"x{n}", A, n), "type": f"x.random.{n}"} for n in range(30)]
        await accept(memory, "t1", [message("m", A, 100), *odd])
        inbox.wake()
        await drained(memory)
    finally:
        await stop(inbox)
    body = metrics.render()[0].decode()
    assert 'event_type="m.room.message"' in body
    assert 'event_type="other"' in body
    assert "x.random" not in body


async def test_a_lone_surrogate_is_stored_and_handled_not_refused_forever(any_store: Store) -> None:
    got: list[Any] = []

    async def handler(event: Event) -> None:
        got.append(event.content["body"])

    body = json.loads(
        '{"events": [{"type": "m.room.message", "room_id": "!a:test.local", "event_id": "$s",'
        ' "content": {"body": "half a pair: \\ud800"}},'
        ' {"type": "m.room.message", "room_id": "!\\udfff:test.local", "event_id": "$r",'
        ' "content": {}}]}'
    )
    processor = TransactionProcessor(any_store)
    assert await processor.process("t1", body)
    async with running(any_store, route_to(handler)) as inbox:
        inbox.wake()
        await drained(any_store)
    assert got == ["half a pair: \ud800"]
    [letter] = await any_store.dead_letters()
    assert "room_id is not Unicode" in letter.error
