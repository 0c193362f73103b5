"""What grows over long runs, and what a long run leaves on disk (issue 10, defect 13)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from bridge_kit.cli.report import ReportWriter
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.errors import StoreError
from bridge_kit.inbox.records import Acceptance, NewDeadLetter, NewInboxItem
from bridge_kit.inbox.signals import TransactionFailed
from bridge_kit.inbox.transactions import TransactionProcessor
from bridge_kit.puppets import PuppetRegistrar
from bridge_kit.puppets.results import KEPT_PROBLEMS
from bridge_kit.registration import generate_registration
from bridge_kit.store import MemoryStore, SQLiteStore
from tests.helpers.fault_homeserver import FaultHomeserver
from tests.test_inbox import accept, message, route_to, running, until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "long-runs-as-token"
REGISTRATION = generate_registration("long_runs", None, "test.local", "_bk_")


# -- bulk runs keep the first problems, stream the rest -------------------------------


async def test_a_bulk_run_keeps_only_the_first_invalid_localparts() -> None:
    seen: list[tuple[str, str, str]] = []
    bad = [f"_bk_Bad{i}" for i in range(KEPT_PROBLEMS * 3)]
    async with MemoryStore() as store, HomeserverClient("http://127.0.0.1:1", TOKEN) as client:
        registrar = PuppetRegistrar(client, store, REGISTRATION, "test.local")
        result = await registrar.register_many(
            bad, dry_run=True, on_problem=lambda *problem: seen.append(problem)
        )
    assert result.invalid == len(bad)
    assert list(result.invalid_reasons) == bad[:KEPT_PROBLEMS]
    assert [localpart for _, localpart, _ in seen] == bad
    assert {kind for kind, _, _ in seen} == {"invalid"}


async def test_a_bulk_run_keeps_only_the_first_refusals() -> None:
    seen: list[str] = []
    refused = [f"_bk_out{i}" for i in range(KEPT_PROBLEMS + 200)]
    # The homeserver's namespace leaves every one of these out: 400 M_EXCLUSIVE each.
    homeserver = FaultHomeserver(as_token=TOKEN, user_namespace=r"^@_bk_in.*:test\.local$")
    async with homeserver as hs, MemoryStore() as store, HomeserverClient(hs.url, TOKEN) as client:
        registrar = PuppetRegistrar(client, store, REGISTRATION, "test.local")
        result = await registrar.register_many(
            refused, concurrency=32, on_problem=lambda kind, lp, why: seen.append(kind)
        )
    assert result.failed == len(refused) and len(result.failures) == KEPT_PROBLEMS
    assert all("M_EXCLUSIVE" in reason for reason in result.failures.values())
    assert seen == ["failed"] * len(refused)


async def test_the_report_lists_every_problem_the_run_no_longer_keeps(tmp_path: Path) -> None:
    bad = [f"_bk_Bad{i}" for i in range(KEPT_PROBLEMS + 500)]
    (tmp_path / "puppets.txt").write_text("\n".join(bad) + "\n")
    REGISTRATION.write(tmp_path / "registration.yaml")
    async with FaultHomeserver(
        as_token=REGISTRATION.as_token, sender_localpart="long_runsbot"
    ) as hs:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bridge_kit", "register", "--homeserver", hs.url),
            *("--from-file", "puppets.txt", "--dry-run", "--report", "report.json"),
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 1, err.decode()
    assert f"... and {len(bad) - 50:,} more (see --report)" in out.decode()
    report_path = tmp_path / "report.json"
    report = json.loads(report_path.read_text())
    assert list(report["invalid_reasons"]) == bad
    assert report["failures"] == {} and report["invalid"] == len(bad)
    assert stat.S_IMODE(report_path.stat().st_mode) == 0o600
    # Nothing left behind: no spool or temporary file beside the report.
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"bridge_kit.db", "puppets.txt", "registration.yaml", "report.json"}


# -- the SQLite store is private --------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # the usual default: files readable by everyone
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
async def test_the_sqlite_store_and_its_companions_are_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path) as store:
        await store.lock_for_daemon()
        await store.mark_registered(["@_bk_a:test.local"])
        companions = [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in companions}
    assert modes == {p.name: 0o600 for p in companions}


@pytest.mark.usefixtures("open_umask")
async def test_an_existing_sqlite_store_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SQLiteStore(path):
        pass
    path.chmod(0o640)  # the operator's choice, e.g. for a backup group
    async with SQLiteStore(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# -- store failures are logged as such, in one line ------------------------------------


class FailingStore(MemoryStore):
    """A memory store whose inbox reads fail with ``error`` while ``failing`` is set."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.failing = False

    async def claim_lanes(
        self, owner: str, lease: float, limit: int, exclude: Collection[str] = ()
    ) -> list[str]:
        if self.failing:
            raise self.error
        return await super().claim_lanes(owner, lease, limit, exclude)

    async def accept_transaction(
        self,
        txn_id: str,
        items: list[NewInboxItem],  # type: ignore[override]
        rejected: list[NewDeadLetter] = (),  # type: ignore[assignment,override]
        *,
        digest: bytes = b"",
    ) -> Acceptance:
        if self.failing:
            raise self.error
        return await super().accept_transaction(txn_id, items, rejected, digest=digest)


async def test_an_inbox_store_failure_is_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FailingStore(StoreError("PostgreSQL store postgresql://h/db: connection lost"))
    async with store:
        await accept(store, "t1", [message("a")])
        store.failing = True
        async with running(store, route_to()):
            await until(lambda: any(r.name == "bridge_kit.inbox.lanes" for r in caplog.records))
    records = [r for r in caplog.records if r.name == "bridge_kit.inbox.lanes"]
    assert records and all(r.exc_info is None for r in records)
    assert "connection lost" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(StoreError("SQLite store /x.db: disk I/O error"), False), (KeyError("a bug"), True)],
    ids=["store-failure", "bug"],
)
async def test_a_transaction_the_store_refuses_is_logged_as_a_store_failure(
    caplog: pytest.LogCaptureFixture, error: Exception, traceback: bool
) -> None:
    store = FailingStore(error)
    async with store:
        store.failing = True
        with pytest.raises(TransactionFailed):
            await TransactionProcessor(store).process("t9", {"events": [message("a")]})
    [record] = [r for r in caplog.records if r.name == "bridge_kit.inbox.transactions"]
    assert record.levelno == logging.ERROR
    assert "could not be stored" in record.getMessage()
    assert (record.exc_info is not None) is traceback


def test_the_report_holds_a_localpart_that_is_not_utf8(tmp_path: Path) -> None:
    # A command-line argument with bytes that are not UTF-8 arrives as lone surrogates.
    path = tmp_path / "report.json"
    with ReportWriter(path) as report:
        report("invalid", "_bk_\udcff", "contains characters outside a-z 0-9 ._=-/+")
        report.write({"invalid": 1, "invalid_reasons": {}, "failures": {}})
    written = json.loads(path.read_text())
    assert written["invalid_reasons"] == {
        "_bk_\udcff": "contains characters outside a-z 0-9 ._=-/+"
    }
