"""PuppetRegistrar: against real Synapse, then the fault homeserver for 429s, resets and cancels."""

from __future__ import annotations

import asyncio
import io
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_kit.client.homeserver import HomeserverClient, RetryPolicy
from bridge_kit.errors import (
    Exclusive,
    InvalidLocalpart,
    NotInNamespace,
    RegistrationAborted,
    ResourceLimitExceeded,
    StoreError,
)
from bridge_kit.puppets import (
    BulkProgress,
    BulkResult,
    PuppetRegistrar,
    diagnose_abort,
    localparts_from_lines,
)
from bridge_kit.puppets._concurrency import AimdLimiter, SeenSet
from bridge_kit.puppets.progress import ProgressReporter, format_summary
from bridge_kit.registration import Registration
from bridge_kit.store import MemoryStore, PostgresStore, SQLiteStore, Store
from tests.conftest import TestHomeserver
from tests.helpers.fault_homeserver import (
    REGISTER_PATH,
    WHOAMI_PATH,
    Fault,
    FaultHomeserver,
    Faults,
    NotHttpServer,
)

SERVER = "test.local"
TOKEN = "fault-as-token"
FAST = RetryPolicy(max_attempts=8, base_delay=0.005, max_delay=0.05, max_rate_limit_waits=50)
FAULT_REGISTRATION = f"""
id: fault_test
url: null
as_token: {TOKEN}
hs_token: fault-hs-token
sender_localpart: _bk_bot
namespaces:
  users: [{{regex: '^@_bk_.*:test\\.local$', exclusive: true}}]
"""


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with SQLiteStore(tmp_path / "puppets.db") as store:
        yield store


@pytest.fixture
def registration(synapse: TestHomeserver) -> Registration:
    return Registration.load(synapse.registration_path)


@pytest.fixture
async def client(synapse: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse.url, synapse.as_token) as homeserver_client:
        yield homeserver_client


@pytest.fixture
def registrar(
    client: HomeserverClient, sqlite_store: Store, registration: Registration
) -> PuppetRegistrar:
    return PuppetRegistrar(client, sqlite_store, registration, SERVER)


@pytest.fixture
def fault_registration() -> Registration:
    return Registration.loads(FAULT_REGISTRATION)


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(count)]


def user_ids(localparts: list[str]) -> list[str]:
    return [f"@{lp}:{SERVER}" for lp in localparts]


# -- real Synapse ------------------------------------------------------------------


async def test_bulk_registers_2000_puppets_and_a_rerun_sends_nothing(
    synapse: TestHomeserver, registrar: PuppetRegistrar, client: HomeserverClient, unique: str
) -> None:
    prefix = f"_bk_{unique}_"
    localparts = names(prefix, 2000)
    progress: list[BulkProgress] = []

    result = await registrar.register_many(localparts, concurrency=16, progress=progress.append)

    assert (result.registered, result.already_existed, result.failed) == (2000, 0, 0)
    assert result.ok and result.aborted is None and not result.cancelled
    assert await synapse.count_users(prefix) == 2000
    assert await synapse.user_exists(f"@{localparts[-1]}:{SERVER}")
    assert await registrar.store.count_registered() == 2000
    assert progress and progress[-1].done == 2000 and progress[-1].total == 2000

    sent = client.request_count
    again = await registrar.register_many(iter(localparts), concurrency=16)
    assert client.request_count == sent
    assert again.skipped_known == 2000
    assert (again.registered, again.already_existed) == (0, 0)


async def test_user_in_use_counts_as_already_existed(
    synapse: TestHomeserver, registrar: PuppetRegistrar, client: HomeserverClient, unique: str
) -> None:
    localparts = names(f"_bk_{unique}_", 60)
    first = await registrar.register_many(localparts)
    assert first.registered == 60
    await registrar.store.forget_registered()

    sent = client.request_count
    again = await registrar.register_many(localparts)

    assert client.request_count - sent == 60
    assert (again.registered, again.already_existed, again.failed) == (0, 60, 0)
    assert again.ok
    assert await registrar.store.registered_among(user_ids(localparts)) == set(user_ids(localparts))
    # ensure_registered takes the same path: in use is success, not "created".
    await registrar.store.forget_registered()
    assert await registrar.ensure_registered(localparts[0]) is False
    assert await registrar.store.is_registered(f"@{localparts[0]}:{SERVER}")


async def test_another_appservices_exclusive_namespace_fails_with_the_reason(
    synapse: TestHomeserver, registrar: PuppetRegistrar, unique: str
) -> None:
    rivals = [f"shared_{unique}_{i}" for i in range(3)]
    ours = f"_bk_{unique}_mine"

    result = await registrar.register_many([*rivals, ours])

    assert (result.registered, result.failed, result.invalid) == (1, 3, 0)
    assert result.aborted is None and not result.ok
    assert set(result.failures) == set(rivals)
    assert all("M_EXCLUSIVE" in reason for reason in result.failures.values())
    assert not await registrar.store.is_registered(f"@{rivals[0]}:{SERVER}")
    assert not await synapse.user_exists(f"@{rivals[0]}:{SERVER}")
    with pytest.raises(Exclusive):
        await registrar.ensure_registered(f"shared_{unique}_single")


async def test_a_wrong_as_token_aborts_the_run_with_a_diagnosis(
    synapse: TestHomeserver, sqlite_store: Store, registration: Registration, unique: str
) -> None:
    async with HomeserverClient(synapse.url, "not-the-as-token") as wrong:
        registrar = PuppetRegistrar(wrong, sqlite_store, registration, SERVER)
        result = await registrar.register_many(names(f"_bk_{unique}_", 1000), concurrency=8)

        assert result.aborted is not None
        assert "app_service_config_files" in result.aborted
        assert "restarted" in result.aborted
        # The run stopped at once: only the requests already in flight went out.
        assert wrong.request_count <= 8
        assert (result.registered, result.failed) == (0, 0)
        assert not result.ok
        assert await sqlite_store.count_registered() == 0
        with pytest.raises(RegistrationAborted, match="app_service_config_files"):
            await registrar.ensure_registered(f"_bk_{unique}_single")


async def test_invalid_localparts_are_refused_before_sending(
    registrar: PuppetRegistrar, client: HomeserverClient, unique: str
) -> None:
    bad = {
        "_bk_Upper": "uppercase",
        "_bk_with space": "' '",
        "_bk_" + "x" * 260: "255",
        "": "empty",
        f"outside_{unique}": "namespaces",
    }
    sent = client.request_count

    result = await registrar.register_many(list(bad))

    assert client.request_count == sent
    assert result.invalid == len(bad)
    for localpart, words in bad.items():
        assert words in result.invalid_reasons[localpart]
    with pytest.raises(InvalidLocalpart, match="uppercase"):
        await registrar.ensure_registered("_bk_Upper")
    with pytest.raises(InvalidLocalpart, match="255"):
        await registrar.ensure_registered("_bk_" + "y" * 260)
    with pytest.raises(NotInNamespace):
        await registrar.ensure_registered(f"outside_{unique}")
    assert client.request_count == sent


async def test_100_concurrent_ensure_registered_send_one_request(
    synapse: TestHomeserver, registrar: PuppetRegistrar, client: HomeserverClient, unique: str
) -> None:
    localpart = f"_bk_{unique}_popular"
    sent = client.request_count

    created = await asyncio.gather(*(registrar.ensure_registered(localpart) for _ in range(100)))

    assert client.request_count - sent == 1
    assert all(created)
    assert await synapse.user_exists(f"@{localpart}:{SERVER}")
    # Known to the store now: no request at all.
    assert await registrar.ensure_registered(localpart) is False
    assert client.request_count - sent == 1


async def test_dry_run_sends_nothing_and_writes_nothing(
    registrar: PuppetRegistrar, client: HomeserverClient, unique: str
) -> None:
    known = names(f"_bk_{unique}_k", 5)
    await registrar.store.mark_registered(user_ids(known))
    fresh = names(f"_bk_{unique}_f", 7)
    sent = client.request_count

    result = await registrar.register_many([*known, *fresh, "Nope"], dry_run=True)

    assert client.request_count == sent
    assert (result.skipped_known, result.would_register, result.invalid) == (5, 7, 1)
    assert result.registered == 0
    assert await registrar.store.count_registered() == 5


async def test_bulk_registration_with_the_postgres_store(
    synapse: TestHomeserver,
    client: HomeserverClient,
    registration: Registration,
    postgres_dsn: str,
    unique: str,
) -> None:
    localparts = names(f"_bk_{unique}_pg", 500)
    async with PostgresStore(postgres_dsn) as store:
        registrar = PuppetRegistrar(client, store, registration, SERVER)
        result = await registrar.register_many(localparts, concurrency=16)
        assert result.registered == 500
        assert await store.registered_among(user_ids(localparts)) == set(user_ids(localparts))

        sent = client.request_count
        again = await registrar.register_many(localparts)
        assert client.request_count == sent
        assert again.skipped_known == 500
    assert await synapse.count_users(f"_bk_{unique}_pg") == 500


# -- the fault homeserver -------------------------------------------------------------


async def test_under_faults_every_puppet_is_registered_exactly_once(
    fault_registration: Registration,
) -> None:
    faults = Faults(
        p429=0.08, p503=0.05, p_reset=0.04, p_disconnect=0.02, p_commit_reset=0.04, p_slow=0.05
    )
    localparts = names("_bk_f", 2000)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=faults, seed=7) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        result = await registrar.register_many(localparts, concurrency=16)

        assert hs.registered == set(localparts)  # none lost
        # None sent again once an answer (success or M_USER_IN_USE) reached the client.
        assert hs.replies_by_username == Counter(dict.fromkeys(localparts, 1))
        # Committed-then-reset registrations come back as M_USER_IN_USE on the retry.
        assert result.registered + result.already_existed == 2000
        assert result.already_existed > 0
        assert result.failed == 0 and result.ok
        assert await store.count_registered() == 2000
        # AIMD: the 429s halved the concurrency at least once.
        assert result.rate_limited > 0
        assert result.lowest_concurrency < 16


async def _register_while_whoami_is_rate_limited(
    fault_registration: Registration, rate_limited_path: str
) -> BulkResult:
    """A bulk run of slow registrations during which 3 requests to one path get a 429."""
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p_slow=1.0, slow_seconds=0.02)) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        run = asyncio.create_task(registrar.register_many(names("_bk_r", 1000), concurrency=16))
        while len(hs.registered) < 32:
            await asyncio.sleep(0.005)
        hs.inject(*[Fault.RATE_LIMIT] * 3, path=rate_limited_path)
        await client.whoami()  # the same shared client
        assert not run.done(), "the run ended before the 429s could matter"
        result = await run
        assert hs.faults_injected[Fault.RATE_LIMIT] == 3
        assert result.registered == 1000
        return result


async def test_429s_of_other_endpoints_do_not_slow_a_bulk_run_down(
    fault_registration: Registration,
) -> None:
    result = await _register_while_whoami_is_rate_limited(fault_registration, WHOAMI_PATH)

    assert result.rate_limited == 0
    assert result.lowest_concurrency == 16


async def test_429s_of_register_do_slow_a_bulk_run_down(
    fault_registration: Registration,
) -> None:
    result = await _register_while_whoami_is_rate_limited(fault_registration, REGISTER_PATH)

    assert result.rate_limited == 3
    assert result.lowest_concurrency < 16


async def test_a_server_that_is_not_a_homeserver_aborts_the_run_with_a_diagnosis(
    fault_registration: Registration,
) -> None:
    async with (
        NotHttpServer() as ssh,
        HomeserverClient(ssh.url, TOKEN, retry=FAST) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        result = await registrar.register_many(names("_bk_n", 100), concurrency=4)

    assert result.aborted is not None
    assert "not a Matrix homeserver reply" in result.aborted
    assert "client-server URL" in result.aborted
    assert result.registered == result.failed == 0
    assert client.request_count <= 4  # the requests in flight, none retried


async def test_duplicates_in_a_streamed_async_input_are_dropped(
    fault_registration: Registration,
) -> None:
    async def source() -> AsyncIterator[str]:
        for i in range(3000):
            yield f"_bk_d{i % 1000:04d}"

    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        result = await registrar.register_many(source())

        assert result.registered == 1000
        assert result.duplicates == 2000
        assert sum(hs.requests_by_username.values()) == 1000


async def test_cancel_stops_issuing_lets_in_flight_finish_and_flushes(
    fault_registration: Registration, tmp_path: Path
) -> None:
    localparts = names("_bk_c", 2000)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p_slow=1.0, slow_seconds=0.02)) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        SQLiteStore(tmp_path / "cancel.db") as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)

        def cancel_midway(progress: BulkProgress) -> None:
            if progress.done >= 200:
                registrar.cancel()

        result = await registrar.register_many(localparts, concurrency=8, progress=cancel_midway)

        assert result.cancelled and not result.ok
        assert 200 <= result.registered < 2000
        # Everything the server committed was confirmed and flushed: nothing is in limbo.
        known = await store.registered_among(user_ids(localparts))
        assert known == set(user_ids(sorted(hs.registered)))
        assert len(known) == result.registered

        hs.faults = Faults()
        again = await registrar.register_many(localparts, concurrency=8)
        assert again.skipped_known == result.registered
        assert again.registered == 2000 - result.registered
        assert hs.registered == set(localparts)


async def test_cancelling_the_task_returns_a_cancelled_result(
    fault_registration: Registration,
) -> None:
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p_slow=1.0, slow_seconds=0.02)) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        task = asyncio.create_task(registrar.register_many(names("_bk_t", 5000), concurrency=8))
        while len(hs.registered) < 100:
            await asyncio.sleep(0.01)
        task.cancel()

        result = await task

        assert result.cancelled
        assert 100 <= result.registered < 5000
        assert await store.count_registered() == len(hs.registered) == result.registered


async def test_an_endless_input_is_streamed_until_cancelled(
    fault_registration: Registration,
) -> None:
    consumed = 0

    def endless() -> Iterator[str]:
        nonlocal consumed
        while True:
            consumed += 1
            yield f"_bk_e{consumed}"

    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)

        def stop_after_3000(progress: BulkProgress) -> None:
            if progress.done >= 3000:
                registrar.cancel()

        result = await registrar.register_many(endless(), progress=stop_after_3000)

        assert result.cancelled
        assert result.registered >= 3000
        # Read ahead by a few chunks at most, never the whole input.
        assert consumed - result.registered < 10_000


class BrokenStore(MemoryStore):
    async def mark_registered(self, user_ids: Iterable[str]) -> None:
        raise StoreError("disk full")


async def test_a_broken_store_ends_the_run_with_its_error(
    fault_registration: Registration,
) -> None:
    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        BrokenStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        async with asyncio.timeout(30):
            with pytest.raises(StoreError, match="disk full"):
                await registrar.register_many(names("_bk_s", 20_000))
        assert len(hs.registered) < 20_000  # it stopped issuing


async def test_a_broken_input_ends_the_run_with_its_error(
    fault_registration: Registration,
) -> None:
    def lines() -> Iterator[str]:
        yield from names("_bk_i", 1500)
        raise OSError("input/output error")

    async with (
        FaultHomeserver(as_token=TOKEN) as hs,
        HomeserverClient(hs.url, TOKEN) as client,
        MemoryStore() as store,
    ):
        registrar = PuppetRegistrar(client, store, fault_registration, SERVER)
        async with asyncio.timeout(30):
            with pytest.raises(OSError, match="input/output error"):
                await registrar.register_many(lines())
        # What was registered before the error is saved, so a re-run resumes.
        assert await store.count_registered() == len(hs.registered) > 0


async def test_a_resource_limit_aborts_instead_of_failing_each_puppet() -> None:
    error = ResourceLimitExceeded(
        403, "M_RESOURCE_LIMIT_EXCEEDED", "MAU limit reached", {"admin_contact": "mailto:x@y"}
    )
    diagnosis = diagnose_abort(error)
    assert diagnosis is not None
    assert "monthly-active-user" in diagnosis and "mailto:x@y" in diagnosis
    assert diagnose_abort(Exclusive(400, "M_EXCLUSIVE", "reserved")) is None


# -- the parts ---------------------------------------------------------------------------


class FakeClock:
    """A clock that stands still until a test moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_aimd_limiter_halves_on_congestion_and_grows_back_slowly() -> None:
    clock = FakeClock()
    limiter = AimdLimiter(16, clock=clock)
    limiter.congestion(pause=0.0)
    assert limiter.limit == 8
    assert limiter.paused_until > clock.now  # even a zero pause lasts a moment
    limiter.congestion(pause=0.0)  # within the pause after the first cut: ignored
    assert limiter.limit == 8

    for _ in range(8):
        await limiter.acquire()
        limiter.release(success=True)
    assert limiter.limit == 9
    assert limiter.lowest == 8
    assert limiter.in_flight == 0

    for _ in range(10):
        clock.now = limiter.paused_until
        limiter.congestion()
    assert limiter.limit == limiter.lowest == 1
    assert limiter.maximum == 16


def test_aimd_limiter_counts_congestion_within_the_pause_once() -> None:
    clock = FakeClock()
    limiter = AimdLimiter(16, clock=clock)
    limiter.congestion(pause=2.0)
    assert limiter.paused_until == clock.now + 2.0

    clock.now = limiter.paused_until - 0.1
    limiter.congestion(pause=2.0)  # the 429 of a request already in flight at the cut
    assert limiter.limit == 8

    clock.now = limiter.paused_until
    limiter.congestion(pause=2.0)
    assert limiter.limit == 4


async def test_aimd_limiter_holds_back_acquirers_beyond_the_limit() -> None:
    limiter = AimdLimiter(2)
    await limiter.acquire()
    await limiter.acquire()
    third = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not third.done()
    assert limiter.in_flight == 2
    limiter.release(success=True)
    await asyncio.wait_for(third, 1)
    assert limiter.in_flight == 2


@given(st.lists(st.text(max_size=6), max_size=300))
def test_seen_set_agrees_with_a_python_set(items: list[str]) -> None:
    seen = SeenSet(capacity=4)
    reference: set[str] = set()
    for item in items:
        assert seen.add(item) == (item not in reference)
        reference.add(item)


def test_seen_set_grows_to_many_items() -> None:
    seen = SeenSet()
    items = [f"_bk_{i}" for i in range(50_000)]
    random.Random(1).shuffle(items)
    assert all(seen.add(item) for item in items)
    assert not any(seen.add(item) for item in items[:1000])


def test_localparts_from_lines_skips_blanks_and_comments() -> None:
    lines = io.StringIO("# puppets\n_bk_a\n\n  _bk_b  \n#_bk_c\n_bk_d")
    assert list(localparts_from_lines(lines)) == ["_bk_a", "_bk_b", "_bk_d"]


def test_result_json_and_summary_carry_every_count() -> None:
    result = BulkResult(registered=3, already_existed=2, skipped_known=1, invalid=1, failed=1)
    result.invalid_reasons["Bad"] = "contains uppercase letters"
    result.failures["shared_x"] = "400 M_EXCLUSIVE: reserved"
    data = result.to_json()
    assert data["ok"] is False
    assert data["failures"] == {"shared_x": "400 M_EXCLUSIVE: reserved"}
    assert data["invalid_reasons"] == {"Bad": "contains uppercase letters"}
    for key in ("registered", "already_existed", "skipped_known", "invalid", "failed"):
        assert key in data
    summary = format_summary(result)
    for words in ("registered", "already existed", "skipped (known)", "invalid", "failed"):
        assert words in summary


def _snapshot(done: int, total: int | None) -> BulkProgress:
    return BulkProgress(
        done=done,
        total=total,
        elapsed=2.0,
        registered=done,
        already_existed=0,
        skipped_known=0,
        invalid=0,
        failed=0,
        concurrency=16,
    )


def test_progress_on_a_terminal_redraws_one_line_with_rate_and_eta() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=True, interval=0)
    reporter(_snapshot(500, 1000))
    reporter(_snapshot(1000, 1000))
    reporter.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "500/1,000" in text and "250/s" in text and "ETA 2.0 s" in text
    assert "100%" in text


def test_progress_in_a_log_writes_only_the_final_line() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=False, total=1000)
    for done in range(0, 1001, 100):
        reporter(_snapshot(done, None))
    assert out.getvalue() == ""  # nothing while it runs
    reporter.close()
    reporter.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("progress: 1,000/1,000 (100%)")


def test_progress_in_a_log_with_an_interval_prints_plain_lines_at_most_that_often() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=False, interval=3600, total=1000)
    reporter(_snapshot(100, None))
    reporter(_snapshot(200, None))  # within the interval: not printed now
    reporter.close()  # but the final state is
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(",")[0] for line in lines] == ["progress: 100/1", "progress: 200/1"]


def test_a_disabled_reporter_writes_nothing() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=False, enabled=False)
    reporter(_snapshot(100, 1000))
    reporter.close()
    assert out.getvalue() == ""
