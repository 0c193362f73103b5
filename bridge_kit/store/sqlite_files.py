"""The SQLite store's file: created private, a failure to open it explained, how
durably it is written, and the daemon's lock on it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Final

from bridge_kit.errors import StoreError

#: The values of the store's ``sync`` (SQLite's ``synchronous`` pragma).
SYNC_MODES: Final = ("normal", "full")


#: Bytes the WAL file is cut back to when a checkpoint restarts it. SQLite never
#: shrinks it otherwise: one burst (a backlog, a long read) would set its size for good.
WAL_SIZE_LIMIT: Final = 8 * 2**20


def connection_pragmas(sync: str) -> list[str]:
    """What each connection of the store sets: ``synchronous`` and the WAL's size limit."""
    return [f"PRAGMA synchronous={sync.upper()}", f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}"]


def checked_sync(sync: str) -> str:
    """``sync``, or :class:`ValueError` if it is not one of :data:`SYNC_MODES`."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    return sync


def open_problem(path: Path, error: sqlite3.Error) -> str:
    """Why the database at ``path`` did not open, in words an operator can act on."""
    where = f"cannot open SQLite store {path}"
    parent = path.parent
    if not parent.exists():
        return f"{where}: directory {parent} does not exist"
    if not parent.is_dir():
        return f"{where}: {parent} is not a directory"
    if path.is_dir():
        return f"{where}: it is a directory"
    if not os.access(path if path.exists() else parent, os.R_OK | os.W_OK):
        return f"{where}: permission denied"
    return f"{where}: {error}"


def create_private(path: Path) -> None:
    """Create the database file with mode 0600 if it does not exist yet.

    It holds every puppet and every event in the inbox; SQLite would create it
    readable by all (0644 under the usual umask), and gives its -wal and -shm files
    the database file's mode. An existing file keeps the mode its owner chose.
    Whatever fails here (no such directory...) fails again, explained, in connect.
    """
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def lock_exclusively(path: Path) -> int:
    """An exclusive ``flock`` on ``<path>.lock``: the lock file's descriptor (closing
    it releases the lock), or :class:`StoreError` if another holds it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StoreError(f"cannot lock SQLite store {path}: {error}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if isinstance(error, BlockingIOError):
            raise StoreError(
                f"another bridge-kit daemon is using the SQLite store {path}"
                f" ({lock_path} is locked)"
            ) from None
        raise StoreError(f"cannot lock SQLite store {path}: {error}") from error
    return fd
