"""The ``bridge-kit`` command line, run in this process or as a real subprocess.

:func:`run_cli` calls :func:`bridge_kit.cli.main.main` with the argv, a working
directory and an environment, and captures what it prints, as a subprocess
would see it: stdout encodes strictly as UTF-8 (text a real terminal could not
take fails here too), stderr escapes what it cannot encode, and warnings that
nothing else handles go to stderr as Python's last-resort handler prints them.
It saves the interpreter start and imports of a subprocess (about 0.4 s of CPU
each). :func:`run_cli_subprocess` is the real thing, for one smoke test per
command: the entry point, the exit status and the streams of a separate process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from bridge_kit.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``bridge-kit ARGS`` in this process, in ``cwd``; its status and output."""
    stdout = _stream(errors="strict")
    stderr = _stream(errors="backslashreplace")
    with (
        contextlib.chdir(cwd),
        _environment(env),
        _last_resort_logging(stderr),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        _no_stdin(),
    ):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(["bridge-kit", *args], code, _text(stdout), _text(stderr))


def run_cli_subprocess(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bridge_kit ARGS`` as a real subprocess in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "bridge_kit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(env) if env is not None else None,
    )


def _stream(errors: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors, write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    # Universal newlines, as subprocess.run(text=True) reads them.
    return buffer.getvalue().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _last_resort_logging(stderr: io.TextIOWrapper) -> Iterator[None]:
    """What Python prints for a warning with no handler configured (pytest's own
    capture handlers would otherwise swallow it)."""
    handler = logging.StreamHandler(stderr)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def _no_stdin() -> Iterator[None]:
    saved, sys.stdin = sys.stdin, io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved
