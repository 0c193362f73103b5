"""Matrix user IDs: the localpart grammar bridge_kit enforces before creating a user.

The current spec allows only ``a-z 0-9 . _ = - / +`` in a localpart and at
most 255 bytes for the whole ``@localpart:server``. Synapse does not check
this for appservice registrations (it happily creates ``@Upper:server`` next
to ``@upper:server``), so a bridge must check it before it registers a puppet.

"Historical" user IDs (any character but ``:``) may still be *seen*;
:func:`split_user_id` accepts them. Only IDs that bridge_kit *creates* are
held to the grammar.
"""

from __future__ import annotations

import re

from bridge_kit.errors import InvalidLocalpart

__all__ = [
    "MAX_USER_ID_BYTES",
    "localpart_problem",
    "server_name_problem",
    "split_user_id",
    "user_id",
    "validate_localpart",
]

MAX_USER_ID_BYTES = 255
"""The spec's limit on a full user ID, ``@`` and ``:`` included, in UTF-8 bytes."""

_LOCALPART = re.compile(r"[a-z0-9._=\-/+]+")
_NOT_LOCALPART_CHAR = re.compile(r"[^a-z0-9._=\-/+]")
# A DNS name or an IP literal, with an optional port (the spec's server-name grammar).
_SERVER_NAME = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Za-z.\-]{1,255})(?::[0-9]{1,5})?",
)
# "@" and ":" around the localpart and the server name.
_ID_OVERHEAD = 2


def localpart_problem(localpart: str, domain: str | None = None) -> str | None:
    """Say why ``localpart`` may not be used for a new user, or return ``None``.

    With ``domain``, the full ``@localpart:domain`` must also fit in 255 bytes.
    Built for bulk use: a valid localpart costs one regex match and a length check.
    """
    if _LOCALPART.fullmatch(localpart) is None:
        return _grammar_problem(localpart)
    # The localpart is ASCII here, so its length is its size in bytes.
    budget = MAX_USER_ID_BYTES - _ID_OVERHEAD
    if domain is None:
        budget -= 1  # the shortest server name
    elif domain.isascii():
        budget -= len(domain)
    else:
        budget -= len(domain.encode())
    if len(localpart) > budget:
        return _length_problem(localpart, domain)
    return None


def validate_localpart(localpart: str, domain: str | None = None) -> None:
    """Raise :class:`~bridge_kit.errors.InvalidLocalpart` unless ``localpart`` is valid.

    See :func:`localpart_problem` for the rules.
    """
    problem = localpart_problem(localpart, domain)
    if problem is not None:
        raise InvalidLocalpart(localpart, problem)


def user_id(localpart: str, domain: str) -> str:
    """Build ``@localpart:domain`` for a new user, validating the localpart first.

    Raises :class:`~bridge_kit.errors.InvalidLocalpart`.
    """
    validate_localpart(localpart, domain)
    return f"@{localpart}:{domain}"


def split_user_id(user_id: str) -> tuple[str, str]:
    """Split ``@localpart:server`` into ``(localpart, server)``.

    Historical localparts (uppercase, punctuation) are accepted: this is for
    IDs seen on the wire, not for creating new ones. Raises ``ValueError`` for
    anything that is not a user ID at all.
    """
    if not user_id.startswith("@"):
        raise ValueError(f"not a user ID (must start with '@'): {user_id!r}")
    localpart, colon, server = user_id[1:].partition(":")
    if not colon:
        raise ValueError(f"not a user ID (no ':server' part): {user_id!r}")
    if not localpart:
        raise ValueError(f"not a user ID (empty localpart): {user_id!r}")
    if not server:
        raise ValueError(f"not a user ID (empty server name): {user_id!r}")
    return localpart, server


def server_name_problem(server_name: str) -> str | None:
    """Say why ``server_name`` is not a valid Matrix server name, or return ``None``."""
    if not server_name:
        return "must not be empty"
    if _SERVER_NAME.fullmatch(server_name) is None:
        return "must be a host name or IP literal with an optional :port (e.g. example.org)"
    return None


def _grammar_problem(localpart: str) -> str:
    if not localpart:
        return "must not be empty"
    bad = sorted(set(_NOT_LOCALPART_CHAR.findall(localpart)))
    uppercase = [c for c in bad if c.isupper()]
    others = ", ".join(repr(c) for c in bad if not c.isupper())
    if uppercase and not others:
        return "contains uppercase letters; new user IDs must be lowercase"
    reason = f"contains {others}; only a-z 0-9 . _ = - / + are allowed"
    if uppercase:
        reason += " (and new user IDs must be lowercase)"
    return reason


def _length_problem(localpart: str, domain: str | None) -> str:
    if domain is None:
        return (
            f"is {len(localpart)} characters long; no user ID with it fits in "
            f"{MAX_USER_ID_BYTES} bytes"
        )
    size = len(localpart) + len(domain.encode()) + _ID_OVERHEAD
    return (
        f"makes the user ID @{localpart[:16]}…:{domain} {size} bytes long; "
        f"the limit is {MAX_USER_ID_BYTES}"
    )
