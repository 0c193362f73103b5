"""The inbox commits a lane's completions in batches: order, bounds, failures, crashes.

Against real stores (memory and SQLite; the store API itself is tested on
PostgreSQL too in test_inbox_store). The store's inbox methods are wrapped to
log when each write happens, next to the handlers' own log, so the tests can
check what was committed when.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from bridge_kit import defaults
from bridge_kit.errors import NotReady, StoreError
from bridge_kit.inbox import Inbox, handler_name
from bridge_kit.store import Store, open_store
from bridge_kit.store.records import NewDeadLetter
from bridge_kit.types import Event
from tests.test_inbox import (
    APPSERVICE,
    SETTINGS,
    A,
    B,
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
#: Batches only as lane_items reads them: no cap by count or time gets in the way.
BY_READ = attrs.evolve(SETTINGS, completion_batch=1_000, completion_delay=60.0)


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
            raise AssertionError("the inbox completes items in batches now")

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

        async def bury(item_id: int, letter: NewDeadLetter) -> None:
            self.log.append(("bury", self.numbers[item_id]))
            await bury_item(item_id, letter)

        store.complete_item = complete_one  # type: ignore[method-assign]
        store.complete_items = complete_many  # type: ignore[method-assign]
        store.fail_item = fail  # type: ignore[method-assign]
        store.bury_item = bury  # type: ignore[method-assign]

    async def fill(self, lane: str, count: int, prefix: str = "") -> None:
        """``count`` events numbered 0.. in ``lane``, in transactions of 100."""
        for start in range(0, count, 100):
            events = [message(f"{prefix}{lane}/{n}", lane, n) for n in range(start, count)][:100]
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

    def check_never_early(self) -> None:
        """No item was committed as complete before its handler returned."""
        ended: set[int] = set()
        for what, value in self.log:
            if what == "end":
                ended.add(value)
            elif what == "complete":
                assert set(value) <= ended, (value, sorted(ended))


async def test_one_commit_per_batch_read_in_order_and_never_before_the_handler(
    store: Store,
) -> None:
    watched = Watched(store)
    await watched.fill(A, 120)
    async with running(store, route_to(watched.handler()), BY_READ) as inbox:
        inbox.wake()
        await drained(store)
    assert watched.ends() == list(range(120))
    # lane_items reads 50 at a time; each read's items are committed together.
    assert watched.commits() == [tuple(range(50)), tuple(range(50, 100)), tuple(range(100, 120))]
    watched.check_never_early()


async def test_a_batch_is_capped_by_count_and_by_time(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 60)
    by_count = attrs.evolve(BY_READ, completion_batch=7)
    async with running(store, route_to(watched.handler()), by_count) as inbox:
        inbox.wake()
        await drained(store)
    sizes = [len(commit) for commit in watched.commits()]
    assert sizes == [7] * 7 + [1] + [7] + [3]  # 50 read: 7 x 7 + 1; then 10 read: 7 + 3
    assert [n for commit in watched.commits() for n in commit] == list(range(60))

    watched.log.clear()
    await watched.fill(A, 5, prefix="again")
    at_once = attrs.evolve(BY_READ, completion_delay=0.0)  # due as soon as there is one
    async with running(store, route_to(watched.handler()), at_once) as inbox:
        inbox.wake()
        await drained(store)
    assert watched.commits() == [(0,), (1,), (2,), (3,), (4,)]
    watched.check_never_early()


@pytest.mark.parametrize("outcome", ["retry", "dead letter", "not ready"])
async def test_a_failure_mid_batch_commits_the_earlier_completions_first(
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

    async with running(store, route_to(flaky), BY_READ) as inbox:
        inbox.wake()
        await drained(store)
    first_write = next(i for i, (what, _) in enumerate(watched.log) if what in ("fail", "bury"))
    assert watched.log[first_write - 1] == ("complete", tuple(range(6)))
    handled = list(range(10)) if outcome == "retry" else [n for n in range(10) if n != 6]
    assert watched.ends() == handled
    assert sorted(n for commit in watched.commits() for n in commit) == handled
    watched.check_never_early()


async def test_partial_progress_of_a_failed_item_stays_in_the_batch_s_store(store: Store) -> None:
    """Handler progress (done_handlers) is still written with the failure, and the
    handlers that succeeded are not run again, batch or not."""
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

    settings = attrs.evolve(BY_READ, backoff=0.4, backoff_max=0.4)
    async with running(store, route_to(first, second), settings) as inbox:
        inbox.wake()
        await until(lambda: ("fail", 3) in watched.log)
        [retried, *_] = await store.lane_items(A, 10)
        assert watched.numbers[retried.id] == 3
        assert retried.done_handlers == (handler_name(first),)
        await drained(store)
    assert runs.count(("first", 3)) == 1
    assert runs.count(("second", 3)) == 2
    assert [n for what, n in runs if what == "first"] == list(range(5))


async def test_stop_commits_the_pending_completions(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 10)
    await watched.fill(B, 10)
    record = watched.handler()
    release = asyncio.Event()

    async def pause_at_four(event: Event) -> None:
        if event.content["n"] == 4:
            await release.wait()
        await record(event)

    inbox = Inbox(store, route_to(pause_at_four), appservice_id=APPSERVICE, settings=BY_READ)
    await inbox.start()
    inbox.wake()
    await until(lambda: inbox.busy_lanes == 2 and len(watched.ends()) == 8)
    assert watched.commits() == []  # 0-3 of both rooms handled, nothing committed yet
    # Both handlers of event 4 finish within the grace; then the workers stop.
    stopping = asyncio.ensure_future(stop(inbox, grace=1.0))
    await asyncio.sleep(0.1)
    release.set()
    await stopping
    assert (await store.inbox_stats()).depth == 10 - 5 + 10 - 5
    assert sorted(watched.commits()) == [tuple(range(5)), tuple(range(5))]
    watched.check_never_early()


async def test_stop_with_a_cancelled_handler_still_commits_the_ones_before(store: Store) -> None:
    watched = Watched(store)
    await watched.fill(A, 10)
    record = watched.handler()

    async def hang_at_four(event: Event) -> None:
        if event.content["n"] == 4:
            await asyncio.Event().wait()
        await record(event)

    inbox = Inbox(store, route_to(hang_at_four), appservice_id=APPSERVICE, settings=BY_READ)
    await inbox.start()
    inbox.wake()
    await until(lambda: len(watched.ends()) == 4)
    await stop(inbox, grace=0.1)
    assert watched.commits() == [tuple(range(4))]
    assert [watched.numbers[item.id] for item in await store.lane_items(A, 20)] == list(
        range(4, 10)
    )


async def test_a_failed_completion_commit_loses_nothing_and_re_runs_only_its_batch(
    store: Store,
) -> None:
    watched = Watched(store)
    await watched.fill(A, 120)
    watched.failing_commits = {2}  # the second batch's commit fails, once
    settings = attrs.evolve(BY_READ, backoff=0.05, backoff_max=0.1)
    async with running(store, route_to(watched.handler()), settings) as inbox:
        inbox.wake()
        await drained(store)
    ends = watched.ends()
    failed = watched.commits()[1]
    assert failed == tuple(range(50, 100))
    # Every event handled, in order; the failed batch's events, and only they, twice.
    assert ends == list(range(100)) + list(range(50, 120))
    assert (await store.inbox_stats()).depth == 0
    watched.check_never_early()


async def test_a_sigkill_re_runs_at_most_one_batch_of_handled_events(tmp_path: Path) -> None:
    """A real crash: the subprocess handles a flood of one room and SIGKILLs itself
    while handling event 75; the next process re-runs what was not committed."""
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    record = tmp_path / "handled.txt"
    crash_at, count = 75, 200
    async with open_store(url) as store:
        await Watched(store).fill(A, count)
    crasher = await asyncio.create_subprocess_exec(
        sys.executable, str(CRASHER), url, str(record), str(crash_at),
        env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    async with asyncio.timeout(60):
        assert await crasher.wait() == -9  # SIGKILL, not a clean exit
    first_run = [int(line) for line in record.read_text().split()]
    assert first_run == list(range(crash_at + 1))

    record.unlink()
    async with open_store(url) as store:
        await store.lock_for_daemon()  # as a daemon starts: the dead one's lease goes
        watched = Watched(store)
        left = await store.lane_items(A, count)
        for item in left:
            watched.numbers[item.id] = json.loads(item.event_json)["content"]["n"]
        resumed_at = watched.numbers[left[0].id]
        async with running(store, route_to(watched.handler())) as inbox:
            inbox.wake()
            await drained(store)
    # The first 50 (one lane_items read) were committed before the next read; of the
    # rest, at most completion_batch handled events come again, with the one that
    # was running when the process died.
    assert 50 <= resumed_at <= crash_at
    assert crash_at - resumed_at <= defaults.COMPLETION_BATCH
    assert watched.ends() == list(range(resumed_at, count))
