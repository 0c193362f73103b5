"""Logging for the daemon: plain text or one JSON object per line, and a rate limit
for the lines written per event or transaction (:class:`LogLimiter`)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send bridge_kit's (and the bridge's) logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class LogLimiter:
    """At most ``burst`` lines per ``interval`` seconds; the rest are counted, not written.

    A flood (thousands of transactions a second) would otherwise fill the disk
    with one line each. While lines are held back, one summary line per
    ``interval`` says how many, with the sums of their ``totals``::

        limiter = LogLimiter(log, logging.INFO, what="transactions")
        limiter.log("accepted transaction %s: %d events", txn_id, n, totals={"events": n})
        # ... 1,234 more transactions in the last 10 s (events: 98,765)

    The summary of a window is written by the first call after it ends, or by
    :meth:`flush` (a running event loop calls it when the window ends, so the
    last summary of a burst does not wait for the next line). ``clock`` is for tests.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        *,
        what: str,
        burst: int = 20,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self.logger = logger
        self.level = level
        self.what = what
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window_start = clock()
        self._written = 0
        self._held = 0
        self._totals: dict[str, float] = {}
        self._flush_timer: asyncio.TimerHandle | None = None

    def log(self, msg: str, *args: object, totals: Mapping[str, float] | None = None) -> None:
        """Write ``msg % args`` unless this window's ``burst`` is used up; then count it."""
        if not self.logger.isEnabledFor(self.level):
            return
        now = self._clock()
        if now - self._window_start >= self.interval:
            self._close_window(now)
        if self._written < self.burst:
            self._written += 1
            self.logger.log(self.level, msg, *args)
            return
        self._held += 1
        for key, value in (totals or {}).items():
            self._totals[key] = self._totals.get(key, 0) + value
        if self._held == 1:
            # A little late rather than early: a timer may fire a moment before the
            # window's end, and then it would find nothing to close.
            self._schedule_flush(self._window_start + self.interval - now + 0.05)

    def flush(self) -> None:
        """Write the summary of the window if it has ended and held lines back."""
        self._flush_timer = None
        now = self._clock()
        if now - self._window_start >= self.interval:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        if self._held:
            sums = ", ".join(f"{key}: {value:,.6g}" for key, value in self._totals.items())
            self.logger.log(
                self.level,
                "... %s more %s in the last %.0f s%s (not logged one by one: at most %d per %g s)",
                f"{self._held:,}", self.what, now - self._window_start,
                f" ({sums})" if sums else "", self.burst, self.interval,
            )  # fmt: skip
        self._window_start = now
        self._written = 0
        self._held = 0
        self._totals = {}

    def _schedule_flush(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a test with its own clock): the next line or flush() writes it
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush_timer = loop.call_later(max(delay, 0.0), self.flush)
