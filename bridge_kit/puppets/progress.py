"""Progress display for bulk puppet registration and multi-step commands, stdlib only.

On a terminal, :class:`ProgressReporter` redraws one line (a bar, the count,
the rate and the time left) in place with ``\\r``; in a log or a pipe it
writes one plain line at the end, so a captured output holds no half-drawn
frames. :func:`format_summary` renders the final counts. :class:`Steps`
prints one line per step of a command (the demo), updated in place on a
terminal.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

import attrs

if TYPE_CHECKING:
    from bridge_kit.puppets.results import BulkProgress, BulkResult, RunProgress, RunResult

    Progress = BulkProgress | RunProgress
    Result = BulkResult | RunResult

__all__ = ["ProgressReporter", "Steps", "format_duration", "format_summary"]

_BAR_WIDTH = 24
_TTY_INTERVAL = 0.2
#: Erase from the cursor to the end of the line (after a shorter redraw).
_CLEAR_TO_END = "\x1b[K"


class ProgressReporter:
    """A ``progress`` callback for :meth:`~bridge_kit.puppets.PuppetRegistrar.register_many`.

    Lines go to ``stream`` (default stderr). ``tty`` defaults to whether it is
    a terminal. On a terminal the line is redrawn at most every ``interval``
    seconds (default 0.2), after ``prefix``. Elsewhere only the last snapshot
    is written, as one plain line when the run closes, unless an ``interval``
    is given: then also a plain line at most that often. ``total`` stands in
    for an input length the run cannot know; ``enabled=False`` draws nothing.
    At the end, :meth:`finish` prints the summary (to ``summary_stream``,
    default stdout).
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
        prefix: str = "",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.summary_stream = summary_stream
        self.total = total
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.prefix = prefix
        # A pipe or a log gets no periodic lines unless asked: captured output
        # should hold the outcome, not a stray snapshot from the middle of the run.
        default = _TTY_INTERVAL if self.tty else float("inf")
        self.interval = interval if interval is not None else default
        self._last_drawn = float("-inf")
        self._last_width = 0
        self._pending: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        if progress.total is None and self.total is not None:
            progress = attrs.evolve(progress, total=self.total)
        self._pending = progress
        now = time.monotonic()
        if self.interval == math.inf or now - self._last_drawn < self.interval:
            return  # drawn later, at the latest by close()
        self._last_drawn = now
        self._draw(progress)

    def close(self, *, end_line: bool = True) -> None:
        """Draw the last snapshot if it was throttled away; on a terminal, end the line
        (unless ``end_line`` is False: the caller rewrites it, as :class:`Steps` does)."""
        if self._pending is not None:
            self._draw(self._pending)
        if self.tty and self._last_width and end_line:
            self.stream.write("\n")
            self.stream.flush()
        self._last_width = 0

    def finish(self, result: Result) -> None:
        """:meth:`close`, then print the summary of ``result``."""
        self.close()
        out = self.summary_stream if self.summary_stream is not None else sys.stdout
        out.write(format_summary(result) + "\n")
        out.flush()

    def _draw(self, progress: Progress) -> None:
        self._pending = None
        if self.tty:
            line = self.prefix + bar_line(progress)
            padding = " " * max(self._last_width - len(line), 0)
            self.stream.write("\r" + line + padding)
            self._last_width = len(line)
        else:
            self.stream.write(plain_line(progress) + "\n")
        self.stream.flush()


def bar_line(progress: Progress) -> str:
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


def plain_line(progress: Progress) -> str:
    """One self-contained log line: position, rate, time left and the counts so far."""
    if progress.total:
        eta = format_duration(progress.eta) if progress.eta is not None else "?"
        where = (
            f"{progress.done:,}/{progress.total:,} "
            f"({progress.done / progress.total:.0%}), ETA {eta}"
        )
    else:
        where = f"{progress.done:,} done"
    return f"progress: {where}, {progress.rate:,.0f}/s; {progress.counts_text()}"


def format_summary(result: Result) -> str:
    """The counts, one per line, then how the run ended."""
    rows = result.rows()
    width = max(len(f"{count:,}") for _, count in rows)
    label_width = max(19, *(len(label) + 2 for label, _ in rows))
    lines = [f"  {label:<{label_width}}{count:>{width},}" for label, count in rows]
    rate = result.done / result.elapsed if result.elapsed > 0 else 0.0
    lines.append(f"finished in {format_duration(result.elapsed)} ({rate:,.0f}/s)")
    lines.extend(result.throttling())
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


class Steps:
    """One line per step of a command: ``✓ what (1.23 s)``, with notes below it.

    On a terminal the line reads ``… what`` while the step runs and is
    rewritten in place when it ends; a pipe or a log gets only the finished
    line, so nothing is printed twice. A step that raises ends with ``✗``.
    Inside ``with steps.step(what) as notes:``, ``notes.append(line)`` queues
    a line to print (indented) under the step's line.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[list[str]]:
        """Run a step: its line, then its notes."""
        notes: list[str] = []
        if self.tty:
            self.stream.write(self.running(what))
            self.stream.flush()
        began = time.monotonic()
        try:
            yield notes
        except BaseException:
            self._end("✗", what, began, notes)
            raise
        self._end("✓", what, began, notes)

    @staticmethod
    def running(what: str) -> str:
        """The line of a step that runs (a progress bar may follow it on a terminal)."""
        return f"… {what}"

    def _end(self, mark: str, what: str, began: float, notes: list[str]) -> None:
        line = f"{mark} {what} ({time.monotonic() - began:.2f} s)"
        if self.tty:
            line = f"\r{line}{_CLEAR_TO_END}"
        self.stream.write(line + "\n" + "".join(f"  {note}\n" for note in notes))
        self.stream.flush()
