"""``bridge-kit register`` as a user runs it: a subprocess, against Synapse or a fault server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from bridge_kit.store import SQLiteStore
from tests.conftest import TestHomeserver
from tests.helpers.fault_homeserver import FaultHomeserver, Faults, NotHttpServer

COMMAND = [sys.executable, "-m", "bridge_kit", "register"]
SERVER = "test.local"
TOKEN = "cli-fault-as-token"
ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class Finished:
    status: int
    stdout: str
    stderr: str


async def start(*args: str, cwd: Path, stdin: bool = False) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process, stdin: str | None = None) -> Finished:
    data = stdin.encode() if stdin is not None else None
    out, err = await asyncio.wait_for(process.communicate(data), 120)
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


async def cli(*args: str, cwd: Path, stdin: str | None = None) -> Finished:
    return await finish(await start(*args, cwd=cwd, stdin=stdin is not None), stdin)


def assert_no_traceback(done: Finished) -> None:
    assert "Traceback" not in done.stderr, done.stderr


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


async def store_contents(path: Path, user_ids: list[str]) -> set[str]:
    async with SQLiteStore(path) as store:
        return await store.registered_among(user_ids)


# -- against real Synapse ---------------------------------------------------------


async def test_registers_from_arguments_and_a_file_and_reports(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    prefix = f"_bk_{unique}_cli"
    listed = [f"{prefix}{i:04d}" for i in range(300)]
    source = write_lines(
        tmp_path / "puppets.txt",
        ["# puppets of the test", "", *listed, listed[0], "_bk_Upper", "   "],
    )
    report_path = tmp_path / "report.json"
    base = ["-r", str(synapse.registration_path), "--homeserver", synapse.url, "--no-progress"]

    done = await cli(
        *base,
        f"{prefix}_arg1",
        f"{prefix}_arg2",
        "--from-file",
        str(source),
        "--report",
        str(report_path),
        cwd=tmp_path,
    )

    assert done.status == 1, done  # one invalid localpart
    assert_no_traceback(done)
    assert "invalid localparts (never sent)" in done.stdout
    assert "'_bk_Upper': contains uppercase letters" in done.stdout
    for label in ("registered", "already existed", "skipped (known)", "invalid", "failed"):
        assert label in done.stdout
    report = json.loads(report_path.read_text())
    assert (report["registered"], report["invalid"], report["duplicates"]) == (302, 1, 1)
    assert report["ok"] is False
    assert list(report["invalid_reasons"]) == ["_bk_Upper"]
    assert await synapse.count_users(prefix) == 302
    assert (tmp_path / "bridge_kit.db").exists()  # the documented default store

    # The same list without the invalid line: everything known, nothing sent, exit 0.
    write_lines(source, listed)
    again = await cli(*base, "--from-file", str(source), "--report", str(report_path), cwd=tmp_path)
    assert again.status == 0, again
    report = json.loads(report_path.read_text())
    assert (report["skipped_known"], report["registered"], report["ok"]) == (300, 0, True)


async def test_refused_puppets_are_reported_with_the_reason(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    report_path = tmp_path / "report.json"
    done = await cli(
        "-r",
        str(synapse.registration_path),
        "--homeserver",
        synapse.url,
        f"shared_{unique}",
        f"_bk_{unique}_fine",
        "--store",
        f"sqlite:///{tmp_path / 'store.db'}",
        "--report",
        str(report_path),
        cwd=tmp_path,
    )

    assert done.status == 1, done
    assert "refused by the homeserver" in done.stdout
    assert "M_EXCLUSIVE" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["failed"] == 1 and report["registered"] == 1
    assert "M_EXCLUSIVE" in report["failures"][f"shared_{unique}"]


async def test_a_registration_the_homeserver_did_not_load_is_diagnosed(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    data = yaml.safe_load(synapse.registration_path.read_text())
    data["as_token"] = "a-token-synapse-never-loaded"
    registration = tmp_path / "stale.yaml"
    registration.write_text(yaml.safe_dump(data))

    done = await cli(
        "-r", str(registration), "--homeserver", synapse.url, f"_bk_{unique}", cwd=tmp_path
    )

    assert done.status == 2
    assert_no_traceback(done)
    assert "app_service_config_files" in done.stderr
    assert "a-token-synapse-never-loaded" not in done.stderr + done.stdout


# -- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to register"),
        (["_bk_a", "--from-file", "missing.txt"], "missing.txt: no such file"),
        (["_bk_a", "--concurrency", "0"], "--concurrency must be between"),
        (["_bk_a", "--report", "no/such/dir/r.json"], "its directory does not exist"),
        (["_bk_a", "-r", "missing.yaml"], "missing.yaml"),
        (["_bk_a", "--store", "redis://x"], "unsupported store URL"),
        (["--from-file", "latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--from-file", "."], "--from-file .: is a directory"),
        (["_bk_a", "--homeserver", "localhost:8008"], "homeserver URL must look like"),
    ],
)
async def test_usage_errors_get_one_line_and_status_2(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    registration = tmp_path / "registration.yaml"
    registration.write_text(yaml.safe_dump(_fault_registration()))
    (tmp_path / "latin1.txt").write_bytes("_bk_a\n_bk_caf\xe9\n".encode("latin-1"))
    done = await cli("--homeserver", "http://127.0.0.1:9", *extra, cwd=tmp_path)
    assert done.status == 2, done
    assert message in done.stderr
    assert_no_traceback(done)


# -- against the fault homeserver -----------------------------------------------------


def _fault_registration() -> dict[str, Any]:
    return {
        "id": "cli_fault_test",
        "url": None,
        "as_token": TOKEN,
        "hs_token": "cli-fault-hs-token",
        "sender_localpart": "_bk_bot",
        "namespaces": {"users": [{"regex": r"^@_bk_.*:test\.local$", "exclusive": True}]},
    }


@pytest.fixture
def fault_registration_path(tmp_path: Path) -> Path:
    path = tmp_path / "registration.yaml"
    path.write_text(yaml.safe_dump(_fault_registration()))
    return path


@pytest.fixture
async def slow_hs() -> AsyncIterator[FaultHomeserver]:
    faults = Faults(p_slow=1.0, slow_seconds=0.02)
    async with FaultHomeserver(as_token=TOKEN, faults=faults) as server:
        yield server


async def test_a_homeserver_url_that_is_not_http_gets_a_diagnosis_not_a_traceback(
    tmp_path: Path, fault_registration_path: Path
) -> None:
    async with NotHttpServer() as ssh:
        done = await cli("--homeserver", ssh.url, "_bk_a", "--no-progress", cwd=tmp_path)

    assert done.status == 2, done
    assert_no_traceback(done)
    assert "not a Matrix homeserver reply" in done.stderr
    assert "is this the client-server URL?" in done.stderr
    assert ssh.connections == 1


async def test_stdin_and_dry_run_send_nothing(
    tmp_path: Path, fault_registration_path: Path
) -> None:
    async with FaultHomeserver(as_token=TOKEN) as hs:
        done = await cli(
            "--homeserver",
            hs.url,
            "--from-file",
            "-",
            "--dry-run",
            cwd=tmp_path,
            stdin="_bk_a\n_bk_b\n# comment\n_bk_c\n",
        )
    assert done.status == 0, done
    assert "would register" in done.stdout
    assert hs.total_requests == 1  # whoami only
    assert hs.registered == set()


async def _wait_for_registrations(hs: FaultHomeserver, count: int) -> None:
    async with asyncio.timeout(60):
        while len(hs.registered) < count:
            await asyncio.sleep(0.02)


async def test_sigkill_mid_run_then_a_rerun_completes_correctly(
    tmp_path: Path, fault_registration_path: Path, slow_hs: FaultHomeserver
) -> None:
    localparts = [f"_bk_k{i:05d}" for i in range(3000)]
    source = write_lines(tmp_path / "puppets.txt", localparts)
    store_path = tmp_path / "resume.db"
    args = [
        "--homeserver",
        slow_hs.url,
        "--from-file",
        str(source),
        "--store",
        f"sqlite:///{store_path}",
        "--concurrency",
        "8",
        "--no-progress",
    ]

    process = await start(*args, cwd=tmp_path)
    await _wait_for_registrations(slow_hs, 600)
    process.kill()
    await process.wait()
    killed_at = len(slow_hs.registered)
    assert killed_at < len(localparts), "the run finished before it could be killed"
    all_ids = [f"@{lp}:{SERVER}" for lp in localparts]
    held = {user_id[1:].split(":")[0] for user_id in await store_contents(store_path, all_ids)}
    requests_before = Counter(slow_hs.requests_by_username)

    slow_hs.faults = Faults()
    report_path = tmp_path / "report.json"
    done = await cli(*args, "--report", str(report_path), cwd=tmp_path)

    assert done.status == 0, done
    new_requests = Counter(slow_hs.requests_by_username)
    new_requests.subtract(requests_before)
    # The rerun sent nothing for a puppet the store held, and each other one exactly once.
    assert {lp for lp in localparts if new_requests[lp]} == set(localparts) - held
    assert set(new_requests.values()) <= {0, 1}
    report = json.loads(report_path.read_text())
    assert report["skipped_known"] == len(held) > 0  # the first run's flushed batches
    assert report["registered"] + report["already_existed"] + report["skipped_known"] == 3000
    # Puppets committed but not yet flushed when killed come back as M_USER_IN_USE.
    assert report["already_existed"] <= killed_at
    assert slow_hs.registered == set(localparts)
    assert await store_contents(store_path, all_ids) == set(all_ids)


async def test_sigterm_finishes_in_flight_saves_and_summarises(
    tmp_path: Path, fault_registration_path: Path, slow_hs: FaultHomeserver
) -> None:
    localparts = [f"_bk_t{i:05d}" for i in range(3000)]
    source = write_lines(tmp_path / "puppets.txt", localparts)
    store_path = tmp_path / "term.db"
    report_path = tmp_path / "report.json"

    process = await start(
        "--homeserver",
        slow_hs.url,
        "--from-file",
        str(source),
        "--store",
        f"sqlite:///{store_path}",
        "--concurrency",
        "8",
        "--report",
        str(report_path),
        cwd=tmp_path,
    )
    await _wait_for_registrations(slow_hs, 300)
    process.send_signal(signal.SIGTERM)
    done = await finish(process)

    assert done.status == 128 + signal.SIGTERM, done
    assert_no_traceback(done)
    assert "SIGTERM" in done.stderr
    assert "cancelled: run the same command again to resume" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["cancelled"] is True
    assert 300 <= report["registered"] < 3000
    # In-flight requests finished and every confirmed puppet was flushed.
    all_ids = [f"@{lp}:{SERVER}" for lp in localparts]
    expected = {f"@{lp}:{SERVER}" for lp in slow_hs.registered}
    assert await store_contents(store_path, all_ids) == expected
    assert len(expected) == report["registered"]


async def test_with_a_config_the_store_is_the_daemons_whatever_the_cwd(
    tmp_path: Path, fault_registration_path: Path
) -> None:
    bridge_dir = tmp_path / "bridge"
    bridge_dir.mkdir()
    fault_registration_path.rename(bridge_dir / "registration.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with FaultHomeserver(as_token=TOKEN) as hs:
        config = bridge_dir / "config.yaml"
        config.write_text(
            f"homeserver: {{url: '{hs.url}'}}\n"
            "appservice: {registration: registration.yaml, store: 'sqlite:///bk.db'}\n"
            "puppets: {concurrency: 4}\n"
        )
        first = await cli("-c", str(config), "_bk_a", "_bk_b", "--no-progress", cwd=elsewhere)
        again = await cli("-c", str(config), "_bk_a", "_bk_b", "--no-progress", cwd=tmp_path)

    assert first.status == 0, first
    assert again.status == 0, again
    assert hs.registered == {"_bk_a", "_bk_b"}
    user_ids = {hs.user_id("_bk_a"), hs.user_id("_bk_b")}
    assert await store_contents(bridge_dir / "bk.db", sorted(user_ids)) == user_ids
    assert not (elsewhere / "bk.db").exists()
    assert sum(hs.requests_by_username.values()) == 2, "the rerun must find both in the store"


async def test_flags_override_the_config(tmp_path: Path, fault_registration_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "homeserver: {url: 'http://127.0.0.1:9'}\n"
        "appservice: {registration: registration.yaml, store: 'sqlite:///from-config.db'}\n"
    )
    async with FaultHomeserver(as_token=TOKEN) as hs:
        done = await cli(
            "-c", str(config), "--homeserver", hs.url, "--store", "sqlite:///flag.db",
            "_bk_flag", "--no-progress", cwd=tmp_path,
        )  # fmt: skip

    assert done.status == 0, done
    assert hs.registered == {"_bk_flag"}
    assert (tmp_path / "flag.db").exists()
    assert not (tmp_path / "from-config.db").exists()


async def test_without_a_homeserver_it_says_how_to_give_one(tmp_path: Path) -> None:
    done = await cli("_bk_a", cwd=tmp_path)
    assert done.status == 2
    assert "no homeserver: give --homeserver URL, or -c config.yaml" in done.stderr
    assert_no_traceback(done)
