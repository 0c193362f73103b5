"""``bridge-kit dead-letters``: list, replay and drop on the daemon's store, as a user runs it
(in this process, and once as a real subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_kit.inbox.records import ItemKind, NewDeadLetter, NewInboxItem
from bridge_kit.store import open_store
from tests.helpers.cli import run_cli, run_cli_subprocess

ROOT = Path(__file__).resolve().parent.parent


#: No BRIDGE_KIT_* overrides from the environment the tests run in.
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}


def bridge_kit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=ENV)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "registration.yaml").write_text("id: x\n")
    path = tmp_path / "config.yaml"
    path.write_text(
        "homeserver: {url: 'http://127.0.0.1:9'}\n"
        "appservice: {registration: registration.yaml, store: 'sqlite:///bk.db'}\n"
    )
    return path


async def bury(store_url: str, count: int) -> None:
    async with open_store(store_url) as store:
        letters = [
            NewDeadLetter(
                lane="!room:test.local", kind=ItemKind.EVENT,
                event_json=json.dumps({"type": "m.room.message", "n": n}),
                error=f"Traceback ...\nRuntimeError: broken number {n}",
                handler="bridge.on_message", attempts=5, first_failed_at=1.0,
                event_id=f"$e{n}", event_type="m.room.message",
            )
            for n in range(count)
        ]  # fmt: skip
        ok = NewInboxItem("!room:test.local", ItemKind.EVENT, '{"type": "m.x"}')
        assert await store.accept_transaction("t1", [ok], letters)


async def inbox_depth(store_url: str) -> tuple[int, int]:
    async with open_store(store_url) as store:
        stats = await store.inbox_stats()
        return stats.depth, stats.dead_letters


def test_list_replay_and_drop(config: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    asyncio.run(bury(url, 3))

    listed = bridge_kit("dead-letters", "list", "-c", str(config), cwd=tmp_path)
    as_json = bridge_kit("dead-letters", "list", "-c", str(config), "--json", cwd=tmp_path)
    letters = json.loads(as_json.stdout)
    replayed = bridge_kit("dead-letters", "replay", "-c", str(config), str(letters[0]["id"]),
                          cwd=tmp_path)  # fmt: skip
    after_replay = asyncio.run(inbox_depth(url))
    dropped = bridge_kit("dead-letters", "drop", "-c", str(config), "--all", cwd=tmp_path)

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split("\t")[:4] == [
        str(letters[0]["id"]),
        "!room:test.local",
        "$e0",
        "m.room.message",
    ]
    assert "5 attempts" in lines[0] and "RuntimeError: broken number 0" in lines[0]
    assert [letter["event_id"] for letter in letters] == ["$e0", "$e1", "$e2"]
    assert letters[0]["handler"] == "bridge.on_message"
    assert replayed.stdout.strip() == "replayed 1 dead letter"
    assert after_replay == (2, 2)  # one waiting before, the replayed one after it
    assert dropped.stdout.strip() == "dropped 2 dead letters"
    assert asyncio.run(inbox_depth(url)) == (2, 0)


def test_unknown_ids_and_usage_mistakes_are_said_plainly(config: Path, tmp_path: Path) -> None:
    asyncio.run(bury(f"sqlite:///{tmp_path / 'bk.db'}", 1))

    unknown = bridge_kit("dead-letters", "drop", "-c", str(config), "999", cwd=tmp_path)
    neither = bridge_kit("dead-letters", "replay", "-c", str(config), cwd=tmp_path)
    empty = bridge_kit("dead-letters", "list", "-c", str(config), cwd=tmp_path)

    assert unknown.returncode == 1
    assert "1 of the IDs given are not dead letters" in unknown.stderr
    assert neither.returncode == 2
    assert "give IDs or --all" in neither.stderr
    assert "Traceback" not in unknown.stderr + neither.stderr
    assert empty.returncode == 0 and len(empty.stdout.splitlines()) == 1


def test_an_empty_store_says_so(config: Path, tmp_path: Path) -> None:
    listed = bridge_kit("dead-letters", "list", "-c", str(config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "no dead letters\n"


def test_dead_letters_as_a_subprocess(config: Path, tmp_path: Path) -> None:
    asyncio.run(bury(f"sqlite:///{tmp_path / 'bk.db'}", 2))
    listed = run_cli_subprocess("dead-letters", "list", "-c", str(config), cwd=tmp_path, env=ENV)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[2] for line in listed.stdout.splitlines()] == ["$e0", "$e1"]
    unknown = run_cli_subprocess(
        "dead-letters", "drop", "-c", str(config), "999", cwd=tmp_path, env=ENV
    )
    assert unknown.returncode == 1
    assert "1 of the IDs given are not dead letters" in unknown.stderr


def test_a_reader_that_went_away_ends_the_listing_quietly(config: Path, tmp_path: Path) -> None:
    """``bridge-kit dead-letters list | head -1``, with head gone before the first write."""
    asyncio.run(bury(f"sqlite:///{tmp_path / 'bk.db'}", 2))
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "bridge_kit", "dead-letters", "list", "-c", str(config)],
            cwd=tmp_path, env=ENV, stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert listing.stderr == ""
    assert listing.returncode == 128 + 13  # ExitCode.SIGPIPE, as the shell shows it for head
