"""bridge.permissions: levels by user, server and "*", the most specific winning."""

from __future__ import annotations

from typing import Any

import pytest

from bridge_kit.bridge.permissions import Level, Permissions
from bridge_kit.errors import ConfigError, SetupError

CONFIG = {
    "*": "relay",
    "example.org": "user",
    "Other.Example:8448": "admin",
    "@boss:example.org": "admin",
    "@guest:example.org": "none",
}


@pytest.mark.parametrize(
    ("user_id", "level"),
    [
        ("@boss:example.org", Level.ADMIN),  # the user's own entry beats their server's
        ("@guest:example.org", Level.NONE),  # also downwards
        ("@anyone:example.org", Level.USER),  # the server's beats "*"
        ("@x:other.example:8448", Level.ADMIN),  # server names compare case-insensitively
        ("@x:elsewhere.net", Level.RELAY),  # "*"
        ("@x:sub.example.org", Level.RELAY),  # a subdomain is another server
    ],
)
def test_the_most_specific_entry_wins(user_id: str, level: Level) -> None:
    assert Permissions.from_mapping(CONFIG).level_of(user_id) == level


def test_nobody_has_a_level_without_a_matching_entry() -> None:
    permissions = Permissions.from_mapping({"example.org": "admin"})
    assert permissions.level_of("@x:elsewhere.net") == Level.NONE
    assert Permissions().level_of("@x:example.org") == Level.NONE


def test_levels_are_ordered_and_include_those_below() -> None:
    assert Level.NONE < Level.RELAY < Level.USER < Level.ADMIN
    permissions = Permissions.from_mapping({"@u:x.org": "USER"})
    assert permissions.allows("@u:x.org", Level.RELAY)
    assert permissions.allows("@u:x.org", Level.USER)
    assert not permissions.allows("@u:x.org", Level.ADMIN)
    assert str(Level.ADMIN) == "admin"


def test_every_bad_entry_is_named_in_one_error() -> None:
    bad: dict[Any, Any] = {
        "*": "superuser",
        "@nocolon": "user",
        "not a server": "user",
        "@u:bad server": "admin",
        "example.org": 3,
        "fine.org": "user",
    }
    with pytest.raises(ConfigError) as caught:
        Permissions.from_mapping(bad)
    lines = str(caught.value).splitlines()
    assert lines == [
        "bridge.permissions.*: unknown level 'superuser' (use one of: none, relay, user, admin)",
        "bridge.permissions: '@nocolon': not a user ID (no ':server' part): '@nocolon'",
        "bridge.permissions: 'not a server': not '*', a user ID (@user:server) or a server "
        "name: the server name must be a host name or IP literal with an optional :port "
        "(e.g. example.org)",
        "bridge.permissions: '@u:bad server': not a user ID: its server name must be a host "
        "name or IP literal with an optional :port (e.g. example.org)",
        "bridge.permissions.example.org: unknown level 3 (use one of: none, relay, user, admin)",
    ]
    assert isinstance(caught.value, SetupError)


def test_not_a_mapping_and_the_path_in_messages() -> None:
    with pytest.raises(ConfigError, match=r"^perms: must be a mapping"):
        Permissions.from_mapping(["*"], where="perms")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^perms\.\*: unknown level"):
        Permissions.from_mapping({"*": None}, where="perms")
