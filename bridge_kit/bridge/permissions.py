"""Who may use the bridge, and how much: ``bridge.permissions`` in the config.

The config maps a user ID, a server name or ``"*"`` to a level::

    permissions:
      "*": relay              # anyone: relayed through the portal's relay login
      example.org: user       # anyone on example.org: may log in
      "@admin:example.org": admin

The most specific entry wins: the user's own, then their server's, then ``"*"``;
a user matched by none has :attr:`Level.NONE`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

from bridge_kit.errors import ConfigError
from bridge_kit.ids import server_name_problem, split_user_id

__all__ = ["Level", "Permissions"]


class Level(enum.IntEnum):
    """What a Matrix user may do with the bridge; each level includes those below it."""

    #: Nothing: the bridge ignores the user's commands.
    NONE = 0
    #: Talk in portals through the relay login; no login of their own.
    RELAY = 1
    #: Log in to the remote network and use the bridge fully.
    USER = 2
    #: Everything, including commands that act for other users or the whole bridge.
    ADMIN = 3

    @classmethod
    def parse(cls, value: object) -> Level:
        """The level named ``value`` (``"relay"``, any case); ``ValueError`` otherwise."""
        if isinstance(value, Level):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        names = ", ".join(level.name.lower() for level in cls)
        raise ValueError(f"unknown level {value!r} (use one of: {names})")

    def __str__(self) -> str:
        return self.name.lower()


def _key_problem(key: str) -> str | None:
    """Why ``key`` is neither ``"*"``, a user ID nor a server name, or ``None``."""
    if key == "*":
        return None
    if key.startswith("@"):
        try:
            _, server = split_user_id(key)
        except ValueError as exc:
            return str(exc)
        problem = server_name_problem(server)
        return None if problem is None else f"not a user ID: its server name {problem}"
    problem = server_name_problem(key)
    if problem is None:
        return None
    return f"not '*', a user ID (@user:server) or a server name: the server name {problem}"


@attrs.frozen
class Permissions:
    """Levels by user ID and by server name, and the level of everyone else.

    Build it from the config with :meth:`from_mapping`; ask with :meth:`level_of`.
    """

    users: Mapping[str, Level] = attrs.field(factory=dict)
    servers: Mapping[str, Level] = attrs.field(factory=dict)
    default: Level = Level.NONE

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], *, where: str = "bridge.permissions"
    ) -> Permissions:
        """Read ``{"@user:server" | "server" | "*": level name}``.

        Every bad entry is named in one :class:`~bridge_kit.errors.ConfigError`
        (``where`` prefixes each line: the config path of the mapping).
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: must be a mapping of user/server/'*' to a level")
        users: dict[str, Level] = {}
        servers: dict[str, Level] = {}
        default = Level.NONE
        problems = []
        for key, value in mapping.items():
            problem = _key_problem(key) if isinstance(key, str) else "not a string"
            try:
                level = Level.parse(value)
            except ValueError as exc:
                problems.append(f"{where}.{key}: {exc}")
                continue
            if problem is not None:
                problems.append(f"{where}: {key!r}: {problem}")
            elif key == "*":
                default = level
            elif key.startswith("@"):
                users[key] = level
            else:
                # Server names are case-insensitive (DNS); user IDs are compared exactly.
                servers[key.lower()] = level
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(users, servers, default)

    def level_of(self, user_id: str) -> Level:
        """``user_id``'s level: their own entry, else their server's, else ``"*"``'s."""
        level = self.users.get(user_id)
        if level is not None:
            return level
        _, _, server = user_id.partition(":")
        return self.servers.get(server.lower(), self.default)

    def allows(self, user_id: str, level: Level) -> bool:
        """Whether ``user_id`` has at least ``level``."""
        return self.level_of(user_id) >= level
