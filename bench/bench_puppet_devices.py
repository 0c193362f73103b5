"""The cost of ``encryption.puppet_devices`` against the bot-device mode, in one run.

A room with ``--puppets`` speaking puppets and ``--humans`` human devices (libolm
peers, in process; the homeserver calls answered in process too, so what is
measured is bridge_kit's work and its store's commits):

- ``bot device``: every puppet encrypts with the bot's one Megolm session: the
  first puppet message shares the room key with the human devices, the rest only
  encrypt;
- ``puppet devices``: each puppet gets its own machine (Olm account and keys), a
  cross-signing identity signing its device, and its own Megolm session, shared
  with every human device on its first message (one Olm session and ``m.room_key``
  per human device).

Reported: the first message of each puppet (set-up included), then the steady
state (``--messages`` messages, round robin over the puppets), per message.

    .venv/bin/python bench/bench_puppet_devices.py [--puppets 50] [--humans 20] [--store sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.crypto import CryptoMachine, derive_pickle_key  # noqa: E402
from bridge_kit.crypto.cross_signing import CrossSigning  # noqa: E402
from bridge_kit.crypto.vault import CryptoVault  # noqa: E402
from bridge_kit.store import Store, open_store  # noqa: E402
from tests.helpers.crypto_peers import OlmPeer  # noqa: E402

BOT, DEVICE, ROOM = "@bot:bench", "BOTDEV", "!room:bench"
KEY = derive_pickle_key("bench")
SCRATCH = Path(tempfile.mkdtemp(prefix="bench_puppet_devices_"))


class Homeserver:
    """The key routes, in process: a fresh one-time key for every claim, each made
    beforehand (the human clients' work is not what is measured)."""

    def __init__(self, humans: list[OlmPeer], claims: int) -> None:
        self.humans = {(p.user_id, p.device_id): p for p in humans}
        self.pool = {
            key: [p.claim_one_time_key() for _ in range(claims)] for key, p in self.humans.items()
        }
        self.to_device = 0

    async def upload_keys(self, *_: Any) -> Mapping[str, int]:
        return {"signed_curve25519": 50}

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        keys: dict[str, dict[str, Any]] = {}
        for (user_id, device_id), peer in self.humans.items():
            if user_id in user_ids:
                keys.setdefault(user_id, {})[device_id] = peer.device_keys()
        return {"device_keys": keys}

    async def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> Mapping[str, Any]:
        return {u: {d: self.pool[(u, d)].pop() for d in devices} for u, devices in wanted.items()}

    async def send_to_device(self, event_type: str, messages: Mapping[str, Any]) -> None:
        self.to_device += sum(len(devices) for devices in messages.values())

    async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
        return None

    async def upload_signatures(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"failures": {}}


def content(n: int) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"message number {n} with a typical length of text"}


async def new_store(kind: str) -> Store:
    url = "memory://" if kind == "memory" else f"sqlite:///{SCRATCH / f'{time.time_ns()}.db'}"
    store = open_store(url)
    await store.open()
    return store


class Room:
    """One bridged room: the bot's machine, and the puppets' if they have devices."""

    def __init__(self, store: Store, server: Homeserver, puppets: list[str], own: bool) -> None:
        self.store, self.server, self.puppets, self.own = store, server, puppets, own
        self.members = [BOT, *puppets, *sorted({u for u, _ in server.humans})]
        self.bot: CryptoMachine | None = None
        self.machines: dict[str, CryptoMachine] = {}

    def bridge_users(self, user_id: str) -> bool:
        return user_id == BOT or user_id in self.puppets

    async def start(self) -> None:
        self.bot = CryptoMachine(
            self.store, BOT, DEVICE, KEY, self.server, bridge_users=self.bridge_users
        )
        await self.bot.start()
        await self.bot.refresh_devices(self.members)  # device tracking is not measured

    async def machine(self, puppet: str) -> CryptoMachine:
        assert self.bot is not None
        if not self.own:
            return self.bot
        if puppet not in self.machines:
            machine = CryptoMachine(
                self.store, puppet, "PUPDEV", KEY, self.server,
                shared_with=self.bot, bridge_users=self.bridge_users,
            )  # fmt: skip
            await machine.start()
            vault = CryptoVault(self.store, puppet, KEY)
            await CrossSigning(vault, puppet, self.server).ensure(machine.account.device_keys())
            self.machines[puppet] = machine
        return self.machines[puppet]

    async def send(self, puppet: str, n: int) -> None:
        machine = await self.machine(puppet)
        await machine.encrypt_room_event(ROOM, "m.room.message", content(n), self.members)


async def run(args: argparse.Namespace, own: bool) -> tuple[float, float, int]:
    """(seconds for every puppet's first message, seconds for the steady state,
    to-device messages sent)."""
    humans = [OlmPeer(f"@human{n % 5}:bench", f"H{n}") for n in range(args.humans)]
    puppets = [f"@puppet{n}:bench" for n in range(args.puppets)]
    server = Homeserver(humans, claims=args.puppets + 1)
    room = Room(await new_store(args.store), server, puppets, own)
    await room.start()
    start = time.perf_counter()
    for n, puppet in enumerate(puppets):
        await room.send(puppet, n)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for n in range(args.messages):
        await room.send(puppets[n % len(puppets)], n)
    steady = time.perf_counter() - start
    await room.store.close()
    return first, steady, room.server.to_device


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puppets", type=int, default=50)
    parser.add_argument("--humans", type=int, default=20, help="human devices in the room")
    parser.add_argument("--messages", type=int, default=1000, help="steady-state messages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", choices=("memory", "sqlite"), default="sqlite")
    args = parser.parse_args()
    print(
        f"store: {args.store}, {args.puppets} speaking puppets, {args.humans} human devices, "
        f"best of {args.repeats}"
    )
    for name, own in (("bot device", False), ("puppet devices", True)):
        runs = [await run(args, own) for _ in range(args.repeats)]
        first = min(r[0] for r in runs)
        steady = min(r[1] for r in runs)
        print(
            f"{name:15} first message per puppet {first / args.puppets * 1000:8.2f} ms"
            f" (all {args.puppets}: {first:6.2f} s, {runs[0][2]} to-device messages)"
            f"   steady state {steady / args.messages * 1e6:8.1f} µs/message"
        )


if __name__ == "__main__":
    asyncio.run(main())
