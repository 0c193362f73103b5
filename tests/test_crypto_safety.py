"""Encryption safe with two daemons and against floods (issue 21, section 2): the
crypto lock on a shared PostgreSQL store, Olm sessions kept only for payloads that
pass the checks, room keys by (room, sender key, session id)."""

from __future__ import annotations

import asyncio

import pytest

from bridge_kit.crypto import CryptoMachine, derive_pickle_key
from bridge_kit.errors import StoreError
from bridge_kit.store import PostgresStore, open_store
from tests.helpers.crypto_peers import KeyDirectory, OlmPeer

BOT = "@bot:test.local"
ALICE = "@alice:test.local"
ROOM = "!room:test.local"
KEY = derive_pickle_key("a configured pickle key")


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
