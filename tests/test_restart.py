"""A daemon restarted soon after a stop comes back, every time (issue 13).

While the daemon is down a real user talks in a room with a puppet, so Synapse
has transactions queued for us and retries them on its own schedule: the
start-up ping then races that retry, which made Synapse report a failed ping
(``AlreadyCalled``) although it had reached us.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import TestHomeserver, _running_homeserver
from tests.helpers.daemons import Daemon, join_puppet, real_user, write_config

CYCLES = 10
SEED = 13


@pytest.fixture(scope="module")
async def homeserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    # A private Synapse: this test leaves it backing off transactions for our URL.
    async with _running_homeserver(tmp_path_factory.mktemp("restart")) as hs:
        yield hs


def pauses() -> list[float]:
    """Seconds between a stop and the next start: 0-2 s, seeded, and one of 5 s."""
    rng = random.Random(SEED)
    chosen = [rng.uniform(0, 2) for _ in range(CYCLES - 1)]
    chosen.insert(rng.randrange(CYCLES), 5.0)
    return chosen


@pytest.mark.slow
async def test_ten_quick_restarts_all_come_back(
    homeserver: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    config = write_config(homeserver, tmp_path)
    daemon = Daemon([sys.executable, "-m", "bridge_kit", "run", "-c", str(config)], tmp_path)
    client, alice = await real_user(homeserver, f"restarter{unique}")
    starts: list[float] = []
    async with client:
        room_id = await alice.create_room()
        await join_puppet(homeserver, room_id, f"_bk_restart{unique}", alice)
        for cycle, pause in enumerate(pauses()):
            starts.append(await daemon.start())
            assert await daemon.stop() == 0, daemon.log_since()
            # Queued for us while we are down: Synapse will retry it by itself.
            await alice.send_text(room_id, f"while down {cycle}")
            await asyncio.sleep(pause)
        starts.append(await daemon.start())
        accepted = await _accepted(daemon)
        assert await daemon.stop() == 0
    retried = [m for m in daemon.messages() if "trying again" in m]
    print(
        f"\n{len(starts)} starts, {min(starts):.2f}-{max(starts):.2f} s each "
        f"(median {sorted(starts)[len(starts) // 2]:.2f} s); ping retries: {len(retried)}"
    )
    assert daemon.starts == CYCLES + 1  # every start got ready (start() raises otherwise)
    assert accepted, "the transactions queued while the daemon was down never arrived"


async def _accepted(daemon: Daemon, timeout: float = 60.0) -> bool:
    """Whether the running daemon logs an accepted transaction within ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if any(m.startswith("accepted transaction") for m in daemon.messages(this_run=True)):
            return True
        await asyncio.sleep(0.2)
    return False
