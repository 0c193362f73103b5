"""The room-state store (schema version 3), run against memory, SQLite and PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge_kit.store import SQLiteStore, Store, open_store
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member
from tests.test_store import backend_url, emptied, run_sql

ROOM, OTHER = "!room:test.local", "!other:test.local"
ALICE, BOB = "@alice:test.local", "@bob:test.local"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def member(user_id: str, membership: str, ts: int, name: str | None = None) -> Event:
    content: dict[str, Any] = {"membership": membership}
    if name is not None:
        content["displayname"] = name
    return Event(
        "m.room.member", content, room_id=ROOM, sender=user_id, state_key=user_id,
        origin_server_ts=ts,
    )  # fmt: skip


def state(event_type: str, content: dict[str, Any], ts: int, sender: str = ALICE) -> Event:
    return Event(
        event_type, content, room_id=ROOM, sender=sender, state_key="", origin_server_ts=ts
    )


async def test_memberships_are_recorded_and_read_back(store: Store) -> None:
    await store.apply_state(ROOM, [member(ALICE, "join", 10, "Alice"), member(BOB, "invite", 11)])
    assert await store.membership(ROOM, ALICE) == Member("Alice", None, "join")
    assert await store.membership(ROOM, BOB) == Member(None, None, "invite")
    assert await store.membership(OTHER, ALICE) is None
    assert await store.members(ROOM) == {ALICE: Member("Alice", None, "join")}
    assert await store.members(ROOM, "invite") == {BOB: Member(None, None, "invite")}


async def test_an_older_state_event_does_not_overwrite_a_newer_one(store: Store) -> None:
    await store.apply_state(
        ROOM, [member(ALICE, "join", 200), state("m.room.name", {"name": "new"}, 200)]
    )
    await store.apply_state(
        ROOM, [member(ALICE, "leave", 100), state("m.room.name", {"name": "old"}, 100)]
    )
    assert await store.membership(ROOM, ALICE) == Member(None, None, "join")
    name = await store.state_event(ROOM, "m.room.name")
    assert name is not None and name.content == {"name": "new"}
    # One as recent or newer does.
    await store.apply_state(
        ROOM, [member(ALICE, "leave", 200), state("m.room.name", {"name": "x"}, 300)]
    )
    assert await store.membership(ROOM, ALICE) == Member(None, None, "leave")
    name = await store.state_event(ROOM, "m.room.name")
    assert name is not None and name.content == {"name": "x"}


async def test_power_levels_carry_the_creators_of_a_version_12_room(store: Store) -> None:
    assert await store.power_levels(ROOM) is None
    levels = {"users": {BOB: 50}, "invite": 10}
    await store.apply_state(
        ROOM,
        [
            state("m.room.power_levels", levels, 5),
            state("m.room.create", {"room_version": "12"}, 1),
        ],
    )
    stored = await store.power_levels(ROOM)
    assert stored is not None
    assert (stored.user_level(BOB), stored.invite, stored.user_level(ALICE)) == (50, 10, math.inf)


async def test_encryption_is_unknown_until_the_room_is_known(store: Store) -> None:
    assert await store.is_encrypted(ROOM) is None
    assert not await store.room_state_known(ROOM)
    await store.apply_state(ROOM, [member(ALICE, "join", 1)], complete=True)
    assert await store.room_state_known(ROOM)
    assert await store.is_encrypted(ROOM) is False
    await store.apply_state(
        ROOM, [state("m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}, 2)]
    )
    assert await store.is_encrypted(ROOM) is True
    # Seeing the creation also means the whole membership was seen.
    await store.apply_state(
        OTHER, [Event("m.room.create", {}, room_id=OTHER, state_key="", origin_server_ts=1)]
    )
    assert await store.room_state_known(OTHER)


async def test_untracked_and_non_state_events_are_not_kept(store: Store) -> None:
    await store.apply_state(
        ROOM,
        [
            Event("m.room.message", {"body": "hi"}, room_id=ROOM, origin_server_ts=1),
            state("m.room.topic", {"topic": "t"}, 1),
            Event("m.room.member", {"membership": "join"}, room_id=OTHER, state_key=BOB),
        ],
    )
    assert await store.state_event(ROOM, "m.room.topic") is None
    assert await store.membership(ROOM, BOB) is None
    assert await store.membership(OTHER, BOB) is None


async def test_unstorable_text_is_kept_and_found(store: Store) -> None:
    odd = "@odd\x00\ud800:test.local"
    await store.apply_state(ROOM, [member(odd, "join", 1, "nul\x00 \udfff")])
    found = await store.membership(ROOM, odd)
    assert found is not None and found.membership == "join"
    await store.set_profile(odd, "displayname", "x\x00")
    assert await store.profile(odd) == {"displayname": "x\ufffd"}


async def test_profiles_distinguish_unset_from_removed(store: Store) -> None:
    assert await store.profile(ALICE) == {}
    await store.set_profile(ALICE, "displayname", "Alice")
    await store.set_profile(ALICE, "avatar_url", None)
    await store.set_profile(ALICE, "displayname", "Alice 2")
    assert await store.profile(ALICE) == {"displayname": "Alice 2", "avatar_url": None}
    assert await store.profile(BOB) == {}


async def test_state_survives_reopening_the_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    async with open_store(url) as store:
        await store.apply_state(
            ROOM,
            [member(ALICE, "join", 3), state("m.room.power_levels", {"users": {ALICE: 75}}, 3)],
        )
        await store.set_profile(ALICE, "displayname", "Alice")
    async with open_store(url) as store:
        assert await store.membership(ROOM, ALICE) == Member(None, None, "join")
        levels = await store.power_levels(ROOM)
        assert levels is not None and levels.user_level(ALICE) == 75
        assert await store.profile(ALICE) == {"displayname": "Alice"}


async def test_a_version_2_sqlite_database_is_migrated_to_3(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v2.db'}"
    v2 = [statement for step in SQLiteStore.MIGRATIONS[:2] for statement in step]
    await run_sql(
        url,
        *v2,
        "CREATE TABLE bridge_kit_schema (version INTEGER NOT NULL)",
        "INSERT INTO bridge_kit_schema (version) VALUES (2)",
        "INSERT INTO bridge_kit_puppets (user_id) VALUES ('@kept:test.local')",
    )
    async with open_store(url) as store:
        assert await store.schema_version() == SQLiteStore.SCHEMA_VERSION
        assert await store.is_registered("@kept:test.local")
        await store.apply_state(ROOM, [member(ALICE, "join", 1)])
        assert await store.membership(ROOM, ALICE) is not None
