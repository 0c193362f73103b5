"""File I/O for registrations: reading the text of one, and writing private files atomically.

:func:`write_private` is not registration-specific: ``bridge-kit register``
writes its ``--report`` with it too. It raises plain :class:`OSError`\\ s so
each caller words the problem for its own user.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
import tempfile
from pathlib import Path

from bridge_kit.errors import RegistrationError

__all__ = [
    "MAX_FILE_BYTES",
    "os_reason",
    "permission_problem",
    "read_text",
    "secret_config_problem",
    "write_private",
]

MAX_FILE_BYTES = 1024 * 1024
"""Registration files are a few hundred bytes; anything over this is refused unread."""

PRIVATE_MODE = 0o600
GROUP_READ = stat.S_IRGRP


def read_text(source: str) -> str:
    """The text of the registration file ``source`` (UTF-8, an optional BOM dropped).

    Raises :class:`~bridge_kit.errors.RegistrationError` when it is not a
    regular file, cannot be read, is larger than :data:`MAX_FILE_BYTES` or
    is not UTF-8.
    """

    def refuse(problem: str) -> RegistrationError:
        return RegistrationError([problem], source)

    try:
        info = os.stat(source)
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory, not a registration file")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file")
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read the file: {os_reason(exc)}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES} bytes; a registration file is tiny YAML")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise refuse(
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "a registration file is YAML"
        ) from None


def write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path`` as UTF-8 with mode 0600, whatever the umask.

    With ``replace`` an existing file is replaced atomically (a temporary file
    in the same directory, synced, then renamed over it), so a reader sees the
    old content or the new, never half of it. The replacement keeps the old
    file's owner and group, and its group-read bit (a homeserver running as
    another user often reads the file through its group); other bits are
    dropped. Without ``replace`` an existing file is left alone and
    :class:`FileExistsError` raised. A directory at ``path`` raises
    :class:`IsADirectoryError`; other failures raise their :class:`OSError`,
    e.g. :class:`PermissionError` when the owner or group cannot be kept.
    """
    if path.is_dir():
        # Checked first: O_EXCL would report a directory as an existing file, and
        # with replace the rename would fail only after writing everything.
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    old = _stat_or_none(path) if replace else None
    if replace:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    else:
        fd, temporary = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE), None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            mode = PRIVATE_MODE
            if old is not None:
                _keep_owner(fd, old)
                mode |= old.st_mode & GROUP_READ
            os.fchmod(fd, mode)  # exact: a umask may also take the owner's bits
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if temporary is not None:
            os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file the old one's owner and group, or refuse to replace it.

    A silent change would lock out a homeserver that reads the file as its
    owner or through its group. Only root may give a file away; anyone may
    keep their own uid and pick a group they belong to.
    """
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise PermissionError(
            errno.EPERM,
            f"cannot keep the file's owner and group (uid {old.st_uid}, gid {old.st_gid}); "
            "run this as the file's owner (in its group) or as root",
        ) from None


def permission_problem(source: str) -> str | None:
    """Why the registration file ``source`` is too open for a file of secrets, or ``None``."""
    try:
        info = os.stat(source)
    except OSError:
        return None  # reading it already said what is wrong
    mode = stat.S_IMODE(info.st_mode)
    shown = f"mode {mode:04o}"
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        verb = "readable" if mode & stat.S_IROTH else "writable"
        return (
            f"the file is {verb} by every user of this machine ({shown}) and holds the "
            "tokens: chmod 600 it (or 640 with the homeserver's group)"
        )
    if mode & (stat.S_IRGRP | stat.S_IWGRP):
        verb = "writable" if mode & stat.S_IWGRP else "readable"
        return (
            f"the file is {verb} by its group {_group_name(info.st_gid)} ({shown}) and holds "
            "the tokens: fine if only the homeserver's user is in that group (and the group "
            "cannot write), otherwise chmod 600 it"
        )
    return None


def secret_config_problem(source: str, key: str) -> tuple[bool, str] | None:
    """Why the config file ``source``, which holds the secret ``key``, is too open:
    (whether every user may read or write it, the message), or ``None``."""
    try:
        info = os.stat(source)
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    shown = f"mode {mode:04o}"
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        verb = "readable" if mode & stat.S_IROTH else "writable"
        return True, (
            f"{source} is {verb} by every user of this machine ({shown}) and holds {key}, "
            "which unlocks the stored keys and tokens: chmod 600 it"
        )
    if mode & (stat.S_IRGRP | stat.S_IWGRP):
        verb = "writable" if mode & stat.S_IWGRP else "readable"
        return False, (
            f"{source} is {verb} by its group {_group_name(info.st_gid)} ({shown}) and holds "
            f"{key}, which unlocks the stored keys and tokens: chmod 600 it unless only the "
            "bridge's user is in that group"
        )
    return None


def _group_name(gid: int) -> str:
    try:
        return repr(grp.getgrgid(gid).gr_name)
    except KeyError:
        return str(gid)


def os_reason(exc: OSError) -> str:
    """The operating system's wording of ``exc``, in lower case, without the errno or path."""
    return (exc.strerror or str(exc)).lower()
