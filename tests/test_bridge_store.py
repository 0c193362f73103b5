"""The bridge layer's records in the store (schema version 6): portals, ghosts, logins
and the message map, run against memory, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from bridge_kit.bridge.records import (
    GhostRecord,
    LoginRecord,
    LoginState,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)
from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import Acceptance, ItemKind, NewInboxItem
from bridge_kit.store import PostgresStore, SQLiteStore, Store, open_store
from tests.test_store import DurableStoreClass, backend_url, emptied, run_sql, store_at

CHAT, DM = PortalKey("#lobby"), PortalKey("alice", receiver="login-1")
ROOM, OTHER_ROOM = "!lobby:test.local", "!other:test.local"
ALICE = "@alice:test.local"
HOSTILE = "a\x00b\ud800c"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def store(any_backend: str) -> AsyncIterator[Store]:
    async with open_store(await emptied(any_backend)) as opened:
        yield opened


def message(
    remote_id: str, event_id: str, *, part: str = "", ts: float = 1.0, portal: PortalKey = CHAT
) -> MessageRecord:
    return MessageRecord(
        portal, remote_id, event_id, ROOM, part=part, sender="bob", sender_mxid=ALICE, timestamp=ts
    )


def reaction(
    remote_id: str, event_id: str, *, key: str = "👍", sender: str = "bob"
) -> ReactionRecord:
    return ReactionRecord(CHAT, remote_id, sender, key, event_id, ROOM, timestamp=2.5)


# -- portals ----------------------------------------------------------------------


async def test_a_portal_is_stored_whole_and_found_by_key_and_by_room(store: Store) -> None:
    portal = PortalRecord(
        CHAT, ROOM, name="Lobby", topic="é talk", avatar_mxc="mxc://x/y", is_direct=False,
        relay_login="relay", metadata={"modes": ["n", "t"], "limit": 3, "nested": {"a": None}},
    )  # fmt: skip
    await store.put_portal(portal)
    await store.put_portal(PortalRecord(DM, is_direct=True))
    assert await store.portal(CHAT) == portal
    assert await store.portal_by_room(ROOM) == portal
    assert await store.portal(DM) == PortalRecord(DM, is_direct=True)
    assert await store.portal(PortalKey("#lobby", receiver="login-1")) is None
    assert await store.portal_by_room(OTHER_ROOM) is None
    assert [p.key for p in await store.portals()] == sorted([CHAT, DM])


async def test_putting_a_portal_replaces_it_and_frees_its_old_room(store: Store) -> None:
    await store.put_portal(PortalRecord(CHAT, ROOM, name="old"))
    await store.put_portal(PortalRecord(CHAT, OTHER_ROOM, name="new"))
    assert await store.portal_by_room(ROOM) is None
    found = await store.portal_by_room(OTHER_ROOM)
    assert found is not None and found.name == "new"
    await store.put_portal(PortalRecord(DM, ROOM))  # free again
    assert (await store.portal_by_room(ROOM)) == PortalRecord(DM, ROOM)


async def test_a_room_is_the_room_of_one_portal_only(store: Store) -> None:
    await store.put_portal(PortalRecord(CHAT, ROOM))
    with pytest.raises(StoreError, match=f"room {ROOM} is already the room of portal #lobby$"):
        await store.put_portal(PortalRecord(DM, ROOM))
    with pytest.raises(StoreError, match="already the room of portal #lobby"):
        await store.claim_portal_room(DM, ROOM)
    assert await store.portal(DM) is None


async def test_claiming_a_room_keeps_the_first_and_returns_the_winner(store: Store) -> None:
    assert await store.claim_portal_room(CHAT, ROOM) == ROOM
    assert await store.portal(CHAT) == PortalRecord(CHAT, ROOM)
    assert await store.claim_portal_room(CHAT, OTHER_ROOM) == ROOM
    assert await store.portal_by_room(OTHER_ROOM) is None
    # A portal put without a room gets the claimed one, keeping its fields.
    await store.put_portal(PortalRecord(DM, name="Alice", metadata={"k": 1}))
    assert await store.claim_portal_room(DM, OTHER_ROOM) == OTHER_ROOM
    assert await store.portal(DM) == PortalRecord(DM, OTHER_ROOM, name="Alice", metadata={"k": 1})


async def test_a_roomless_put_never_erases_a_claimed_room(store: Store) -> None:
    # What a daemon read before another claimed the room must not undo the claim.
    assert await store.put_roomless_portal(PortalRecord(CHAT, metadata={"a": 1}))
    assert await store.put_roomless_portal(PortalRecord(CHAT, name="x", metadata={"a": 2}))
    assert await store.portal(CHAT) == PortalRecord(CHAT, name="x", metadata={"a": 2})
    assert await store.claim_portal_room(CHAT, ROOM) == ROOM
    assert not await store.put_roomless_portal(PortalRecord(CHAT, name="stale"))
    assert await store.portal(CHAT) == PortalRecord(CHAT, ROOM, name="x", metadata={"a": 2})
    with pytest.raises(ValueError, match="without a room"):
        await store.put_roomless_portal(PortalRecord(DM, ROOM))


async def test_deleting_a_portal_deletes_its_message_map(store: Store) -> None:
    await store.put_portal(PortalRecord(CHAT, ROOM))
    await store.put_messages([message("m1", "$e1"), message("d1", "$d1", portal=DM)])
    await store.put_reaction(reaction("m1", "$r1"))
    await store.delete_portal(CHAT)
    assert await store.portal(CHAT) is None and await store.portal_by_room(ROOM) is None
    assert await store.message_by_event("$e1") is None
    assert await store.reaction_by_event("$r1") is None
    assert await store.message_by_event("$d1") is not None  # another portal's
    await store.delete_portal(CHAT)  # twice is fine


# -- ghosts and logins -----------------------------------------------------------


async def test_ghosts_are_put_in_a_batch_and_looked_up_among_ids(store: Store) -> None:
    bob = GhostRecord("bob", "@irc_bob:test.local", name="Bob", metadata={"host": "h"})
    carol = GhostRecord("carol", "@irc_carol:test.local")
    await store.put_ghosts([bob, carol, GhostRecord("bob", "@irc_bob:test.local", name="B2")])
    found = await store.ghosts_among(["bob", "carol", "dave", "bob", HOSTILE])
    assert found == {"bob": GhostRecord("bob", "@irc_bob:test.local", name="B2"), "carol": carol}
    assert await store.ghosts_among([]) == {}
    many = [GhostRecord(f"g{n}", f"@irc_g{n}:test.local") for n in range(1200)]
    await store.put_ghosts(many)
    assert len(await store.ghosts_among(g.id for g in many)) == 1200


async def test_a_login_keeps_its_state_credentials_and_metadata(store: Store) -> None:
    login = LoginRecord(
        "login-1", ALICE, remote_name="alice", state=LoginState.BAD_CREDENTIALS,
        credentials=b"\x00sealed\xff", metadata={"server": "irc"},
    )  # fmt: skip
    other = LoginRecord("login-0", "@zed:test.local")
    await store.put_login(login)
    await store.put_login(other)
    assert await store.login("login-1") == login
    assert await store.login("nobody") is None
    assert await store.logins() == [other, login]
    assert await store.logins(ALICE) == [login]
    await store.put_login(LoginRecord("login-1", ALICE, state=LoginState.CONNECTED))
    assert await store.logins(ALICE) == [LoginRecord("login-1", ALICE, state=LoginState.CONNECTED)]
    await store.delete_login("login-1")
    await store.delete_login("login-1")
    assert await store.logins() == [other]


async def test_metadata_reads_back_as_json_and_is_the_callers_own(store: Store) -> None:
    metadata: dict[str, object] = {"tuple": (1, 2), "text": HOSTILE}
    await store.put_ghosts([GhostRecord("bob", "@irc_bob:test.local", metadata=metadata)])
    metadata["later"] = True
    ghost = (await store.ghosts_among(["bob"]))["bob"]
    assert ghost.metadata == {"tuple": [1, 2], "text": HOSTILE}
    ghost.metadata["mutated"] = 1
    assert "mutated" not in (await store.ghosts_among(["bob"]))["bob"].metadata


# -- the message map -------------------------------------------------------------


async def test_a_messages_parts_come_back_in_part_order(store: Store) -> None:
    await store.put_messages([message("m1", "$b", part="b"), message("m1", "$a", part="a")])
    await store.put_messages([message("m2", "$c")])
    assert [m.event_id for m in await store.messages(CHAT, "m1")] == ["$a", "$b"]
    assert await store.messages(CHAT, "nope") == []
    assert await store.messages(DM, "m1") == []
    assert await store.message_by_event("$c") == message("m2", "$c")


async def test_a_matrix_event_is_claimed_once_and_completed_by_put(store: Store) -> None:
    pending = MessageRecord(CHAT, "", "$m", ROOM, sender_mxid=ALICE, timestamp=5.0, pending=True)
    other = attrs.evolve(pending, event_id="$n")
    assert await store.claim_event(pending)
    assert not await store.claim_event(pending)  # a handler that runs twice
    assert await store.claim_event(other)  # many pending rows in one portal
    assert await store.message_by_event("$m") == pending
    assert await store.messages(CHAT, "") == []  # pending: no remote id yet
    done = attrs.evolve(pending, remote_id="r1", pending=False)
    await store.put_messages([done])
    assert await store.message_by_event("$m") == done
    assert await store.messages(CHAT, "r1") == [done]
    assert not await store.claim_event(pending)


async def test_a_released_claim_can_be_claimed_again_a_completed_one_stays(
    store: Store,
) -> None:
    pending = MessageRecord(CHAT, "$m", "$m", ROOM, pending=True)
    assert await store.claim_event(pending)
    await store.release_event("$m")
    assert await store.message_by_event("$m") is None
    assert await store.claim_event(pending)
    done = attrs.evolve(pending, remote_id="r1", pending=False)
    await store.put_messages([done])
    await store.release_event("$m")
    await store.release_event("$never")
    assert await store.messages(CHAT, "r1") == [done]


async def test_a_claim_of_a_mapped_remote_part_is_refused(store: Store) -> None:
    await store.put_messages([message("m1", "$e1")])
    assert not await store.claim_event(message("m1", "$e2"))
    assert await store.message_by_event("$e2") is None


async def test_a_remote_part_maps_to_the_event_put_last(store: Store) -> None:
    await store.put_messages([message("m1", "$old")])
    await store.put_messages([message("m1", "$new")])
    assert await store.messages(CHAT, "m1") == [message("m1", "$new")]
    assert await store.message_by_event("$old") is None


async def test_in_one_batch_the_later_record_of_a_part_wins(store: Store) -> None:
    await store.put_messages([message("m1", "$a"), message("m1", "$b"), message("m1", "$a")])
    assert await store.messages(CHAT, "m1") == [message("m1", "$a")]
    assert await store.message_by_event("$b") is None


async def test_latest_messages_are_the_newest_oldest_first(store: Store) -> None:
    await store.put_messages(
        [message(f"m{n}", f"$e{n}", ts=float(n % 5)) for n in range(10)]
        + [message("x", "$x", ts=100.0, portal=DM)]
    )
    pending = MessageRecord(CHAT, "", "$p", ROOM, timestamp=99.0, pending=True)
    assert await store.claim_event(pending)
    latest = await store.latest_messages(CHAT, 4)
    # Timestamps 4, 4, 3, 3; a tie goes by event id.
    assert [m.event_id for m in latest] == ["$e3", "$e8", "$e4", "$e9"]
    assert await store.latest_messages(CHAT, 0) == []
    assert len(await store.latest_messages(CHAT, 100)) == 10
    with pytest.raises(ValueError, match="limit must be >= 0"):
        await store.latest_messages(CHAT, -1)


async def test_deleting_a_message_deletes_its_parts_and_reactions(store: Store) -> None:
    await store.put_messages(
        [message("m1", "$a", part="a"), message("m1", "$b", part="b"), message("m2", "$c")]
    )
    await store.put_reaction(reaction("m1", "$r1"))
    await store.put_reaction(attrs.evolve(reaction("m1", "$r2"), part="b"))
    await store.put_reaction(reaction("m2", "$r3"))
    await store.delete_messages(CHAT, "m1")
    assert await store.messages(CHAT, "m1") == []
    assert await store.message_by_event("$a") is None
    assert await store.reaction_by_event("$r1") is None
    assert await store.reaction_by_event("$r2") is None
    assert await store.reaction_by_event("$r3") == reaction("m2", "$r3")


async def test_reactions_are_keyed_by_part_sender_and_key(store: Store) -> None:
    first = reaction("m1", "$r1")
    await store.put_reaction(first)
    await store.put_reaction(reaction("m1", "$r2", key="❤️"))
    await store.put_reaction(reaction("m1", "$r3", sender="carol"))
    assert await store.reaction(CHAT, "m1", "", "bob", "👍") == first
    assert await store.reaction(CHAT, "m1", "x", "bob", "👍") is None
    assert await store.reaction_by_event("$r1") == first
    # The same reaction again, as a new event, replaces it.
    await store.put_reaction(reaction("m1", "$r4"))
    assert await store.reaction_by_event("$r1") is None
    assert await store.reaction(CHAT, "m1", "", "bob", "👍") == reaction("m1", "$r4")
    await store.delete_reaction("$r4")
    await store.delete_reaction("$r4")
    assert await store.reaction(CHAT, "m1", "", "bob", "👍") is None
    assert await store.reaction_by_event("$r2") is not None


# -- bad input -------------------------------------------------------------------


async def test_ids_that_no_store_could_key_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="portal ID holds NUL"):
        await store.put_portal(PortalRecord(PortalKey(HOSTILE)))
    with pytest.raises(ValueError, match="event ID holds NUL"):
        await store.put_messages([message("m1", HOSTILE)])
    with pytest.raises(ValueError, match="reaction key holds NUL"):
        await store.put_reaction(reaction("m1", "$r", key=HOSTILE))
    with pytest.raises(ValueError, match="login ID holds NUL"):
        await store.login(HOSTILE)
    with pytest.raises(ValueError, match="timestamp must be a finite number"):
        await store.put_messages([message("m1", "$e", ts=float("nan"))])
    with pytest.raises(ValueError, match="metadata is not JSON"):
        await store.put_portal(PortalRecord(CHAT, metadata={"x": object()}))
    with pytest.raises(ValueError, match="is not a valid LoginState"):
        await store.put_login(LoginRecord("l", ALICE, state="BOGUS"))  # type: ignore[arg-type]
    assert await store.portals() == []


async def test_names_are_cleaned_not_refused(store: Store) -> None:
    await store.put_portal(PortalRecord(CHAT, name=HOSTILE, topic=HOSTILE))
    portal = await store.portal(CHAT)
    assert portal is not None and portal.name == portal.topic == "a\ufffdb\ufffdc"


async def test_a_closed_store_refuses_the_bridge_records(any_backend: str) -> None:
    store = open_store(await emptied(any_backend))
    with pytest.raises(StoreError, match="not open"):
        await store.portal(CHAT)
    with pytest.raises(StoreError, match="not open"):
        await store.claim_event(message("m1", "$e1"))


# -- two stores on one database --------------------------------------------------


async def test_two_stores_racing_for_portal_rooms_agree_on_each_winner(
    durable_backend: str,
) -> None:
    """Two daemons on one database (two connections, or pools) each create a room for
    the same chats at once: each chat keeps one room, and both are told which."""
    url = await emptied(durable_backend)
    keys = [PortalKey(f"#chan{n}") for n in range(60)]
    async with open_store(url) as first, open_store(url) as second:

        async def claim(store: Store, key: PortalKey, side: str) -> str:
            return await store.claim_portal_room(key, f"!{side}-{key.id[1:]}:test.local")

        answers = await asyncio.gather(
            *(
                claim(store, key, side)
                for key in keys
                for store, side in ((first, "a"), (second, "b"))
            )
        )
        pairs = list(zip(answers[::2], answers[1::2], strict=True))
        assert all(mine == theirs for mine, theirs in pairs), pairs
        for key, (winner, _) in zip(keys, pairs, strict=True):
            assert await first.portal(key) == PortalRecord(key, winner)
            assert await second.portal_by_room(winner) == PortalRecord(key, winner)
        assert len(await first.portals()) == len(keys)


async def test_two_stores_claiming_one_event_send_it_once(durable_backend: str) -> None:
    url = await emptied(durable_backend)
    events = [MessageRecord(CHAT, "", f"$e{n}", ROOM, pending=True) for n in range(60)]
    async with open_store(url) as first, open_store(url) as second:
        claims = await asyncio.gather(
            *(store.claim_event(event) for event in events for store in (first, second))
        )
    assert [a + b for a, b in zip(claims[::2], claims[1::2], strict=True)] == [1] * len(events)


# -- schema version 6 --------------------------------------------------------------


def _version_5_of(cls: DurableStoreClass) -> DurableStoreClass:
    """The store class as the version 5 code had it: its migrations up to 5."""
    return type(
        f"{cls.__name__}V5", (cls,), {"SCHEMA_VERSION": 5, "MIGRATIONS": cls.MIGRATIONS[:5]}
    )


async def test_a_version_5_database_is_migrated_to_6_with_its_data(durable_backend: str) -> None:
    url = await emptied(durable_backend)
    cls = SQLiteStore if url.startswith("sqlite:") else PostgresStore
    async with store_at(_version_5_of(cls), url) as old:
        assert await old.schema_version() == 5
        await old.mark_registered(["@_bk_kept:test.local"])
        item = NewInboxItem(ROOM, ItemKind.EVENT, '{"type": "m.room.message"}')
        assert await old.accept_transaction("t1", [item], digest=b"d") is Acceptance.NEW
    with pytest.raises(Exception, match=r"(?i)bridge_kit_portals"):
        await run_sql(url, "SELECT * FROM bridge_kit_portals")
    async with open_store(url) as store:
        assert await store.schema_version() == 6
        assert await store.is_registered("@_bk_kept:test.local")
        assert [i.event_json for i in await store.lane_items(ROOM, 10)] == [item.event_json]
        assert await store.claim_portal_room(CHAT, ROOM) == ROOM
        await store.put_messages([message("m1", "$e1")])
        await store.put_reaction(reaction("m1", "$r1"))
        await store.put_login(LoginRecord("l", ALICE, credentials=b"c"))
        await store.put_ghosts([GhostRecord("bob", "@irc_bob:test.local")])
    async with open_store(url) as reopened:
        assert await reopened.portal_by_room(ROOM) == PortalRecord(CHAT, ROOM)
        assert await reopened.messages(CHAT, "m1") == [message("m1", "$e1")]
        assert await reopened.reaction_by_event("$r1") == reaction("m1", "$r1")
    assert await run_sql(url, "SELECT version FROM bridge_kit_schema") == [(6,)]


# -- login leases --------------------------------------------------------------------


async def test_a_login_lease_is_held_once_until_released(store: Store) -> None:
    lease = await store.take_login_lease("login-1")
    assert lease is not None and lease.held and lease.login_id == "login-1"
    # Held here already: not granted twice, even by a store that grants every lease.
    assert await store.take_login_lease("login-1") is None
    other = await store.take_login_lease("login-2")
    assert other is not None and other.held
    await lease.release()
    assert not lease.held and other.held
    await lease.release()  # twice: nothing happens, the next holder keeps it
    again = await store.take_login_lease("login-1")
    assert again is not None and again.held
    await lease.release()
    assert again.held
    with pytest.raises(ValueError):
        await store.take_login_lease(HOSTILE)


async def test_only_postgresql_shares_login_leases(any_backend: str) -> None:
    async with open_store(await emptied(any_backend)) as opened:
        assert opened.login_leases_shared is any_backend.startswith("postgresql")
        await opened.check_login_leases()  # nothing held: nothing to find lost


async def test_two_postgresql_stores_hold_each_login_lease_once(postgres_dsn: str) -> None:
    url = await emptied(postgres_dsn)
    async with open_store(url) as first, open_store(url) as second:
        held = await first.take_login_lease("login-1")
        assert held is not None
        assert await second.take_login_lease("login-1") is None  # the other daemon's
        theirs = await second.take_login_lease("login-2")
        assert theirs is not None and await first.take_login_lease("login-2") is None
        await held.release()
        taken = await second.take_login_lease("login-1")
        assert taken is not None and taken.held
        assert await first.take_login_lease("login-1") is None
        # A closed store (a stopped daemon) lets go of every lease it held.
        await second.close()
        assert not taken.held
        for login_id in ("login-1", "login-2"):
            lease = await first.take_login_lease(login_id)
            assert lease is not None and lease.held


async def test_a_login_lease_is_apart_from_the_crypto_lock_of_the_same_name(
    postgres_dsn: str,
) -> None:
    url = await emptied(postgres_dsn)
    first, second = open_store(url), open_store(url)
    async with first, second, first.crypto_lock("@same:test.local"):
        lease = await second.take_login_lease("@same:test.local")
        assert lease is not None and lease.held


async def test_a_dropped_lease_connection_loses_its_leases(postgres_dsn: str) -> None:
    """The database ends the leases' session (a restart, a cut network): the store finds
    them lost, another daemon takes them, and the first takes new ones on a new session."""
    url = await emptied(postgres_dsn)
    async with open_store(url) as first, open_store(url) as second:
        lease = await first.take_login_lease("login-1")
        assert lease is not None
        ended = await run_sql(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND objsubid = 2 AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        assert ended == [(True,)]
        taken = None
        for _ in range(100):  # the server ends the session a moment after it says so
            taken = await second.take_login_lease("login-1")
            if taken is not None:
                break
            await asyncio.sleep(0.05)
        assert taken is not None
        assert lease.held  # the first store does not know yet...
        await first.check_login_leases()
        assert not lease.held  # ...until it checks
        assert await first.take_login_lease("login-1") is None
        fresh = await first.take_login_lease("login-3")
        assert fresh is not None and fresh.held
