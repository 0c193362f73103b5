"""Store URLs: the one parser behind the config check, the CLI and :func:`open_store`.

::

    parse_store_url("sqlite:///bridge_kit.db", base_dir="/etc/bridge")
    # StoreURL(kind='sqlite', target='/etc/bridge/bridge_kit.db')

A URL is only ever echoed through :func:`redact_store_url`: a PostgreSQL URL
may carry a password.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import attrs

from bridge_kit.errors import StoreError

__all__ = [
    "STORE_FORMS",
    "StoreURL",
    "parse_store_url",
    "redact_store_url",
    "scrub_password",
    "store_url_problem",
]

STORE_FORMS: Final = "memory://, sqlite:///path.db or postgresql://user@host/dbname"
_SCHEMES: Final = ("memory", "sqlite", "postgresql", "postgres")
_SQLITE_PREFIX: Final = "sqlite:///"
_SCRUBBABLE: Final = 4

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
        return _ambiguity(url)
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
    ``#``, ``?``, ``/`` or ``@`` can move a password into any other part.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in ("sqlite", "memory"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{scheme}://<unparsable URL>"
    if _ambiguity(url) is not None:
        return f"{scheme}://{_likely_host(url)}/…"
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        parts = parts._replace(netloc=user + parts.netloc.rpartition("@")[2])
    query = [
        (key, "***" if key.lower() == "password" else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def scrub_password(text: str, url: str) -> str:
    """``text`` (say, a driver's error message about ``url``) with ``url``'s password,
    as written and percent-decoded, replaced by ``***``.

    A password shorter than 4 characters would match inside ordinary words, so
    a text that contains one is withheld whole instead.
    """
    for secret in sorted(_passwords(url), key=len, reverse=True):
        if len(secret) >= _SCRUBBABLE:
            text = text.replace(secret, "***")
        elif secret in text:
            return "(details withheld: they might show the password)"
    return text


def _passwords(url: str) -> set[str]:
    """Every form in which ``url``'s password could appear: the text between the
    first ``:`` of the user part and the last ``@`` (what a person meant, however
    it parses), and what :func:`urlsplit` makes of it."""
    found: set[str] = set()
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    if ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        found.update(p for p in (parts.password, _password_param(parts.query)) if p)
    found |= {unquote(secret) for secret in found}
    return {secret for secret in found if secret}


def _password_param(query: str) -> str | None:
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() == "password"]
    return values[0] if values else None


def _likely_host(url: str) -> str:
    """The host an ambiguous URL most likely names: what follows its last ``@``, as far
    as host characters go; never a piece of anything that may be a password."""
    rest = url.partition("://")[2]
    host = re.match(r"[\w.:\[\]-]*", rest.rpartition("@")[2])
    shown = host.group() if host else ""
    if not shown or any(shown in secret for secret in _passwords(url)):
        return "<host not shown>"
    return shown


def _ambiguity(url: str) -> str | None:
    """Why a PostgreSQL URL cannot be split into its parts for sure, or ``None``.

    A password holding ``#``, ``?`` or ``/`` ends the host part early and the
    rest of it lands in the path, query or fragment; one holding ``@`` makes two.
    Each leaves an ``@`` (or a ``#``, which no DSN has) where none belongs, and
    then the password may be shown as a port, a path or a query: refuse such a
    URL, naming no part of it.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL (check the brackets around an IPv6 address)"
    stray = "#" in url or "@" in parts.path or "@" in parts.query
    if stray or parts.netloc.count("@") > 1:
        return (
            "cannot be split into user, password and host for sure: percent-encode "
            "@ # ? / in the user name and password (%40 %23 %3F %2F)"
        )
    return None


def _did_you_mean(scheme: str) -> str:
    close = difflib.get_close_matches(scheme, _SCHEMES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
