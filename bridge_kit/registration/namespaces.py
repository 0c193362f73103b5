"""Namespaces: which user IDs, aliases and room IDs an appservice claims.

Plain data, below the lints and the model, which both read it.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

__all__ = ["Namespace", "Namespaces", "in_namespaces", "keys_only"]


def keys_only(extra: dict[str, Any]) -> str:
    """The repr of unknown keys: how many, not what they hold (a secret, or an alias
    bomb that a repr would expand)."""
    return f"<{len(extra)} unknown key{'' if len(extra) == 1 else 's'}>"


@attrs.frozen
class Namespace:
    """One namespace entry: a ``regex`` matched with :func:`re.match` against full IDs.

    The regex is compiled once, on construction (``re.error`` if it is invalid).
    """

    regex: str
    exclusive: bool
    extra: dict[str, Any] = attrs.field(factory=dict, repr=keys_only)
    pattern: re.Pattern[str] = attrs.field(init=False, eq=False, repr=False)

    @pattern.default
    def _compile(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    def matches(self, identifier: str) -> bool:
        """True if ``identifier`` (``@user:server``, ``#alias:server``, ``!room:server``) matches.

        Synapse semantics: anchored at the start of the ID, not at the end.
        """
        return self.pattern.match(identifier) is not None


@attrs.frozen
class Namespaces:
    """The ``users``, ``aliases`` and ``rooms`` lists; unknown kinds are kept in ``extra``."""

    users: list[Namespace] = attrs.field(factory=list)
    aliases: list[Namespace] = attrs.field(factory=list)
    rooms: list[Namespace] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict, repr=keys_only)


def in_namespaces(namespaces: list[Namespace], identifier: str, exclusive_only: bool) -> bool:
    for namespace in namespaces:
        if namespace.pattern.match(identifier):
            return namespace.exclusive or not exclusive_only
    return False
