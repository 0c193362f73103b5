"""The cost of bridge_kit's encryption over the raw vodozemac calls doing the same work.

Three measurements, each against a baseline of bare vodozemac calls in the same run:

- ``encrypt``: one room message through :meth:`CryptoMachine.encrypt_room_event`
  once the room key is shared (the steady state: device list known, nobody new,
  no rotation within the run: a rotation is a new session and a share, which
  ``share`` measures) to a room of ``--room-devices`` devices, against
  ``GroupSession.encrypt`` of the same canonical-JSON plaintext;
- ``decrypt``: one room event through :meth:`CryptoMachine.decrypt_room_event`
  (checks, replay record), against ``InboundGroupSession.decrypt``;
- ``share``: the room key to ``--devices`` devices, each new (claim a one-time key,
  verify its signature, start an Olm session, encrypt ``m.room_key``), against
  ``create_outbound_session`` + ``Session.encrypt`` per device.

bridge_kit's side also writes every changed session to the store (what makes it
survive a restart); ``--store`` picks it: ``memory`` (the cost of the crypto
layer alone) or ``sqlite`` (a fresh SQLite file per run: with the store's commits).
On SQLite the outbound session is committed once per 64 messages, each commit
promising the next 64 message indexes (a session loaded after a crash jumps past
them: no index is used twice); decryption commits one replay record per message,
before it returns (on the event loop's connection to the file, see SQLiteStore).

    .venv/bin/python bench/bench_crypto.py [--messages 2000] [--devices 100] [--store sqlite]
        [--room-devices 1]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import sys
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import vodozemac

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge_kit.crypto import (  # noqa: E402
    CryptoMachine,
    RotationSettings,
    canonical_json,
    derive_pickle_key,
)
from bridge_kit.store import Store, open_store  # noqa: E402
from tests.helpers.crypto_peers import OlmPeer  # noqa: E402

BOT, DEVICE, ROOM = "@bot:bench", "BENCH", "!room:bench"
#: Messages per turn when the two sides of ``encrypt`` and ``decrypt`` take turns.
CHUNK = 128


class Directory:
    """The key routes, in process, with every peer's one-time key made beforehand."""

    def __init__(self, peers: list[OlmPeer]) -> None:
        self.peers = {(p.user_id, p.device_id): p for p in peers}
        self.claimable = {key: peer.claim_one_time_key() for key, peer in self.peers.items()}
        self.sent = 0

    async def upload_keys(
        self, device_keys: Any, one_time_keys: Any, fallback_keys: Any
    ) -> Mapping[str, int]:
        return {"signed_curve25519": 50}

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        # Every user asked is answered, as the homeserver does (the bot's own user
        # too, here with no device): one left out would be asked again each message.
        keys: dict[str, dict[str, Any]] = {user_id: {} for user_id in user_ids}
        for (user_id, device_id), peer in self.peers.items():
            if user_id in user_ids:
                keys[user_id][device_id] = peer.device_keys()
        return {"device_keys": keys}

    async def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> Mapping[str, Any]:
        return {u: {d: self.claimable[(u, d)] for d in devices} for u, devices in wanted.items()}

    async def send_to_device(
        self, event_type: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.sent += sum(len(devices) for devices in messages.values())


STORE = "memory"
SCRATCH = Path(tempfile.mkdtemp(prefix="bench_crypto_"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)  # every run leaves nothing


OPENED: list[Store] = []  # closed at the end, before the event loop is


def new_store() -> Store:
    """A fresh store for each run: ``memory://`` or a new SQLite file."""
    if STORE == "memory":
        store = open_store("memory://")
    else:
        store = open_store(f"sqlite:///{SCRATCH / f'{time.time_ns()}.db'}")
    OPENED.append(store)
    return store


async def machine_for(peers: list[OlmPeer]) -> tuple[CryptoMachine, Directory]:
    directory = Directory(peers)
    store = new_store()
    await store.open()
    machine = CryptoMachine(store, BOT, DEVICE, derive_pickle_key("bench"), directory)
    await machine.start()
    return machine, directory


def timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


async def atimed(coroutine: Any) -> float:
    start = time.perf_counter()
    await coroutine
    return time.perf_counter() - start


def content(n: int) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"message number {n} with a typical length of text"}


#: Devices in the room ``encrypt`` sends to (``--room-devices``), over up to 20 users.
ROOM_DEVICES = 1


async def bench_encrypt(messages: int) -> tuple[float, float]:
    peers = [OlmPeer(f"@user{n % 20}:bench", f"D{n}") for n in range(ROOM_DEVICES)]
    machine, _ = await machine_for(peers)
    members = sorted({p.user_id for p in peers} | {BOT})
    steady = RotationSettings(period_msgs=messages + 2)  # one session for the whole run
    # The first message shares the key.
    await machine.encrypt_room_event(ROOM, "m.room.message", content(0), members, steady)

    async def ours(numbers: range) -> None:
        for n in numbers:
            await machine.encrypt_room_event(ROOM, "m.room.message", content(n), members, steady)

    session = vodozemac.GroupSession()

    def raw(numbers: range) -> None:
        for n in numbers:
            plaintext = {"type": "m.room.message", "content": content(n), "room_id": ROOM}
            session.encrypt(canonical_json(plaintext)).to_base64()

    # In turns of CHUNK messages, so that both sides run under the same load of this
    # shared machine (a chunk spans two of the store's commits, one per 64 messages).
    ours_total = raw_total = 0.0
    for start in range(0, messages, CHUNK):
        numbers = range(start, min(start + CHUNK, messages))
        ours_total += await atimed(ours(numbers))
        raw_total += timed(lambda numbers=numbers: raw(numbers))
    return ours_total, raw_total


async def bench_decrypt(messages: int) -> tuple[float, float]:
    machine, _ = await machine_for([])
    session = vodozemac.GroupSession()
    first_key = session.session_key
    # Another device's room key, as it would arrive over Olm.
    inbound = vodozemac.InboundGroupSession(first_key)
    await machine.inbound.add(ROOM, inbound, "@alice:bench", "alicecurve", "aliceed")
    events = []
    for n in range(messages):
        plaintext = canonical_json(
            {"type": "m.room.message", "content": content(n), "room_id": ROOM}
        )
        events.append(
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": session.encrypt(plaintext).to_base64(),
                "session_id": session.session_id,
                "sender_key": "alicecurve",
            }
        )

    async def ours(numbers: range) -> None:
        for n in numbers:
            await machine.decrypt_room_event(ROOM, f"$e{n}", "@alice:bench", events[n])

    raw_session = vodozemac.InboundGroupSession(first_key)

    def raw(numbers: range) -> None:
        for n in numbers:
            raw_session.decrypt(vodozemac.MegolmMessage.from_base64(events[n]["ciphertext"]))

    # In turns, as for encrypt: both sides under the same load.
    ours_total = raw_total = 0.0
    for start in range(0, messages, CHUNK):
        numbers = range(start, min(start + CHUNK, messages))
        ours_total += await atimed(ours(numbers))
        raw_total += timed(lambda numbers=numbers: raw(numbers))
    return ours_total, raw_total


async def bench_share(devices: int) -> tuple[float, float]:
    peers = [OlmPeer(f"@user{n % 20}:bench", f"D{n}") for n in range(devices)]
    machine, directory = await machine_for(peers)
    members = sorted({p.user_id for p in peers})
    await machine.refresh_devices(members)  # device tracking is not what is measured
    ours = await atimed(machine.encrypt_room_event(ROOM, "m.room.message", content(0), members))
    assert directory.sent == devices, directory.sent

    account = vodozemac.Account()
    group = vodozemac.GroupSession()
    keys = [
        (p.curve25519, next(iter(directory.claimable[(p.user_id, p.device_id)].values()))["key"])
        for p in peers
    ]

    def raw() -> None:
        room_key = canonical_json(
            {"type": "m.room_key", "content": {"session_key": group.session_key.to_base64()}}
        )
        for curve, one_time in keys:
            session = account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(curve),
                vodozemac.Curve25519PublicKey.from_base64(one_time),
            )
            session.encrypt(room_key)
        group.encrypt(
            canonical_json({"type": "m.room.message", "content": content(0), "room_id": ROOM})
        )

    return ours, timed(raw)


def report(name: str, unit: str, count: int, ours: float, raw: float) -> None:
    per_ours, per_raw = ours / count * 1e6, raw / count * 1e6
    print(
        f"{name:8} bridge_kit {per_ours:9.1f} µs/{unit}   raw vodozemac {per_raw:9.1f} µs/{unit}"
        f"   ratio {ours / raw:5.2f}x"
    )


async def best_of(repeats: int, bench: Any, count: int) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of each side (fresh inputs every run): the
    machine is shared, and the minimum is the run least disturbed by others."""
    runs = [await bench(count) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--room-devices", type=int, default=1)
    args = parser.parse_args()
    global STORE, ROOM_DEVICES  # one setting for the whole run
    STORE, ROOM_DEVICES = args.store, args.room_devices
    print(f"store: {STORE}, encrypt to a room of {ROOM_DEVICES} devices")
    encrypt = await best_of(args.repeats, bench_encrypt, args.messages)
    report("encrypt", "message", args.messages, *encrypt)
    decrypt = await best_of(args.repeats, bench_decrypt, args.messages)
    report("decrypt", "message", args.messages, *decrypt)
    ours, raw = await best_of(args.repeats, bench_share, args.devices)
    report("share", "device", args.devices, ours, raw)
    print(
        f"share    {args.devices} devices: bridge_kit {ours * 1000:.1f} ms, raw {raw * 1000:.1f} ms"
    )
    for store in OPENED:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
