"""One line per step of a command (the demo): in place on a terminal, plain in a pipe."""

from __future__ import annotations

import io
import re

import pytest

from bridge_kit.puppets.progress import ProgressReporter, Steps
from tests.test_puppets import _snapshot

CLEAR = "\x1b[K"


def run_steps(tty: bool) -> str:
    out = io.StringIO()
    steps = Steps(out, tty=tty)
    with steps.step("first"):
        pass
    with steps.step("second") as notes:
        notes.append("a detail")
    with pytest.raises(RuntimeError), steps.step("third"):
        raise RuntimeError("broken")
    return out.getvalue()


def test_in_a_pipe_each_step_is_one_plain_line_with_its_notes_below() -> None:
    text = run_steps(tty=False)
    assert "\r" not in text and CLEAR not in text and "…" not in text
    assert re.fullmatch(
        r"✓ first \(\d+\.\d\d s\)\n✓ second \(\d+\.\d\d s\)\n  a detail\n✗ third \(\d+\.\d\d s\)\n",
        text,
    ), text


def test_on_a_terminal_each_step_line_is_rewritten_in_place() -> None:
    text = run_steps(tty=True)
    lines = text.split("\n")
    assert lines[0].startswith("… first\r✓ first (") and lines[0].endswith(CLEAR)
    assert lines[1].startswith("… second\r✓ second (")
    assert lines[2] == "  a detail"
    assert lines[3].startswith("… third\r✗ third (")
    assert text.count("\n") == 4  # one line per step, one per note


def test_a_progress_bar_runs_on_the_steps_own_line_on_a_terminal() -> None:
    out = io.StringIO()
    steps = Steps(out, tty=True)
    with steps.step("register") as notes:
        reporter = ProgressReporter(out, tty=True, interval=0, prefix="… register  ")
        reporter(_snapshot(500, 1000))
        reporter(_snapshot(1000, 1000))
        reporter.close(end_line=False)
        notes.append("summary")
    first, second, end = out.getvalue().split("\n")
    assert first.startswith("… register\r… register  [") and "1,000/1,000" in first
    assert first.rsplit("\r", 1)[1].startswith("✓ register (")
    assert (second, end) == ("  summary", "")
