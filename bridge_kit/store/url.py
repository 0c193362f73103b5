"""Store URLs: the one parser behind the config check, the CLI and :func:`open_store`.

::

    parse_store_url("sqlite:///bridge_kit.db", base_dir="/etc/bridge")
    # StoreURL(kind='sqlite', target='/etc/bridge/bridge_kit.db')

A URL is only ever echoed through :func:`redact_store_url`: a PostgreSQL URL
may carry a password.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

from bridge_kit.errors import StoreError

__all__ = [
    "STORE_FORMS",
    "StoreURL",
    "parse_store_url",
    "redact_store_url",
    "store_url_problem",
]

STORE_FORMS: Final = "memory://, sqlite:///path.db or postgresql://user@host/dbname"
_SCHEMES: Final = ("memory", "sqlite", "postgresql", "postgres")
_SQLITE_PREFIX: Final = "sqlite:///"

StoreKind = Literal["memory", "sqlite", "postgresql"]


@attrs.frozen
class StoreURL:
    """A parsed store URL.

    ``target`` is the absolute SQLite file path, the PostgreSQL DSN, or ``""``
    for ``memory://``. ``url`` is the URL again, with a relative SQLite path
    made absolute.
    """

    kind: StoreKind
    target: str

    @property
    def url(self) -> str:
        if self.kind == "sqlite":
            return _SQLITE_PREFIX + self.target
        if self.kind == "memory":
            return "memory://"
        return self.target

    def __str__(self) -> str:
        return redact_store_url(self.url)


def parse_store_url(url: str, base_dir: str | os.PathLike[str] | None = None) -> StoreURL:
    """Parse ``url``; a relative SQLite path is taken from ``base_dir`` (default: the cwd).

    Raises :class:`~bridge_kit.errors.StoreError` with a message that names the
    problem and never shows a password.
    """
    problem = store_url_problem(url)
    if problem is not None:
        raise StoreError(
            f"unsupported store URL {redact_store_url(url)!r}: {problem}; expected {STORE_FORMS}"
        )
    scheme = url.partition("://")[0]
    scheme = scheme.lower()
    if scheme == "memory":
        return StoreURL("memory", "")
    if scheme == "sqlite":
        base = Path.cwd() if base_dir is None else Path(base_dir)
        path = url[len(_SQLITE_PREFIX) :]
        return StoreURL("sqlite", os.path.normpath(base / Path(path).expanduser()))
    return StoreURL("postgresql", url)


def store_url_problem(url: str) -> str | None:
    """What is wrong with ``url``, as a phrase after its name ("has no scheme"), or ``None``."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        return "has no scheme"
    if scheme not in _SCHEMES:
        return f"has unknown scheme {scheme!r}{_did_you_mean(scheme)}"
    if scheme == "memory":
        return "memory:// takes no path" if rest else None
    if scheme != "sqlite":
        return None
    if not url.lower().startswith(_SQLITE_PREFIX):
        return (
            "needs three slashes before the path: sqlite:///relative.db or sqlite:////absolute.db"
        )
    path = url[len(_SQLITE_PREFIX) :]
    if not path:
        return "has an empty SQLite path"
    if path == ":memory:":
        # SQLite's :memory: is a new, empty database on every connection, and the
        # store uses two, so it could never work. Say what does.
        return "names SQLite's :memory:, which cannot hold a store; use memory:// instead"
    return None


def redact_store_url(url: str) -> str:
    """``url`` fit for a log line or a report: passwords become ``***``.

    A SQLite or memory URL holds no secret and is returned whole. A URL that
    does not parse cleanly shows only its scheme and host, because a stray
    ``#``, ``?`` or ``@`` can move a password into any other part.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in ("sqlite", "memory"):
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"{scheme}://<unparsable URL>"
    if parts.fragment or "@" in parts.path or "@" in parts.query or "#" in url:
        return f"{scheme}://{host or '<no host>'}/…"
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        parts = parts._replace(netloc=user + parts.netloc.rpartition("@")[2])
    query = [
        (key, "***" if key.lower() == "password" else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _did_you_mean(scheme: str) -> str:
    close = difflib.get_close_matches(scheme, _SCHEMES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
