"""The bulk engine's per-family AIMD and join_many's edges, against the fault-injecting
homeserver (Synapse will not answer 429 on joins alone on demand)."""

from __future__ import annotations

import asyncio

import pytest

from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.puppets import PuppetRegistrar
from bridge_kit.registration import Registration
from bridge_kit.store import MemoryStore
from tests.helpers.fault_homeserver import JOIN_PATH, Fault, FaultHomeserver
from tests.test_puppets import FAST, SERVER, TOKEN, fault_registration, names

__all__ = ["fault_registration"]  # the fixture, used by name

ROOMS = [f"!room{i}:{SERVER}" for i in range(5)]


async def test_429s_on_joins_slow_joins_only_and_every_join_completes(
    fault_registration: Registration,
) -> None:
    puppets = names("_bk_f", 200)
    pairs = [(lp, ROOMS[i % 5]) for i, lp in enumerate(puppets)]
    # Latency, so that requests overlap and concurrency shows at the server; the first
    # 60 joins get a 429 with retry_after_ms, registrations none.
    async with FaultHomeserver(as_token=TOKEN, reply_delay=0.02, seed=3) as hs:
        hs.inject(*[Fault.RATE_LIMIT] * 60, path=JOIN_PATH)
        async with HomeserverClient(hs.url, TOKEN, retry=FAST) as client, MemoryStore() as store:
            registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
            async with asyncio.timeout(60):
                result = await registrar.join_many(pairs, concurrency=16)

    assert (result.joined, result.failed, result.registered) == (200, 0, 200), result.summary()
    assert result.rate_limited == {"register": 0, "join": 60}
    assert result.lowest_concurrency["register"] == 16  # untouched by the joins' 429s
    assert result.lowest_concurrency["join"] < 16
    # At the server: registrations ran 16 at a time while joins were being cut.
    assert hs.peak_in_flight["register"] == 16
    assert hs.faults_injected[Fault.RATE_LIMIT] == 60
    assert set(hs.joins) == {(room, f"@{lp}:{SERVER}") for lp, room in pairs}


async def test_a_rerun_of_join_many_sends_nothing_for_recorded_joins(
    fault_registration: Registration,
) -> None:
    pairs = [(lp, ROOMS[0]) for lp in names("_bk_r", 50)]
    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        first = await registrar.join_many(iter(pairs))
        sent = hs.total_requests
        again = await registrar.join_many(iter(pairs))
        assert (first.joined, again.skipped_known, hs.total_requests - sent) == (50, 50, 0)
        # A join refused with 403 and no bot to let it in fails with the reason.
        refused = await registrar.join_many([("_bk_bot", ROOMS[1])])
        assert refused.failed == 1 and "403" in next(iter(refused.failures.values()))


async def test_join_many_streams_an_async_iterable_and_refuses_one_string(
    fault_registration: Registration,
) -> None:
    async def pairs():  # type: ignore[no-untyped-def]
        for lp in names("_bk_a", 30):
            yield lp, ROOMS[2]

    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        result = await registrar.join_many(pairs())
        assert result.joined == 30
        with pytest.raises(TypeError, match="not one string"):
            await registrar.join_many("_bk_a\t!room:x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"\(localpart, room_id_or_alias\) pairs"):
            await registrar.join_many([("only one",)])  # type: ignore[list-item]


async def test_a_refused_token_aborts_join_many_with_a_diagnosis(
    fault_registration: Registration,
) -> None:
    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, "not-the-token", retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        result = await registrar.join_many([(lp, ROOMS[0]) for lp in names("_bk_t", 100)])
    assert result.aborted is not None and "M_UNKNOWN_TOKEN" in result.aborted
    assert result.joined == 0 and not result.ok
    assert hs.total_requests < 100  # stopped at once, not once per pair


async def test_cancelling_join_many_saves_what_was_joined_and_a_rerun_finishes(
    fault_registration: Registration,
) -> None:
    pairs = [(lp, ROOMS[3]) for lp in names("_bk_c", 300)]
    async with (
        FaultHomeserver(as_token=TOKEN, reply_delay=0.01) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        task = asyncio.create_task(registrar.join_many(pairs, concurrency=4))
        while len(hs.joins) < 20:
            await asyncio.sleep(0.01)
        registrar.cancel()
        first = await task
        assert first.cancelled and 20 <= first.joined < 300
        # Every join the homeserver made was recorded: the re-run sends none of them again.
        rest = await registrar.join_many(pairs, concurrency=4)
        assert (rest.skipped_known, rest.joined) == (first.joined, 300 - first.joined)
        assert set(hs.joins.values()) == {1}
