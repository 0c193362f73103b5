"""`bridge-kit check --homeserver` and `bridge-kit demo` against a real Synapse."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import yaml
from aiohttp import web

from bridge_kit.server.appservice_api import serve_app
from tests.conftest import TestHomeserver
from tests.helpers.daemons import Daemon, write_config


async def bridge_kit(*args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge_kit", *args,
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def write_registration(tmp_path: Path, synapse: TestHomeserver, **changes: object) -> Path:
    path = tmp_path / "registration.yaml"
    path.write_text(yaml.safe_dump(synapse.registration_data() | changes))
    path.chmod(0o600)
    return path


async def test_check_confirms_whoami_and_ping(synapse: TestHomeserver, tmp_path: Path) -> None:
    path = write_registration(tmp_path, synapse)
    code, out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
    )
    assert code == 0, out + err
    assert "ok: the homeserver knows this registration (sender @_bk_bot:test.local)" in out
    assert f"ok: the homeserver reached {synapse.appservice_url} in" in out


async def test_check_diagnoses_a_registration_not_loaded(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    path = write_registration(tmp_path, synapse, as_token="n" * 64)
    code, _out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
    )
    assert code == 2
    assert "app_service_config_files" in err
    assert "Traceback" not in err


async def test_check_diagnoses_an_hs_token_mismatch(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    path = write_registration(tmp_path, synapse, hs_token="m" * 64)
    code, _out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
    )
    assert code == 2
    assert "hs_token" in err and "(403)" in err, err


async def test_check_diagnoses_an_unreachable_homeserver(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    code, out, _ = await bridge_kit(
        "generate-registration", "--id", "x", "--url", "http://127.0.0.1:9", "--domain", "x.org",
        "--user-prefix", "_x_", "-o", str(path), cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, out
    code, out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert code == 2
    assert "cannot reach the homeserver at http://127.0.0.1:9" in err
    assert "Traceback" not in err


async def test_demo_runs_the_whole_loop_and_reads_cleanly_when_piped(tmp_path: Path) -> None:
    code, out, err = await bridge_kit("demo", "--puppets", "300", cwd=tmp_path)
    assert code == 0, out + err
    assert "as @demo_bridge:demo.local" in out  # a sender outside the puppet namespace
    assert "300 skipped, 0 requests" in out
    assert "answered with $" in out
    # A pipe gets plain lines: no redrawn frames, each step once, no progress on stderr.
    assert "\r" not in out + err and "\x1b" not in out + err
    steps = [line for line in out.splitlines() if line.startswith(("✓", "…", "✗"))]
    assert len(steps) >= 9 and all(line.startswith("✓") for line in steps), steps
    assert len({line.split(" (")[0] for line in steps}) == len(steps), steps
    assert "progress" not in err and "Traceback" not in err, err


async def test_bulk_import_example_registers_and_resumes(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    example = Path(__file__).parent.parent / "examples" / "bulk_import.py"
    (tmp_path / "users.txt").write_text("".join(f"User{i}\n" for i in range(30)))
    args = [
        str(example), "-r", str(synapse.registration_path), "--homeserver", synapse.url,
        "--prefix", f"_bk_imp{unique}_", "--store", "sqlite:///import.db", "users.txt",
    ]  # fmt: skip
    for run in ("first", "second"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, stderr.decode()
        expected = "30 registered" if run == "first" else "30 skipped (known)"
        assert expected in stdout.decode(), stdout.decode()
    assert await synapse.count_users(f"_bk_imp{unique}_") == 30


async def test_check_with_the_bridge_running_has_the_homeserver_ping_the_bridge(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    path = write_registration(tmp_path, synapse)
    config = write_config(synapse, tmp_path)
    daemon = Daemon([sys.executable, "-m", "bridge_kit", "run", "-c", str(config)], tmp_path)
    async with daemon:
        code, out, err = await bridge_kit(
            "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
        )
        assert daemon.process is not None and daemon.process.returncode is None
    assert code == 0, out + err
    assert (
        f"note: {synapse.appservice_url} is served by the running bridge_kit daemon of "
        f"'{synapse.appservice_id}'; the homeserver pings it there"
    ) in out
    assert f"ok: the homeserver reached {synapse.appservice_url} in" in out


async def test_check_with_another_server_on_the_port_says_so(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    path = write_registration(tmp_path, synapse)
    squatter = await serve_app(web.Application(), "127.0.0.1", synapse.appservice_port)
    try:
        code, _out, err = await bridge_kit(
            "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
        )
    finally:
        await squatter.cleanup()
    assert code == 2
    assert "is served by a process that is not a bridge_kit daemon" in err
    assert "answered 404 to the ping: is something else listening on that port?" in err
    assert "the homeserver said: 502 M_BAD_STATUS" in err


async def test_every_command_finds_the_store_next_to_the_config(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    bridge_dir, here, there = (tmp_path / name for name in ("bridge", "here", "there"))
    for directory in (bridge_dir, here, there):
        directory.mkdir()
    config = str(write_config(synapse, bridge_dir))  # store: sqlite:///bridge_kit.db
    puppet = f"_bk_storepath{unique}"
    first = await bridge_kit("register", "-c", config, puppet, "--no-progress", cwd=here)
    again = await bridge_kit("register", "-c", config, puppet, "--no-progress", cwd=there)
    letters = await bridge_kit("dead-letters", "list", "-c", config, cwd=there)
    daemon = Daemon([sys.executable, "-m", "bridge_kit", "run", "-c", config], there)
    async with daemon:
        started = daemon.messages(this_run=True)
    assert first[0] == 0 and re.search(r"registered +1\n", first[1]), first
    assert again[0] == 0 and re.search(r"skipped \(known\) +1\n", again[1]), again
    assert letters[:2] == (0, "no dead letters\n"), letters
    assert f"store: sqlite:///{bridge_dir / 'bridge_kit.db'}" in started
    assert (bridge_dir / "bridge_kit.db").exists()
    assert not (here / "bridge_kit.db").exists() and not (there / "bridge_kit.db").exists()
