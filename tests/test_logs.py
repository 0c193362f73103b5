"""The daemon's per-transaction and per-event log lines, and their rate limit (issue 13).

The limiter's clock is injected: no test sleeps.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest

from bridge_kit.inbox.handlers import _logged
from bridge_kit.inbox.lanes import handler_name
from bridge_kit.inbox.transactions import TransactionProcessor
from bridge_kit.logs import LogLimiter
from bridge_kit.store import MemoryStore
from bridge_kit.types import Event

LOGGER = "tests.test_logs"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **options: Any) -> LogLimiter:
    settings: dict[str, Any] = {"burst": 3, "interval": 10.0} | options
    return LogLimiter(
        logging.getLogger(LOGGER), logging.INFO, what="things", clock=clock, **settings
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_flood_writes_the_burst_then_one_summary_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limit = limiter(clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for i in range(1000):  # 1,000 lines over 20 s
            clock.now = 1000.0 + i * 0.02
            limit.log("thing %d", i, totals={"events": 2})
    written = lines(caplog)
    summaries = [line for line in written if line.startswith("...")]
    assert written[:3] == ["thing 0", "thing 1", "thing 2"]
    assert len(written) == 3 + 1 + 3  # the first window, its summary, the second window
    assert summaries == [
        "... 497 more things in the last 10 s (events: 994) "
        "(not logged one by one: at most 3 per 10 s)"
    ]
    assert written[4:] == ["thing 500", "thing 501", "thing 502"]


def test_flush_writes_the_last_summary_only_once_its_window_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limit = limiter(clock, burst=1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        limit.log("first")
        limit.log("held back")
        limit.flush()
        assert lines(caplog) == ["first"]
        clock.now += 10.0
        limit.flush()
        limit.flush()
    assert lines(caplog) == [
        "first",
        "... 1 more things in the last 10 s (not logged one by one: at most 1 per 10 s)",
    ]


def test_a_quiet_stream_is_written_whole(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limit = limiter(clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for i in range(10):
            clock.now += 5.0  # two lines per 10 s window, under the burst of three
            limit.log("thing %d", i)
    assert lines(caplog) == [f"thing {i}" for i in range(10)]


def test_a_level_that_is_off_costs_no_line_and_no_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limit = limiter(clock, burst=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):
            limit.log("quiet")
        clock.now += 20
        limit.flush()
    assert lines(caplog) == []


def test_the_limits_must_make_sense() -> None:
    with pytest.raises(ValueError):
        limiter(Clock(), burst=0)
    with pytest.raises(ValueError):
        limiter(Clock(), interval=0)


def message(n: int) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": f"$e{n}",
        "room_id": "!r:x.org",
        "sender": "@a:x.org",
        "origin_server_ts": 1,
        "content": {"body": str(n)},
    }


async def test_each_accepted_transaction_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with MemoryStore() as store:
        processor = TransactionProcessor(store)
        with caplog.at_level(logging.INFO, logger="bridge_kit.inbox.transactions"):
            for txn in range(3):
                await processor.process(str(txn), {"events": [message(txn), message(txn + 10)]})
            # Synapse's retry of transaction 1: the same events (a digest match)
            await processor.process("1", {"events": [message(1), message(11)]})
            await processor.process("9", {"events": [message(9), {"type": 1}]})
    written = [r.getMessage() for r in caplog.records if r.name == "bridge_kit.inbox.transactions"]
    accepted = [line for line in written if line.startswith("accepted transaction")]
    assert [line.split(" in ")[0] for line in accepted] == [
        "accepted transaction 0: 2 events",
        "accepted transaction 1: 2 events",
        "accepted transaction 2: 2 events",
        "accepted transaction 9: 1 events (+1 invalid)",
    ]
    assert all(line.endswith(" ms") for line in accepted)
    assert "transaction 1 was accepted before: acknowledged again, nothing stored" in written


async def test_a_flood_of_transactions_is_summarised(caplog: pytest.LogCaptureFixture) -> None:
    async with MemoryStore() as store:
        processor = TransactionProcessor(store)
        clock = Clock()
        processor.log = LogLimiter(
            logging.getLogger("bridge_kit.inbox.transactions"), logging.INFO,
            what="transactions", burst=5, interval=10.0, clock=clock,
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="bridge_kit.inbox.transactions"):
            for txn in range(150):
                await processor.process(str(txn), {"events": [message(txn)]})
            clock.now += 10
            processor.log.flush()
    written = [r.getMessage() for r in caplog.records if r.name == "bridge_kit.inbox.transactions"]
    assert len(written) == 6
    assert written[-1].startswith("... 145 more transactions in the last 10 s (events: 145)")


# -- the per-event DEBUG line -----------------------------------------------------------


async def plain(event: Event) -> None:
    pass


async def with_option(event: Event, *, option: int) -> None:
    pass


class Callable:
    async def __call__(self, event: Event) -> None:
        pass


class Bridge:
    async def on_message(self, event: Event) -> None:
        pass


@pytest.mark.parametrize(
    "handler",
    [
        plain,
        functools.partial(with_option, option=1),
        Callable(),
        Bridge().on_message,
        lambda event: plain(event),
    ],
    ids=["function", "partial", "callable object", "bound method", "lambda"],
)
def test_the_logging_wrapper_keeps_the_handlers_name(handler: Any) -> None:
    # The inbox keys a handler's progress and its sends' txn IDs by this name.
    wrapped = _logged(handler, limiter(Clock()))
    assert handler_name(wrapped) == handler_name(handler)


async def test_a_handled_event_is_one_debug_line_and_a_failed_one_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from bridge_kit.types.converter import converter

    async def failing(event: Event) -> None:
        raise RuntimeError("no")

    event = converter.structure(message(1), Event)
    limit = LogLimiter(logging.getLogger(LOGGER), logging.DEBUG, what="events handled")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        await _logged(plain, limit)(event)
        with pytest.raises(RuntimeError):
            await _logged(failing, limit)(event)
    assert lines(caplog) == ["handled $e1 (m.room.message) in !r:x.org from @a:x.org"]
