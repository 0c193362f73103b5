"""Keys from other homeservers: what a remote server (or a malicious one) answers
for its users' devices through ``/keys/query`` and ``/keys/claim`` is checked per
device, so one malformed device never stops the bridge from encrypting to the
rest. Synapse validates the keys its own users upload, so the remote answers come
from a small real aiohttp server standing in for the homeserver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge_kit import HomeserverClient
from bridge_kit.crypto import CryptoMachine, derive_pickle_key
from bridge_kit.crypto.bridge import _IntentKeys
from bridge_kit.intent import Intent
from bridge_kit.store import open_store
from tests.helpers.crypto_peers import KeyDirectory, OlmPeer

BOT = "@bot:test.local"
DEVICE = "BRIDGEDEV"
ALICE = "@alice:test.local"
MALLORY = "@mallory:evil.example"
ROOM = "!room:test.local"
TOKEN = "as-token"


class RemoteKeys:
    """``/keys/query``, ``/keys/claim`` and ``/sendToDevice`` with Alice's good device
    and the devices of Mallory's homeserver, malformed in every way it likes."""

    def __init__(self, alice: OlmPeer) -> None:
        self.alice = alice
        self.sent: list[dict[str, Any]] = []
        good = OlmPeer(MALLORY, "GOOD").device_keys()
        self.mallory_devices = {
            "GOOD": good,  # well formed, but its claimed keys are not
            "NOALGOS": {**OlmPeer(MALLORY, "NOALGOS").device_keys(), "algorithms": None},
            "NOKEYS": {"user_id": MALLORY, "device_id": "NOKEYS"},
            "LIST": ["not", "an", "object"],
            "BADKEY": {**good, "device_id": "BADKEY", "keys": {"ed25519:BADKEY": 7}},
        }

    async def query(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "device_keys": {
                    ALICE: {"PHONE": self.alice.device_keys()},
                    MALLORY: self.mallory_devices,
                },
                "failures": {},
            }
        )

    async def claim(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "one_time_keys": {
                    ALICE: {"PHONE": self.alice.claim_one_time_key()},
                    MALLORY: ["not", "an", "object"],
                },
                "failures": {},
            }
        )

    async def send(self, request: web.Request) -> web.Response:
        self.sent.append(await request.json())
        return web.json_response({})


@pytest.fixture
async def remote() -> AsyncIterator[tuple[RemoteKeys, TestServer]]:
    keys = RemoteKeys(OlmPeer(ALICE, "PHONE"))
    app = web.Application()
    app.router.add_post("/_matrix/client/v3/keys/query", keys.query)
    app.router.add_post("/_matrix/client/v3/keys/claim", keys.claim)
    app.router.add_put("/_matrix/client/v3/sendToDevice/{type}/{txn}", keys.send)
    async with TestServer(app, host="127.0.0.1") as server:
        yield keys, server


async def test_malformed_remote_devices_and_claims_do_not_stop_the_room_key_reaching_the_rest(
    remote: tuple[RemoteKeys, TestServer],
) -> None:
    keys, server = remote
    store = open_store("memory://")
    async with store, HomeserverClient(str(server.make_url("")), TOKEN) as client:
        machine = CryptoMachine(store, BOT, DEVICE, derive_pickle_key("k" * 16), KeyDirectory())
        await machine.start()
        machine.api = _IntentKeys(Intent(client, BOT).with_device(DEVICE))
        content = await machine.encrypt_room_event(
            ROOM, "m.room.message", {"body": "hello"}, [ALICE, MALLORY, BOT]
        )
        assert set(machine.tracker.devices(ALICE)) == {"PHONE"}
        assert set(machine.tracker.devices(MALLORY)) == {"GOOD"}  # the others left out
        [sent] = keys.sent
        assert set(sent["messages"]) == {ALICE}
        payload = keys.alice.decrypt(sent["messages"][ALICE]["PHONE"])
        keys.alice.take_room_key(payload)
        assert keys.alice.decrypt_room(content)[0]["content"] == {"body": "hello"}
