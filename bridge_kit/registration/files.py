"""File I/O for registrations: reading the text of one, and writing private files atomically.

:func:`write_private` is not registration-specific: ``bridge-kit register``
writes its ``--report`` with it too. It raises plain :class:`OSError`\\ s so
each caller words the problem for its own user.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from bridge_kit.errors import RegistrationError

__all__ = ["MAX_FILE_BYTES", "os_reason", "read_text", "write_private"]

MAX_FILE_BYTES = 1024 * 1024
"""Registration files are a few hundred bytes; anything over this is refused unread."""

PRIVATE_MODE = 0o600


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
    old content or the new, never half of it. Without it an existing file is
    left alone and :class:`FileExistsError` raised. A directory at ``path``
    raises :class:`IsADirectoryError`; other failures raise their :class:`OSError`.
    """
    if path.is_dir():
        # Checked first: O_EXCL would report a directory as an existing file, and
        # with replace the rename would fail only after writing everything.
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if replace:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    else:
        fd, temporary = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE), None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(fd, PRIVATE_MODE)  # exactly 0600: a umask may also take the owner's bits
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if temporary is not None:
            os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def os_reason(exc: OSError) -> str:
    """The operating system's wording of ``exc``, in lower case, without the errno or path."""
    return (exc.strerror or str(exc)).lower()
