"""The store's batches for bulk runs (joined_among, profiles_among, set_profiles), run
against memory, SQLite and PostgreSQL, and against the one-by-one defaults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge_kit.store import MemoryStore, Store, open_store
from bridge_kit.types.events import Event
from tests.test_store import backend_url, emptied

ROOMS = [f"!room{i}:test.local" for i in range(3)]
USERS = [f"@u{i}:test.local" for i in range(700)]  # more than SQLite's variables per query


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def member(room_id: str, user_id: str, membership: str, ts: int = 10) -> Event:
    return Event(
        "m.room.member", {"membership": membership}, room_id=room_id, sender=user_id,
        state_key=user_id, origin_server_ts=ts,
    )  # fmt: skip


async def fill(store: Store) -> set[tuple[str, str]]:
    """Joins for every other user in ROOMS[0], a leave and an invite; the joined pairs."""
    joined = {(ROOMS[0], user) for user in USERS[::2]}
    await store.apply_state(ROOMS[0], [member(room, user, "join") for room, user in joined])
    await store.apply_state(ROOMS[1], [member(ROOMS[1], USERS[1], "leave")])
    await store.apply_state(ROOMS[2], [member(ROOMS[2], USERS[3], "invite")])
    return joined


async def test_joined_among_answers_only_joined_pairs_in_one_batch(store: Store) -> None:
    joined = await fill(store)
    asked = [(room, user) for room in ROOMS for user in USERS]
    assert await store.joined_among(asked) == joined
    assert await store.joined_among([]) == set()
    # A pair is matched whole: alice joined room 0 says nothing of room 1.
    assert await store.joined_among([(ROOMS[1], USERS[0])]) == set()


async def test_joined_among_maps_back_ids_the_store_keeps_cleaned(store: Store) -> None:
    odd_room = "!odd\x00room:test.local"
    await store.apply_state(odd_room, [member(odd_room, USERS[0], "join")])
    assert await store.joined_among([(odd_room, USERS[0])]) == {(odd_room, USERS[0])}


async def test_profiles_among_and_set_profiles_round_trip(store: Store) -> None:
    await store.set_profiles(
        [(user, "displayname", f"name {user}") for user in USERS[:600]]
        + [(USERS[0], "avatar_url", "mxc://test.local/a"), (USERS[1], "displayname", None)]
    )
    profiles = await store.profiles_among(USERS)
    assert len(profiles) == 600
    assert profiles[USERS[0]] == {
        "displayname": f"name {USERS[0]}",
        "avatar_url": "mxc://test.local/a",
    }
    assert profiles[USERS[1]] == {"displayname": None}  # removed: None, not absent
    assert profiles[USERS[599]] == {"displayname": f"name {USERS[599]}"}
    assert USERS[600] not in profiles
    # The batch and the one-by-one read agree.
    assert await store.profile(USERS[0]) == profiles[USERS[0]]
    await store.set_profiles([])  # nothing to write is no error


class OneByOne(MemoryStore):
    """A Store subclass with only the abstract hooks: the base defaults answer."""

    _joined_among = Store._joined_among
    _profiles_among = Store._profiles_among


async def test_the_base_defaults_agree_with_the_backends() -> None:
    async with OneByOne() as store:
        joined = await fill(store)
        assert await store.joined_among([(r, u) for r in ROOMS for u in USERS[:50]]) == {
            pair for pair in joined if pair[1] in USERS[:50]
        }
        await store.set_profiles([(USERS[0], "displayname", "A")])
        assert await store.profiles_among(USERS[:3]) == {USERS[0]: {"displayname": "A"}}
