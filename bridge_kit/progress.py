"""Progress display for bulk puppet registration, with no dependency beyond the stdlib.

On a terminal, :class:`ProgressReporter` redraws one line (a bar, the count,
the rate and the time left) in place with ``\\r``; in a log or a pipe it
prints a plain line every few seconds instead. :func:`format_summary` renders
the final counts.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

import attrs

if TYPE_CHECKING:
    from bridge_kit.puppets import BulkProgress, BulkResult

__all__ = ["ProgressReporter", "format_duration", "format_summary"]

_BAR_WIDTH = 24
_TTY_INTERVAL = 0.2
_PLAIN_INTERVAL = 5.0


class ProgressReporter:
    """A ``progress`` callback for :meth:`~bridge_kit.puppets.PuppetRegistrar.register_many`.

    Lines go to ``stream`` (default stderr). ``tty`` defaults to whether it is
    a terminal; ``interval`` is the least time between two lines (default
    0.2 s on a terminal, 5 s otherwise). ``total`` stands in for an input
    length the run cannot know; ``enabled=False`` draws nothing. At the end,
    :meth:`finish` prints the summary (to ``summary_stream``, default stdout).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        total: int | None = None,
        enabled: bool = True,
        tty: bool | None = None,
        interval: float | None = None,
        summary_stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.summary_stream = summary_stream
        self.total = total
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else _default_interval(self.tty)
        self._last_drawn = float("-inf")
        self._last_width = 0
        self._pending: BulkProgress | None = None

    def __call__(self, progress: BulkProgress) -> None:
        if not self.enabled:
            return
        if progress.total is None and self.total is not None:
            progress = attrs.evolve(progress, total=self.total)
        self._pending = progress
        now = time.monotonic()
        if now - self._last_drawn < self.interval:
            return
        self._last_drawn = now
        self._draw(progress)

    def close(self) -> None:
        """On a terminal, draw the last snapshot if it was throttled away and end the line."""
        if not self.tty:
            return
        if self._pending is not None:
            self._draw(self._pending)
        if self._last_width:
            self.stream.write("\n")
            self.stream.flush()
            self._last_width = 0

    def finish(self, result: BulkResult) -> None:
        """:meth:`close`, then print the summary of ``result``."""
        self.close()
        out = self.summary_stream if self.summary_stream is not None else sys.stdout
        out.write(format_summary(result) + "\n")
        out.flush()

    def _draw(self, progress: BulkProgress) -> None:
        self._pending = None
        if self.tty:
            line = bar_line(progress)
            padding = " " * max(self._last_width - len(line), 0)
            self.stream.write("\r" + line + padding)
            self._last_width = len(line)
        else:
            self.stream.write(plain_line(progress) + "\n")
        self.stream.flush()


def bar_line(progress: BulkProgress) -> str:
    """``[=====>    ]  45% 45,000/100,000  1,203/s  ETA 0:45``; no bar without a total."""
    rate = f"{progress.rate:,.0f}/s"
    if progress.total:
        fraction = min(progress.done / progress.total, 1.0)
        filled = int(fraction * _BAR_WIDTH)
        arrow = ">" if filled < _BAR_WIDTH else ""
        bar = "=" * filled + arrow + " " * (_BAR_WIDTH - filled - len(arrow))
        eta = format_duration(progress.eta) if progress.eta is not None else "?"
        return f"[{bar}] {fraction:4.0%} {progress.done:,}/{progress.total:,}  {rate}  ETA {eta}"
    return f"{progress.done:,} done  {rate}  {format_duration(progress.elapsed)} elapsed"


def plain_line(progress: BulkProgress) -> str:
    """One self-contained log line: position, rate, time left and the counts so far."""
    if progress.total:
        eta = format_duration(progress.eta) if progress.eta is not None else "?"
        where = (
            f"{progress.done:,}/{progress.total:,} "
            f"({progress.done / progress.total:.0%}), ETA {eta}"
        )
    else:
        where = f"{progress.done:,} done"
    return (
        f"progress: {where}, {progress.rate:,.0f}/s; "
        f"{progress.registered:,} registered, {progress.already_existed:,} already existed, "
        f"{progress.skipped_known:,} skipped, {progress.invalid:,} invalid, "
        f"{progress.failed:,} failed; concurrency {progress.concurrency}"
    )


def format_summary(result: BulkResult) -> str:
    """The five counts, one per line, then how the run ended."""
    rows = [
        ("registered", result.registered),
        ("already existed", result.already_existed),
        ("skipped (known)", result.skipped_known),
        ("invalid", result.invalid),
        ("failed", result.failed),
    ]
    if result.duplicates:
        rows.append(("duplicates ignored", result.duplicates))
    if result.dry_run:
        rows.append(("would register", result.would_register))
    width = max(len(f"{count:,}") for _, count in rows)
    lines = [f"  {label:<19}{count:>{width},}" for label, count in rows]
    rate = result.done / result.elapsed if result.elapsed > 0 else 0.0
    lines.append(f"finished in {format_duration(result.elapsed)} ({rate:,.0f}/s)")
    if result.rate_limited:
        lines.append(
            f"rate limited {result.rate_limited:,} times; "
            f"concurrency went down to {result.lowest_concurrency}"
        )
    if result.aborted:
        lines.append(f"ABORTED: {result.aborted}")
    elif result.cancelled:
        lines.append("cancelled: run the same command again to resume")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:34``, ``1:02:03``; fractions of a second below ten seconds."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def _default_interval(tty: bool) -> float:
    return _TTY_INTERVAL if tty else _PLAIN_INTERVAL
