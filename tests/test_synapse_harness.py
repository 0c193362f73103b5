"""The Synapse harness itself: it starts, loads our registration, and its helpers tell the truth."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from bridge_kit.registration import generate_registration
from bridge_kit.testing.synapse import SynapseServer, postgres_database
from tests.conftest import TestHomeserver, scratch_database


async def test_synapse_loaded_our_registration(synapse: TestHomeserver) -> None:
    headers = {"Authorization": f"Bearer {synapse.as_token}"}
    url = f"{synapse.url}/_matrix/client/v3/account/whoami"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["user_id"] == "@_bk_bot:test.local"


async def test_user_helpers_see_created_users(synapse: TestHomeserver, unique: str) -> None:
    assert not await synapse.user_exists(f"@harness{unique}:test.local")
    await synapse.create_user(f"harness{unique}")
    assert await synapse.user_exists(f"@harness{unique}:test.local")
    assert await synapse.count_users(f"harness{unique}") == 1


def test_a_postgres_dsn_becomes_synapses_database_section() -> None:
    section = postgres_database("postgresql://bridge:secret@db.example:6543/synapse")
    assert section["name"] == "psycopg2"
    assert section["args"] | {"cp_min": 0, "cp_max": 0} == {
        "user": "bridge",
        "password": "secret",
        "host": "db.example",
        "port": 6543,
        "database": "synapse",
        "cp_min": 0,
        "cp_max": 0,
    }
    assert "password" not in postgres_database("postgres://postgres@127.0.0.1/s")["args"]


@pytest.mark.parametrize("dsn", ["sqlite:///x.db", "postgresql://postgres@127.0.0.1:5432"])
def test_a_dsn_without_a_postgres_database_is_refused(dsn: str) -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        postgres_database(dsn)


@pytest.mark.postgres
@pytest.mark.slow
async def test_synapse_runs_on_postgresql(tmp_path: Path) -> None:
    import asyncpg

    registration = generate_registration("pg", None, "pg.local", "_pg_")
    registration.write(tmp_path / "registration.yaml")
    async with scratch_database("bk_synapse", for_synapse=True) as dsn:
        async with SynapseServer(
            tmp_path / "hs",
            registrations=[tmp_path / "registration.yaml"],
            server_name="pg.local",
            postgres=dsn,
        ) as hs:
            headers = {"Authorization": f"Bearer {registration.as_token}"}
            body = {"type": "m.login.application_service", "username": "_pg_one"}
            async with hs.http.post(
                f"{hs.url}/_matrix/client/v3/register", json=body, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
        # The account is in PostgreSQL: Synapse did not fall back to SQLite.
        connection = await asyncpg.connect(dsn)
        try:
            names = await connection.fetch("SELECT name FROM users")
        finally:
            await connection.close()
        assert "@_pg_one:pg.local" in {row["name"] for row in names}
        assert not (tmp_path / "hs" / "homeserver.db").exists()


async def test_servers_reusing_the_generated_config_get_their_own_secrets(tmp_path: Path) -> None:
    first = SynapseServer(tmp_path / "one", server_name="reuse.local")
    second = SynapseServer(tmp_path / "two", server_name="reuse.local")
    configs = []
    for server in (first, second):
        server.workdir.mkdir(parents=True)
        configs.append(yaml.safe_load((await server._write_config()).read_text()))
    for key in ("registration_shared_secret", "macaroon_secret_key", "form_secret"):
        assert configs[0][key] != configs[1][key]
    assert first._shared_secret == configs[0]["registration_shared_secret"]
    # Every path points into the server's own directory, none into the other's.
    assert configs[1]["media_store_path"] == str(second.workdir / "media_store")
    assert configs[1]["database"]["args"]["database"] == str(second.workdir / "homeserver.db")
    assert (second.workdir / "reuse.local.signing.key").is_file()


_ORPHANING_PARENT = """
import asyncio, sys
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from bridge_kit.testing.synapse import SynapseServer

async def main() -> None:
    server = SynapseServer(Path(sys.argv[1]))
    await server.start()
    print(server._process.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
async def test_synapse_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ORPHANING_PARENT,
        str(tmp_path / "hs"),
        stdout=asyncio.subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), 120)
    synapse_pid = int(line)
    assert _alive(synapse_pid)
    parent.kill()  # SIGKILL: no clean-up code of the parent runs
    await parent.wait()
    deadline = time.monotonic() + 30
    while _alive(synapse_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if _alive(synapse_pid):
        os.kill(synapse_pid, signal.SIGKILL)
        pytest.fail("Synapse outlived the process that started it")


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, killed but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
