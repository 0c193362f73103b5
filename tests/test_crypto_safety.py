"""Encryption safe with two daemons and against floods (issue 21, section 2): the
crypto lock on a shared PostgreSQL store, Olm sessions kept only for payloads that
pass the checks, room keys by (room, sender key, session id)."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge_kit.crypto import (
    CryptoMachine,
    CryptoVault,
    DeviceTracker,
    OlmAccount,
    OlmSessions,
    derive_pickle_key,
)
from bridge_kit.crypto.olm import MAX_SESSIONS_PER_KEY
from bridge_kit.errors import StoreError, UndecryptableEvent
from bridge_kit.store import PostgresStore, Store, open_store
from tests.helpers.crypto_peers import KeyDirectory, OlmPeer

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
