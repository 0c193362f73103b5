"""The inbox commits each handled event before its lane's next one, in commits
shared by the lanes: order, sharing, failures, crashes.

Against real stores (memory and SQLite; the store API itself is tested on
PostgreSQL too in test_inbox_store). The store's inbox methods are wrapped to
log when each write happens, next to the handlers' own log, so the tests can
check what was committed when.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import attrs
import pytest

from bridge_kit.errors import StoreError
from bridge_kit.inbox._lane_worker import GroupCommit
from bridge_kit.inbox.lanes import Inbox, handler_name
from bridge_kit.inbox.records import NewDeadLetter
from bridge_kit.inbox.signals import NotReady
from bridge_kit.store import Store, open_store
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
    route_to,
    running,
    stop,
    until,
)
from tests.test_store import backend_url, emptied

CRASHER = Path(__file__).parent / "helpers" / "inbox_crasher.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(await emptied(backend_url(request, tmp_path))) as opened:
        yield opened


class Watched:
    """A store's inbox writes and the handlers' ends, in the order they happened.

    Entries: ``("end", n)`` when a handler returned for event ``n``,
    ``("complete", (n, ...))``, ``("fail", n)``, ``("bury", n)`` when the store
    was asked to write; ``n`` is the event's ``content.n``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.log: list[tuple[str, Any]] = []
        self.numbers: dict[int, int] = {}  # item id: its event's n
        self.failing_commits: set[int] = set()  # which complete_items calls fail (1-based)
        self._wrap()

    def _wrap(self) -> None:
        store = self.store
        complete_items, fail_item, bury_item = (
            store.complete_items, store.fail_item, store.bury_item,
        )  # fmt: skip

        async def complete_one(item_id: int) -> None:
            raise AssertionError("the inbox completes items through complete_items")

        async def complete_many(item_ids: Collection[int]) -> None:
            self.log.append(("complete", tuple(self.numbers[i] for i in item_ids)))
            if len(self.commits()) in self.failing_commits:
                raise StoreError("the disk is full")
            await complete_items(item_ids)

        async def fail(
            item_id: int,
            done_handlers: Sequence[str],
            not_before: float,
            *,
            count_attempt: bool = True,
        ) -> None:
            self.log.append(("fail", self.numbers[item_id]))
            await fail_item(item_id, done_handlers, not_before, count_attempt=count_attempt)
            # Logged again once written: a reader of the store must wait for this one.
            self.log.append(("failed", self.numbers[item_id]))

        async def bury(item_id: int, letter: NewDeadLetter) -> None:
            self.log.append(("bury", self.numbers[item_id]))
            await bury_item(item_id, letter)

        store.complete_item = complete_one  # type: ignore[method-assign]
        store.complete_items = complete_many  # type: ignore[method-assign]
        store.fail_item = fail  # type: ignore[method-assign]
        store.bury_item = bury  # type: ignore[method-assign]

    async def fill(self, lane: str, count: int, prefix: str = "", first: int = 0) -> None:
        """``count`` events numbered ``first``.. in ``lane``, in transactions of 100."""
        numbers = range(first, first + count)
        for start in range(0, count, 100):
            events = [message(f"{prefix}{lane}/{n}", lane, n) for n in numbers[start : start + 100]]
            await accept(self.store, f"{prefix}{lane}/{start}", events)
        for item in await self.store.lane_items(lane, count + 1):
            self.numbers[item.id] = json.loads(item.event_json)["content"]["n"]

    def handler(self) -> Any:
        async def record(event: Event) -> None:
            self.log.append(("end", event.content["n"]))

        return record

    def commits(self) -> list[tuple[int, ...]]:
        return [entry[1] for entry in self.log if entry[0] == "complete"]

    def ends(self) -> list[int]:
        return [entry[1] for entry in self.log if entry[0] == "end"]

    def committed(self) -> list[int]:
        return sorted(n for commit in self.commits() for n in commit)

    def check_never_early(self) -> None:
        """No item was committed as complete before its handler returned."""
        ended: set[int] = set()
        for what, value in self.log:
            if what == "end":
                ended.add(value)
            elif what == "complete":
                assert set(value) <= ended, (value, sorted(ended))

    def check_committed_before_next(self, numbers: Sequence[int]) -> None:
        """Each of these events (one lane's, in order) was committed before the
        next one's handler ended: a crash could have re-run only the one running."""
        committed: set[int] = set()
        for what, value in self.log:
            if what == "complete":
                committed.update(value)
            elif what == "end" and value in numbers and value != numbers[0]:
                earlier = numbers[numbers.index(value) - 1]
                assert earlier in committed, (value, earlier)


async def test_each_event_is_committed_before_its_lane_s_next_one(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 120)
    async with running(store, route_to(watched.handler())) as inbox:
        inbox.wake()
        await drained(store)
    assert watched.ends() == list(range(120))
    # One lane alone: nobody to share a commit with, so one commit per event.
    assert watched.commits() == [(n,) for n in range(120)]
    watched.check_committed_before_next(range(120))
    watched.check_never_early()


async def test_lanes_working_at_once_share_their_commits(store: Store) -> None:
    watched = Watched(store)
    rooms = [A, B, C, "!d:test.local"]
    for index, room in enumerate(rooms):
        await watched.fill(room, 30, first=100 * index)
    async with running(store, route_to(watched.handler())) as inbox:
        inbox.wake()
        await drained(store)
    every = [100 * index + n for index in range(len(rooms)) for n in range(30)]
    assert sorted(watched.ends()) == every
    assert watched.committed() == every
    # Lanes hand in their completions while a commit runs; the next one takes them all.
    assert max(len(commit) for commit in watched.commits()) > 1
    assert len(watched.commits()) < len(every)
    for index in range(len(rooms)):
        watched.check_committed_before_next(range(100 * index, 100 * index + 30))
    watched.check_never_early()


@pytest.mark.parametrize("outcome", ["retry", "dead letter", "not ready"])
async def test_a_failure_is_written_after_the_earlier_completions(
    store: Store, outcome: str
) -> None:
    watched = Watched(store)
    await watched.fill(A, 10)
    record = watched.handler()
    failures = 1 if outcome == "retry" else 10**6

    async def flaky(event: Event) -> None:
        nonlocal failures
        if event.content["n"] == 6 and failures:
            failures -= 1
            if outcome == "not ready":
                raise NotReady("keys missing", retry_after=0.05, give_up_after=0.3)
            raise RuntimeError("the remote network is down")
        await record(event)

    async with running(store, route_to(flaky)) as inbox:
        inbox.wake()
        await drained(store)
    first_write = next(i for i, (what, _) in enumerate(watched.log) if what in ("fail", "bury"))
    committed_before = {n for what, c in watched.log[:first_write] if what == "complete" for n in c}
    assert committed_before == set(range(6))
    handled = list(range(10)) if outcome == "retry" else [n for n in range(10) if n != 6]
    assert watched.ends() == handled
    assert watched.committed() == handled
    watched.check_committed_before_next(handled)
    watched.check_never_early()


async def test_partial_progress_of_a_failed_item_is_stored_with_the_failure(store: Store) -> None:
    """Handler progress (done_handlers) is written with the failure, and the
    handlers that succeeded are not run again."""
    watched = Watched(store)
    await watched.fill(A, 5)
    runs: list[tuple[str, int]] = []
    fail_once = {3}

    async def first(event: Event) -> None:
        runs.append(("first", event.content["n"]))

    async def second(event: Event) -> None:
        n = event.content["n"]
        runs.append(("second", n))
        if n in fail_once:
            fail_once.discard(n)
            raise RuntimeError("once")

    # The retry waits long enough for the test to read the item before it (a busy
    # machine can take a while between the write and the read).
    settings = attrs.evolve(SETTINGS, backoff=2.0, backoff_max=2.0)
    async with running(store, route_to(first, second), settings) as inbox:
        inbox.wake()
        await until(lambda: ("failed", 3) in watched.log)
        [retried, *_] = await store.lane_items(A, 10)
        assert watched.numbers[retried.id] == 3
        assert retried.done_handlers == (handler_name(first),)
        await drained(store)
    assert runs.count(("first", 3)) == 1
    assert runs.count(("second", 3)) == 2
    assert [n for what, n in runs if what == "first"] == list(range(5))


async def test_stop_commits_the_events_whose_handlers_returned(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 10)
    await watched.fill(B, 10, first=100)
    record = watched.handler()
    release = asyncio.Event()

    async def pause_at_four(event: Event) -> None:
        if event.content["n"] % 100 == 4:
            await release.wait()
        await record(event)

    inbox = Inbox(store, route_to(pause_at_four), appservice_id=APPSERVICE, settings=SETTINGS)
    await inbox.start()
    inbox.wake()
    await until(lambda: inbox.busy_lanes == 2 and len(watched.ends()) == 8)
    # 0-3 of both rooms handled and committed: each before its lane went on.
    await until(lambda: watched.committed() == [*range(4), *range(100, 104)])
    # Both handlers of event 4 finish within the grace; then the workers stop.
    stopping = asyncio.ensure_future(stop(inbox, grace=1.0))
    await asyncio.sleep(0.1)
    release.set()
    await stopping
    assert (await store.inbox_stats()).depth == 10 - 5 + 10 - 5
    assert watched.committed() == [*range(5), *range(100, 105)]
    watched.check_never_early()


async def test_stop_with_a_cancelled_handler_keeps_the_ones_before_committed(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 10)
    record = watched.handler()

    async def hang_at_four(event: Event) -> None:
        if event.content["n"] == 4:
            await asyncio.Event().wait()
        await record(event)

    inbox = Inbox(store, route_to(hang_at_four), appservice_id=APPSERVICE, settings=SETTINGS)
    await inbox.start()
    inbox.wake()
    await until(lambda: len(watched.ends()) == 4)
    await stop(inbox, grace=0.1)
    assert watched.committed() == list(range(4))
    assert [watched.numbers[item.id] for item in await store.lane_items(A, 20)] == list(
        range(4, 10)
    )


async def test_a_failed_commit_loses_nothing_and_re_runs_only_its_event(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 120)
    watched.failing_commits = {51}  # the commit of event 50 fails, once
    settings = attrs.evolve(SETTINGS, backoff=0.05, backoff_max=0.1)
    async with running(store, route_to(watched.handler()), settings) as inbox:
        inbox.wake()
        await drained(store)
    assert watched.commits()[50] == (50,)
    # Every event handled, in order; the one whose commit failed, and only it, twice.
    assert watched.ends() == list(range(51)) + list(range(50, 120))
    assert (await store.inbox_stats()).depth == 0
    watched.check_never_early()


async def test_a_sigkill_re_runs_at_most_the_running_event_of_each_room(tmp_path: Path) -> None:
    """A real crash: the subprocess handles three rooms at once and SIGKILLs itself
    while handling event 75 of room A; the next process re-runs, in each room, at
    most the event that was running (or waiting for its commit) there."""
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    record = tmp_path / "handled.txt"
    crash_at, count = 75, 200
    rooms = {A: 0, B: 1000, C: 2000}  # each room's first number
    async with open_store(url) as store:
        for room, first in rooms.items():
            await Watched(store).fill(room, count, first=first)
    crasher = await asyncio.create_subprocess_exec(
        sys.executable, str(CRASHER), url, str(record), str(crash_at),
        env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    async with asyncio.timeout(60):
        assert await crasher.wait() == -9  # SIGKILL, not a clean exit
    first_run = [int(line) for line in record.read_text().split()]
    assert [n for n in first_run if n < 1000] == list(range(crash_at + 1))

    record.unlink()
    async with open_store(url) as store:
        await store.lock_for_daemon()  # as a daemon starts: the dead one's lease goes
        watched = Watched(store)
        resumed_at: dict[str, int] = {}
        for room in rooms:
            left = await store.lane_items(room, count)
            for item in left:
                watched.numbers[item.id] = json.loads(item.event_json)["content"]["n"]
            resumed_at[room] = watched.numbers[left[0].id] if left else rooms[room] + count
        async with running(store, route_to(watched.handler())) as inbox:
            inbox.wake()
            await drained(store)
    assert resumed_at[A] == crash_at  # the running event, and nothing handled before it
    for room, first in rooms.items():
        handled = [n for n in first_run if first <= n < first + count]
        assert handled == list(range(first, first + len(handled)))
        # Either the last handled event's commit landed, or it runs once more.
        assert resumed_at[room] in (first + len(handled) - 1, first + len(handled)), room
        again = [n for n in watched.ends() if first <= n < first + count]
        assert again == list(range(resumed_at[room], first + count))


async def test_a_worker_stopped_while_its_commit_waits_keeps_its_lane_until_it_lands(
    postgres_dsn: str,
) -> None:
    """A worker cancelled (a stop's grace ran out, or its lease was lost) while its
    handled event's commit is still on its way must not release the lane before the
    commit lands: another daemon would read the event and handle it a second time."""
    url = await emptied(postgres_dsn)
    runs: list[tuple[str, int]] = []

    def recorder(who: str) -> Any:
        async def record(event: Event) -> None:
            runs.append((who, event.content["n"]))

        return record

    async with open_store(url) as one, open_store(url) as two:
        await accept(one, "t1", [message("m0")])
        (item,) = await one.lane_items(A, 10)
        # Another transaction holds the item's row: the first daemon's DELETE waits (as
        # behind a slow disk or a lock), while reads go on.
        blocker = await asyncpg.connect(url)
        try:
            locking = blocker.transaction()
            await locking.start()
            await blocker.execute(
                "SELECT 1 FROM bridge_kit_inbox WHERE id = $1 FOR UPDATE", item.id
            )
            first = Inbox(
                one, route_to(recorder("one")), appservice_id=APPSERVICE, settings=SETTINGS
            )
            await first.start()
            first.wake()
            await until(lambda: runs == [("one", 0)])
            stopping = asyncio.ensure_future(first.stop(grace=0.1))
            second = Inbox(
                two, route_to(recorder("two")), appservice_id=APPSERVICE, settings=SETTINGS
            )
            await second.start()
            try:
                await asyncio.sleep(1.0)  # many claims by the second daemon
                await locking.rollback()
                await asyncio.wait_for(stopping, 10)
                await drained(one)
                await asyncio.sleep(0.2)
            finally:
                await stop(second)
        finally:
            await blocker.close()
    assert runs == [("one", 0)]


def test_waiters_of_a_commit_cancelled_at_shutdown_are_let_go() -> None:
    """When the loop shuts down (asyncio.run cancels every task), a lane waiting for
    its commit and the commit itself are cancelled together: the wait must end."""

    async def scenario() -> None:
        async with open_store("memory://") as store:
            await accept(store, "t1", [message("m0")])
            (item,) = await store.lane_items(A, 10)
            never = asyncio.Event()

            async def stuck(item_ids: Collection[int]) -> None:
                await never.wait()

            store.complete_items = stuck  # type: ignore[method-assign]
            commits = GroupCommit(store)
            asyncio.ensure_future(commits.complete(item.id))  # noqa: RUF006 (left to asyncio.run)
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "asyncio.run hung on a lane waiting for a cancelled commit"
