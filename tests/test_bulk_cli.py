"""``bridge-kit join`` and ``bridge-kit sync-profiles`` as a user runs them: subprocesses,
against the fault server (input errors, exit codes, reports) and a real Synapse (a run
SIGKILLed mid-way and resumed joins nobody twice)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge_kit.client.homeserver import HomeserverClient
from tests.conftest import TestHomeserver, _running_homeserver
from tests.helpers.daemons import room_events
from tests.helpers.fault_homeserver import WHOAMI_PATH, Fault, FaultHomeserver, Faults
from tests.test_register_cli import (
    ROOT,
    SERVER,
    TOKEN,
    Finished,
    assert_no_traceback,
    fault_registration_path,
    finish,
)

__all__ = ["fault_registration_path"]  # the fixture, used by name


async def bridge_kit(*args: str, cwd: Path, stdin: str | None = None) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge_kit", *args, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return await finish(process, stdin)


@pytest.fixture
async def hs() -> AsyncIterator[FaultHomeserver]:
    async with FaultHomeserver(as_token=TOKEN) as server:
        yield server


@pytest.mark.parametrize(
    ("command", "lines", "message"),
    [
        ("join", ["_bk_a\t!r:test.local", "_bk_b !r:test.local"],
         "pairs.tsv line 2: expected localpart<TAB>room_id_or_alias, found 1 tab-separated field"),
        ("join", ["# comment", "", "_bk_a\t!r\textra"],
         "pairs.tsv line 3: expected localpart<TAB>room_id_or_alias, found 3 tab-separated fields"),
        ("join", ["_bk_a\t "], "pairs.tsv line 1: the room is empty"),
        ("sync-profiles", ["_bk_a\tAlice\tmxc://x/y\tmore"],
         "pairs.tsv line 1: expected localpart<TAB>displayname<TAB>avatar_mxc, found 4"),
        ("sync-profiles", ["\tAlice"], "pairs.tsv line 1: the localpart is empty"),
    ],
)  # fmt: skip
async def test_a_malformed_line_stops_the_command_before_anything_is_sent(
    tmp_path: Path,
    fault_registration_path: Path,
    hs: FaultHomeserver,
    command: str,
    lines: list[str],
    message: str,
) -> None:
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    done = await bridge_kit(
        command, "-r", str(fault_registration_path), "--homeserver", hs.url,
        "--from-file", "pairs.tsv", cwd=tmp_path,
    )  # fmt: skip
    assert done.status == 2, done
    assert message in done.stderr
    assert_no_traceback(done)
    assert hs.total_requests == 0


async def test_a_malformed_line_on_stdin_stops_the_run_with_its_line_number(
    tmp_path: Path, fault_registration_path: Path, hs: FaultHomeserver
) -> None:
    pairs = "".join(f"_bk_s{i}\t!room:{SERVER}\n" for i in range(5)) + "oops\n"
    done = await bridge_kit(
        "join", "-r", str(fault_registration_path), "--homeserver", hs.url,
        "--from-file", "-", "--no-progress", cwd=tmp_path, stdin=pairs,
    )  # fmt: skip
    assert done.status == 2, done
    assert "standard input line 6: expected localpart<TAB>room_id_or_alias" in done.stderr
    assert_no_traceback(done)


async def test_join_exit_codes_report_and_rerun(
    tmp_path: Path, fault_registration_path: Path, hs: FaultHomeserver
) -> None:
    lines = [f"_bk_c{i}\t!room{i % 3}:{SERVER}" for i in range(20)]
    (tmp_path / "pairs.tsv").write_text("\n".join([*lines, "Bad Name\t!room0:x", "_bk_c0\tnoroom"]))
    args = ["join", "-r", str(fault_registration_path), "--homeserver", hs.url,
            "--from-file", "pairs.tsv", "--no-progress", "--report", "report.json"]  # fmt: skip
    first = await bridge_kit(*args, cwd=tmp_path)
    assert first.status == 1, first  # two invalid lines
    assert "invalid lines (never sent):" in first.stdout
    assert "'_bk_c0 noroom': not a room ID (!…) or room alias (#…:server)" in first.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["joined"], report["invalid"], report["ok"]) == (20, 2, False)
    assert set(report["invalid_reasons"]) == {"Bad Name !room0:x", "_bk_c0 noroom"}
    assert os.stat(tmp_path / "report.json").st_mode & 0o777 == 0o600
    sent = hs.total_requests
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    again = await bridge_kit(*args, cwd=tmp_path)
    assert again.status == 0, again
    assert hs.total_requests == sent + 1  # whoami only: every pair is known joined
    assert json.loads((tmp_path / "report.json").read_text())["skipped_known"] == 20


async def test_sync_profiles_from_a_file_and_again_with_nothing_to_send(
    tmp_path: Path, fault_registration_path: Path, hs: FaultHomeserver
) -> None:
    # The fault server has no profile route: each PUT gets its plain 404.
    (tmp_path / "profiles.tsv").write_text("_bk_p1\tAlice\n_bk_p2\t\t\n")
    done = await bridge_kit(
        "sync-profiles", "-r", str(fault_registration_path), "--homeserver", hs.url,
        "--from-file", "profiles.tsv", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert done.status == 1, done
    assert "refused by the homeserver:" in done.stdout and "'_bk_p1': setting displayname" in (
        done.stdout
    )
    assert "skipped (already set)" in done.stdout
    assert_no_traceback(done)


# -- real Synapse: SIGKILL and resume ----------------------------------------------------


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # Private: the joins make transactions for an appservice nobody serves here.
    async with _running_homeserver(tmp_path_factory.mktemp("bulk_cli")) as server:
        yield server


def joins_recorded(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM bridge_kit_members WHERE membership = 'join'"
            ).fetchone()
            return int(row[0])
    except sqlite3.Error:
        return 0  # not created yet


async def test_a_signal_during_set_up_stops_the_command_before_anything_is_sent(
    tmp_path: Path, fault_registration_path: Path
) -> None:
    # Ctrl-C while the command asks the homeserver who it is: the run must not start
    # (it used to run to the end, the signal's "saving progress" message notwithstanding).
    (tmp_path / "pairs.tsv").write_text("".join(f"_bk_i{i}\t!r:{SERVER}\n" for i in range(50)))
    async with FaultHomeserver(as_token=TOKEN, faults=Faults(slow_seconds=2.0)) as slow:
        slow.inject(Fault.SLOW, path=WHOAMI_PATH)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge_kit", "join", "-r", str(fault_registration_path),
            "--homeserver", slow.url, "--from-file", "pairs.tsv", "--no-progress", cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            while slow.total_requests == 0:
                await asyncio.sleep(0.02)
        process.send_signal(signal.SIGINT)
        done = await finish(process)

    assert done.status == 128 + signal.SIGINT, done
    assert_no_traceback(done)
    assert (slow.total_requests, len(slow.joins), slow.registered) == (1, 0, set())


async def test_join_has_connections_for_both_stages_at_full_concurrency(
    tmp_path: Path, fault_registration_path: Path
) -> None:
    # 64 joins of known puppets and 64 registrations of new ones, all slow: with one
    # pool of max(100, --concurrency) connections the joins took 64 and the
    # registrations got the 36 left, though each family has its own limit of 64.
    known = [f"_bk_k{i:02d}" for i in range(64)]
    new = [f"_bk_n{i:02d}" for i in range(64)]
    lines = [f"{lp}\t!room:{SERVER}\n" for lp in [*known, *new]]
    (tmp_path / "pairs.tsv").write_text("".join(lines))
    where = ["-r", str(fault_registration_path), "--store", "sqlite:///bk.db", "--no-progress"]
    async with FaultHomeserver(as_token=TOKEN) as hs:
        done = await bridge_kit(
            "register", *where, "--homeserver", hs.url, "--concurrency", "1", *known,
            cwd=tmp_path,
        )  # fmt: skip
        assert done.status == 0, done
        hs.reply_delay = 0.5
        done = await bridge_kit(
            "join", *where, "--homeserver", hs.url, "--concurrency", "64",
            "--from-file", "pairs.tsv", cwd=tmp_path,
        )  # fmt: skip
    assert done.status == 0, done
    assert (hs.peak_in_flight["join"], hs.peak_in_flight["register"]) == (64, 64)


@pytest.mark.slow
@pytest.mark.synapse
async def test_a_join_run_killed_mid_way_resumes_and_joins_nobody_twice(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    token = await homeserver.create_user(f"owner_{unique}")
    owner = HomeserverClient(homeserver.url, token)
    async with owner:
        rooms = []
        for _ in range(10):
            reply = await owner.request(
                "POST", "/_matrix/client/v3/createRoom", body={"preset": "public_chat"}
            )
            rooms.append(reply["room_id"])
        pairs = [(f"_bk_k{unique}_{i:03d}", rooms[i % 10]) for i in range(400)]
        (tmp_path / "pairs.tsv").write_text("".join(f"{lp}\t{room}\n" for lp, room in pairs))
        args = ["join", "-r", str(homeserver.registration_path), "--homeserver", homeserver.url,
                "--from-file", "pairs.tsv", "--store", "sqlite:///bk.db", "--concurrency", "2",
                "--no-progress"]  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge_kit", *args, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(120):
            while joins_recorded(tmp_path / "bk.db") < 60:
                assert process.returncode is None, "the run ended before it could be killed"
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        recorded = joins_recorded(tmp_path / "bk.db")
        assert 60 <= recorded < 400

        resumed = await bridge_kit(*args[:-3], "--report", "resumed.json", cwd=tmp_path)
        assert resumed.status == 0, resumed
        report = json.loads((tmp_path / "resumed.json").read_text())
        assert report["skipped_known"] >= recorded
        assert report["joined"] + report["skipped_known"] == 400

        # Through the homeserver: every puppet joined each of its rooms exactly once.
        for room_id in rooms:
            events = await room_events(owner, room_id, limit=1000)
            joins = Counter(
                event["state_key"]
                for event in events
                if event["type"] == "m.room.member" and event["content"]["membership"] == "join"
            )
            expected = {f"@{lp}:{homeserver.server_name}" for lp, room in pairs if room == room_id}
            assert {user for user in joins if user in expected} == expected
            assert all(joins[user] == 1 for user in expected), room_id
