"""Encryption safe with two daemons and against floods (issue 21, section 2): the
crypto lock on a shared PostgreSQL store, Olm sessions kept only for payloads that
pass the checks, room keys by (room, sender key, session id)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import olm
import pytest
import vodozemac

from bridge_kit.crypto import (
    CryptoMachine,
    CryptoVault,
    DeviceTracker,
    InboundGroupSessions,
    OlmAccount,
    OlmPayload,
    OlmSessions,
    derive_pickle_key,
)
from bridge_kit.crypto.machine import RESERVED_INDEXES
from bridge_kit.crypto.olm import MAX_SESSIONS_PER_KEY
from bridge_kit.crypto.puppet_devices import device_id_for, stored_device_id
from bridge_kit.crypto.records import InboundSessionRecord
from bridge_kit.errors import NoRoomKey, StoreError, UndecryptableEvent
from bridge_kit.store import PostgresStore, Store, open_store
from tests.helpers.crypto_peers import KeyDirectory, OlmPeer, megolm_content
from tests.helpers.decrypt_crasher import OWNER as CRASHER_OWNER
from tests.helpers.decrypt_crasher import PICKLE_KEY as CRASHER_KEY

ROOT = Path(__file__).resolve().parent.parent
DECRYPT_CRASHER = ROOT / "tests" / "helpers" / "decrypt_crasher.py"

BOT = "@bot:test.local"
ALICE = "@alice:test.local"
ROOM = "!room:test.local"
KEY = derive_pickle_key("a configured pickle key")
OWNER = f"{BOT}|BOTDEV"


# -- two daemons on one PostgreSQL store ----------------------------------------------


async def test_two_daemons_encrypting_at_once_never_reuse_a_megolm_index(
    postgres_dsn: str, unique: str
) -> None:
    directory = KeyDirectory()
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    device = f"TWO{unique}"
    async with open_store(postgres_dsn) as first_store, open_store(postgres_dsn) as second_store:
        first = CryptoMachine(first_store, BOT, device, KEY, directory)
        second = CryptoMachine(second_store, BOT, device, KEY, directory)
        await asyncio.gather(first.start(), second.start())
        assert first.identity_keys() == second.identity_keys()  # one account, made once
        # The room's session exists (and second read it) before both send at once.
        sent = [await first.encrypt_room_event(ROOM, "m.room.message", {"n": 0}, [ALICE])]

        async def send(machine: CryptoMachine, n: int) -> dict:
            return await machine.encrypt_room_event(ROOM, "m.room.message", {"n": n}, [ALICE])

        sent += await asyncio.gather(*(send(first if n % 2 else second, n) for n in range(1, 41)))
    directory.deliver(BOT)
    indexes = [(content["session_id"], phone.decrypt_room(content)[1]) for content in sent]
    assert len(set(indexes)) == len(sent) == 41
    bodies = sorted(phone.decrypt_room(content)[0]["content"]["n"] for content in sent)
    assert bodies == list(range(41))


async def test_a_device_list_change_told_to_one_daemon_reaches_the_other(
    postgres_dsn: str, unique: str
) -> None:
    directory = KeyDirectory()
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    device = f"LISTS{unique}"
    async with open_store(postgres_dsn) as first_store, open_store(postgres_dsn) as second_store:
        told = CryptoMachine(first_store, BOT, device, KEY, directory)
        other = CryptoMachine(second_store, BOT, device, KEY, directory)
        await told.start()
        await other.start()
        await told.encrypt_room_event(ROOM, "m.room.message", {"n": 0}, [ALICE])
        await other.encrypt_room_event(ROOM, "m.room.message", {"n": 1}, [ALICE])
        laptop = directory.add(OlmPeer(ALICE, "LAPTOP"))
        # The homeserver tells one daemon (the one its transaction reached).
        await told.on_device_lists([ALICE], [])

        sent = await other.encrypt_room_event(ROOM, "m.room.message", {"n": 2}, [ALICE])

    directory.deliver(BOT)
    assert laptop.decrypt_room(sent)[0]["content"] == {"n": 2}
    assert phone.decrypt_room(sent)[0]["content"] == {"n": 2}


async def test_the_crypto_lock_makes_a_second_store_wait_and_names_the_owner(
    postgres_dsn: str, unique: str
) -> None:
    owner = f"{BOT}|LOCK{unique}"
    holder, waiter = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn, crypto_lock_wait=0.2)
    async with holder, waiter:
        async with holder.crypto_lock(owner):
            await holder.crypto_put(owner, "k", "v", b"1")  # through the locked connection
            with pytest.raises(StoreError, match=f"crypto lock of {owner}.*over 0.2 s"):
                async with waiter.crypto_lock(owner):
                    pass
            async with waiter.crypto_lock(f"{owner}-other"):  # another owner: no wait
                pass
        async with waiter.crypto_lock(owner):  # let go: taken at once
            assert await waiter.crypto_get(owner, "k", "v") == b"1"


async def test_ten_locked_blocks_at_once_need_no_second_connection(
    postgres_dsn: str, unique: str
) -> None:
    async with PostgresStore(postgres_dsn, max_connections=2) as store:

        async def block(n: int) -> bytes | None:
            owner = f"{BOT}|POOL{unique}{n}"
            async with store.crypto_lock(owner):
                await store.crypto_put(owner, "k", "v", str(n).encode())
                return await store.crypto_get(owner, "k", "v")

        results = await asyncio.wait_for(asyncio.gather(*(block(n) for n in range(10))), 30)
    assert results == [str(n).encode() for n in range(10)]


def _room_key_payload(group: vodozemac.GroupSession) -> OlmPayload:
    """Alice's ``m.room_key`` for ``group`` from its current index, as Olm hands it over."""
    content = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.session_id,
        "session_key": group.session_key.to_base64(),
    }
    return OlmPayload(ALICE, "alice's curve", "alice's ed25519", "m.room_key", content)


def _alice_event(group: vodozemac.GroupSession, n: int) -> dict:
    plaintext = json.dumps({"type": "m.room.message", "content": {"n": n}, "room_id": ROOM})
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "alice's curve",
        "ciphertext": group.encrypt(plaintext.encode()).to_base64(),
        "session_id": group.session_id,
    }


async def test_a_better_room_key_another_daemon_took_in_replaces_the_cached_one(
    postgres_dsn: str, unique: str
) -> None:
    """Each daemon caches the room keys it uses; one that reached the other daemon
    from an earlier index opens the early events here too, and only when the cached
    copy cannot: then the stored copy is read again."""
    owner = f"{BOT}|CACHE{unique}"
    group = vodozemac.GroupSession()
    from_start = _room_key_payload(group)
    early = [_alice_event(group, n) for n in range(5)]
    late_key = _room_key_payload(group)  # from index 5
    late = _alice_event(group, 5)
    async with open_store(postgres_dsn) as first_store, open_store(postgres_dsn) as second_store:
        first = InboundGroupSessions(CryptoVault(first_store, owner, KEY))
        second = InboundGroupSessions(CryptoVault(second_store, owner, KEY))
        assert await first.add_room_key(late_key) == (ROOM, group.session_id)
        assert (await first.decrypt(ROOM, "$5", ALICE, late)).content == {"n": 5}  # cached
        with pytest.raises(UndecryptableEvent, match="unknown message index"):
            await first.decrypt(ROOM, "$0", ALICE, early[0])
        assert await second.add_room_key(from_start) == (ROOM, group.session_id)
        for n, content in enumerate(early):
            assert (await first.decrypt(ROOM, f"${n}", ALICE, content)).content == {"n": n}
        # The worse copy is gone from the cache too, and garbage stays garbage.
        cached = await first.get(ROOM, "alice's curve", group.session_id)
        assert cached is not None and cached.session.first_known_index == 0
        broken = {**late, "ciphertext": late["ciphertext"][:-8] + "AAAAAAAA"}
        with pytest.raises(UndecryptableEvent, match="cannot decrypt"):
            await first.decrypt(ROOM, "$broken", ALICE, broken)


async def test_a_worse_stored_copy_does_not_take_the_place_of_a_better_cached_one(
    postgres_dsn: str, unique: str
) -> None:
    """An event before the cached copy's first index reads the stored copy again; when
    that one is no better (two daemons taking in copies at once each compare with what
    they read, and the worse may be written last), the better cached copy stays in use."""
    owner = f"{BOT}|WORSE{unique}"
    group = vodozemac.GroupSession()
    before = [_alice_event(group, n) for n in range(2)]
    from_two = _room_key_payload(group)
    events = {n: _alice_event(group, n) for n in range(2, 5)}
    from_five = vodozemac.InboundGroupSession(group.session_key)
    async with open_store(postgres_dsn) as first_store, open_store(postgres_dsn) as second_store:
        first = InboundGroupSessions(CryptoVault(first_store, owner, KEY))
        second = InboundGroupSessions(CryptoVault(second_store, owner, KEY))
        assert await first.add_room_key(from_two) is not None
        await second.add(ROOM, from_five, ALICE, "alice's curve", "alice's ed25519")
        with pytest.raises(UndecryptableEvent, match="unknown message index"):
            await first.decrypt(ROOM, "$1", ALICE, before[1])
        for n, content in events.items():
            assert (await first.decrypt(ROOM, f"${n}", ALICE, content)).content == {"n": n}


async def test_a_daemon_with_an_older_cached_copy_does_not_store_a_worse_one(
    postgres_dsn: str, unique: str
) -> None:
    """A room key compares with the stored copy on a store daemons share, not only with
    this daemon's cached one: another daemon may have stored a better copy since."""
    owner = f"{BOT}|STALE{unique}"
    group = vodozemac.GroupSession()
    _alice_event(group, 0), _alice_event(group, 1)
    from_two = _room_key_payload(group)
    events = {n: _alice_event(group, n) for n in range(2, 5)}
    from_five = _room_key_payload(group)
    for n in range(5, 10):
        _alice_event(group, n)
    from_ten = _room_key_payload(group)
    async with open_store(postgres_dsn) as first_store, open_store(postgres_dsn) as second_store:
        first = InboundGroupSessions(CryptoVault(first_store, owner, KEY))
        second = InboundGroupSessions(CryptoVault(second_store, owner, KEY))
        assert await second.add_room_key(from_ten) is not None
        assert await first.add_room_key(from_two) is not None
        assert await second.add_room_key(from_five) is None  # the stored copy is better
        restarted = InboundGroupSessions(CryptoVault(second_store, owner, KEY))
        for n, content in events.items():
            assert (await restarted.decrypt(ROOM, f"${n}", ALICE, content)).content == {"n": n}
            assert (await second.decrypt(ROOM, f"${n}", ALICE, content)).content == {"n": n}


# -- a flood of Olm messages on the fallback key ----------------------------------------


async def _loaded(store: Store) -> tuple[OlmAccount, OlmSessions]:
    vault = CryptoVault(store, OWNER, KEY)
    account = await OlmAccount.load_or_create(vault, BOT, "BOTDEV")
    sessions = OlmSessions(account, vault, DeviceTracker(vault))
    await sessions.load()
    return account, sessions


async def _olm_sessions(store: Store) -> tuple[OlmAccount, OlmSessions, str]:
    """The bot's Olm sessions, and its published fallback key (anyone can claim it)."""
    account, sessions = await _loaded(store)
    upload = await account.keys_to_upload(0)
    await account.mark_published()
    (fallback,) = upload.fallback_keys.values()
    return account, sessions, fallback["key"]


def _prekey_message(peer: OlmPeer, account: OlmAccount, fallback: str, payload: str) -> dict:
    """A new Olm session of ``peer`` on our fallback key, its first message ``payload``."""
    peer.start_session(account.curve25519, fallback)
    return peer.encrypt_raw(account.curve25519, payload)


async def test_a_flood_of_garbage_on_the_fallback_key_keeps_no_session_or_payload() -> None:
    store = open_store("memory://")
    async with store:
        account, sessions, fallback = await _olm_sessions(store)
        mallory = OlmPeer("@mallory:test.local", "MALDEV")
        good = json.loads(mallory.payload(BOT, account.ed25519, "m.dummy", {}))
        garbage = [
            "not json",
            json.dumps([1, 2]),
            json.dumps({**good, "recipient": "@other:test.local"}),
            json.dumps({**good, "sender": ALICE}),
            json.dumps({**good, "content": "text"}),
        ]
        for n in range(200):
            message = _prekey_message(mallory, account, fallback, garbage[n % len(garbage)])
            with pytest.raises(UndecryptableEvent):
                await sessions.decrypt(mallory.user_id, message)
        assert await store.crypto_items(OWNER, "olm_sessions") == {}
        assert await store.crypto_items(OWNER, "olm_decrypted") == {}
        assert not sessions.has_session(mallory.curve25519)
        # The fallback key still starts a session whose payload passes: that one is kept.
        message = _prekey_message(mallory, account, fallback, json.dumps(good))
        assert (await sessions.decrypt(mallory.user_id, message)).type == "m.dummy"
        assert len(await store.crypto_items(OWNER, "olm_sessions")) == 1


async def test_sessions_per_device_are_capped_to_the_newest_and_pruned_on_load() -> None:
    store = open_store("memory://")
    async with store:
        account, sessions, fallback = await _olm_sessions(store)
        alice = OlmPeer(ALICE, "ALICEDEV")
        payload = alice.payload(BOT, account.ed25519, "m.dummy", {})
        for _ in range(3 * MAX_SESSIONS_PER_KEY):
            await sessions.decrypt(ALICE, _prekey_message(alice, account, fallback, payload))
        assert len(await store.crypto_items(OWNER, "olm_sessions")) == MAX_SESSIONS_PER_KEY
        assert sessions.count(alice.curve25519) == MAX_SESSIONS_PER_KEY
        # Alice's newest session is one of those kept: its next message decrypts.
        later = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": 2})
        assert (await sessions.decrypt(ALICE, later)).content == {"n": 2}

        # A flood kept by an earlier release (one session per message) is pruned on load.
        flooded = dict(await store.crypto_items(OWNER, "olm_sessions"))
        (key, pickle), *_ = flooded.items()
        curve = key.split("|", 1)[0]
        old = {f"{curve}|{n:020d}|old{n}": pickle for n in range(40)}
        await store.crypto_put_many(OWNER, "olm_sessions", old)
        _, reloaded = await _loaded(store)
        kept = await store.crypto_items(OWNER, "olm_sessions")
        assert len(kept) == MAX_SESSIONS_PER_KEY == reloaded.count(curve)
        assert set(kept) == set(flooded)  # the oldest went, the newest stayed


# -- room keys by (room, sender key, session id) -------------------------------------------


async def _room_key(
    account: OlmAccount, sessions: OlmSessions, peer: OlmPeer, group: olm.OutboundGroupSession
) -> OlmPayload:
    """``group``'s key sent by ``peer``'s device over a new Olm session, decrypted."""
    upload = await account.keys_to_upload(0)
    await account.mark_published()
    one_time = next(iter(upload.one_time_keys.values()))
    peer.start_session(account.curve25519, one_time["key"])
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.id,
        "session_key": group.session_key,
    }
    content = peer.encrypt_to(BOT, account.curve25519, account.ed25519, "m.room_key", room_key)
    return await sessions.decrypt(peer.user_id, content)


async def test_a_copy_of_a_room_key_from_another_device_does_not_block_the_real_one() -> None:
    store = open_store("memory://")
    async with store:
        account, sessions = await _loaded(store)
        inbound = InboundGroupSessions(sessions.vault)
        alice, mallory = OlmPeer(ALICE, "ALICEDEV"), OlmPeer("@mallory:test.local", "MALDEV")
        group = olm.OutboundGroupSession()  # Alice's; Mallory, in the room, got its key
        assert await inbound.add_room_key(await _room_key(account, sessions, mallory, group))
        assert await inbound.add_room_key(await _room_key(account, sessions, alice, group))
        event = megolm_content(group, alice, ROOM, "m.room.message", {"body": "hi"})
        decrypted = await inbound.decrypt(ROOM, "$one", ALICE, event)
        assert (decrypted.content, decrypted.sender_key) == ({"body": "hi"}, alice.curve25519)
        # Without a sender_key (the spec deprecates it), the sender's own copy opens it.
        later = megolm_content(group, alice, ROOM, "m.room.message", {"body": "two"})
        del later["sender_key"]
        decrypted = await inbound.decrypt(ROOM, "$two", ALICE, later)
        assert decrypted.sender_key == alice.curve25519
        # Mallory's copy does not make Alice's events hers.
        forged = megolm_content(group, alice, ROOM, "m.room.message", {"body": "three"})
        forged["sender_key"] = mallory.curve25519
        with pytest.raises(UndecryptableEvent, match="another user"):
            await inbound.decrypt(ROOM, "$three", ALICE, forged)
        stored = await store.crypto_items(OWNER, "megolm_inbound")
        assert set(stored) == {
            f"{ROOM}|{alice.curve25519}|{group.id}",
            f"{ROOM}|{mallory.curve25519}|{group.id}",
        }


async def test_events_without_a_sender_key_keep_opening_with_their_senders_copy() -> None:
    """find() remembers whose copy fitted a sender: a copy another user's device
    shares later neither takes over the sender's events nor is refused its own."""
    store = open_store("memory://")
    async with store:
        account, sessions = await _loaded(store)
        inbound = InboundGroupSessions(sessions.vault)
        alice, mallory = OlmPeer(ALICE, "ALICEDEV"), OlmPeer("@mallory:test.local", "MALDEV")
        group = olm.OutboundGroupSession()
        assert await inbound.add_room_key(await _room_key(account, sessions, alice, group))
        for n in range(3):
            event = megolm_content(group, alice, ROOM, "m.room.message", {"n": n})
            del event["sender_key"]
            decrypted = await inbound.decrypt(ROOM, f"${n}", ALICE, event)
            assert (decrypted.content, decrypted.sender_key) == ({"n": n}, alice.curve25519)
        assert await inbound.add_room_key(await _room_key(account, sessions, mallory, group))
        later = megolm_content(group, alice, ROOM, "m.room.message", {"n": 3})
        del later["sender_key"]
        assert (await inbound.decrypt(ROOM, "$3", ALICE, later)).sender_key == alice.curve25519
        # Mallory holds the key too: what she sends with it is hers, from her copy.
        hers = megolm_content(group, mallory, ROOM, "m.room.message", {"n": 4})
        del hers["sender_key"]
        decrypted = await inbound.decrypt(ROOM, "$4", "@mallory:test.local", hers)
        assert decrypted.sender_key == mallory.curve25519
        unknown = await inbound.find(ROOM, group.id, "@nobody:test.local")
        assert unknown is None


async def test_room_keys_stored_by_room_and_session_move_to_their_sender_key() -> None:
    store = open_store("memory://")
    async with store:
        _, sessions = await _loaded(store)
        vault = sessions.vault
        alice = OlmPeer(ALICE, "ALICEDEV")
        groups = [olm.OutboundGroupSession() for _ in range(3)]
        for group in groups:  # as an earlier release kept them
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(group.session_key))
            record = InboundSessionRecord(
                vault.seal(session).decode("ascii"), ALICE, alice.curve25519, alice.ed25519
            )
            await vault.put_record("megolm_inbound", f"{ROOM}|{group.id}", record)
        inbound = InboundGroupSessions(vault)
        named = megolm_content(groups[0], alice, ROOM, "m.room.message", {"n": 0})
        unnamed = megolm_content(groups[1], alice, ROOM, "m.room.message", {"n": 1})
        del unnamed["sender_key"]
        assert (await inbound.decrypt(ROOM, "$0", ALICE, named)).content == {"n": 0}
        assert (await inbound.decrypt(ROOM, "$1", ALICE, unnamed)).content == {"n": 1}
        # A copy from another device of a session still under its old key leaves it be.
        other = megolm_content(groups[2], alice, ROOM, "m.room.message", {"n": 2})
        other["sender_key"] = "another device"
        with pytest.raises(NoRoomKey):
            await inbound.decrypt(ROOM, "$2", ALICE, other)
        stored = set(await store.crypto_items(OWNER, "megolm_inbound"))
        assert stored == {
            f"{ROOM}|{alice.curve25519}|{groups[0].id}",
            f"{ROOM}|{alice.curve25519}|{groups[1].id}",
            f"{ROOM}|{groups[2].id}",
        }
        # A fresh reader (a restart) finds the moved ones under their new keys.
        again = InboundGroupSessions(vault)
        assert (await again.decrypt(ROOM, "$0", ALICE, named)).content == {"n": 0}
        assert (await again.decrypt(ROOM, "$1", ALICE, unnamed)).content == {"n": 1}


# -- SQLite: the outbound session committed once per reservation ---------------------------


async def test_a_crash_between_reservations_never_reuses_a_megolm_index(tmp_path: Path) -> None:
    directory = KeyDirectory()
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    live, crashed = tmp_path / "live.db", tmp_path / "crashed.db"
    sent = []
    store = open_store(f"sqlite:///{live}")
    async with store:
        machine = CryptoMachine(store, BOT, "SQLDEV", KEY, directory)
        await machine.start()
        for n in range(10):
            sent.append(await machine.encrypt_room_event(ROOM, "m.room.message", {"n": n}, [ALICE]))
        shares = len(directory.sent)
        # What the disk holds at this moment is what a crash leaves: the files, copied
        # while the store is open (the ratchet on disk is not the one in memory).
        for suffix in ("", "-wal"):
            source = Path(f"{live}{suffix}")
            if source.exists():
                shutil.copyfile(source, f"{crashed}{suffix}")
    assert shares == 1  # the room key went out once, before the first message
    async with open_store(f"sqlite:///{crashed}") as store:
        again = CryptoMachine(store, BOT, "SQLDEV", KEY, directory)
        await again.start()
        for n in range(10, 20):
            sent.append(await again.encrypt_room_event(ROOM, "m.room.message", {"n": n}, [ALICE]))
    directory.deliver(BOT)
    indexes = [phone.decrypt_room(content)[1] for content in sent]
    assert indexes[:10] == list(range(10))
    assert indexes[10] >= RESERVED_INDEXES and indexes[10:] == sorted(set(indexes[10:]))
    assert {content["session_id"] for content in sent} == {sent[0]["session_id"]}
    assert [phone.decrypt_room(c)[0]["content"]["n"] for c in sent] == list(range(20))


# -- SQLite: replay records committed before the plaintext is handed out -------------------


async def test_after_a_sigkill_every_decrypted_index_is_still_refused_under_another_id(
    tmp_path: Path,
) -> None:
    """A real crash right after the last decryption returned: the next process refuses
    each index that was decrypted under any other event ID (a replay), and decrypts
    each event again under its own ID (a redelivery: the inbox runs again an event
    whose handling the crash cut short, and its plaintext must not be lost)."""
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    group = vodozemac.GroupSession()
    session_key = group.session_key.to_base64()  # from index 0
    events = []
    for n in range(30):
        plaintext = json.dumps({"type": "m.room.message", "content": {"n": n}, "room_id": ROOM})
        content = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "sender_key": "alice's curve",
            "ciphertext": group.encrypt(plaintext.encode()).to_base64(),
            "session_id": group.session_id,
        }
        events.append((f"$event{n}", content))
    given = tmp_path / "events.json"
    given.write_text(
        json.dumps(
            {
                "room": ROOM,
                "sender": ALICE,
                "sender_key": "alice's curve",
                "session_key": session_key,
                "events": events,
            }
        )
    )
    crasher = await asyncio.create_subprocess_exec(
        sys.executable, str(DECRYPT_CRASHER), url, str(given),
        env={"PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await crasher.communicate()
    assert crasher.returncode == -9  # SIGKILL, not a clean exit
    assert out.decode().split() == [event_id for event_id, _ in events]

    async with open_store(url) as store:
        inbound = InboundGroupSessions(CryptoVault(store, CRASHER_OWNER, CRASHER_KEY))
        for n, (event_id, content) in enumerate(events):
            with pytest.raises(UndecryptableEvent, match=f"replayed message index {n} "):
                await inbound.decrypt(ROOM, f"$replay{n}", ALICE, content)
            again = await inbound.decrypt(ROOM, event_id, ALICE, content)
            assert (again.content, again.message_index) == ({"n": n}, n)


async def test_two_daemons_making_one_puppets_device_at_once_store_one_id(
    postgres_dsn: str, unique: str
) -> None:
    puppet = f"@_bk_puppet{unique}:test.local"
    async with open_store(postgres_dsn) as first, open_store(postgres_dsn) as second:
        made = await asyncio.gather(
            *(device_id_for(store, puppet) for store in (first, second, first, second))
        )
        assert len(set(made)) == 1
        assert await stored_device_id(second, puppet) == made[0]
