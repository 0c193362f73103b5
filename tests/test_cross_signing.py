"""The cross-signing identity (bridge_kit.crypto.cross_signing) in process: its
signatures checked with vodozemac (another Ed25519 implementation than the one that
signs), the sealed seeds, the published marker, a replaced identity, and the
recovery key decoded by hand from the spec's description."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import pytest

from bridge_kit.crypto import OlmAccount
from bridge_kit.crypto.cross_signing import CrossSigning, CrossSigningKeys, recovery_key
from bridge_kit.crypto.signing import verify_json
from bridge_kit.crypto.vault import CryptoVault, derive_pickle_key
from bridge_kit.errors import CrossSigningFailed, MatrixRequestError
from bridge_kit.store import Store, open_store

BOT = "@bot:test.local"
KEY = derive_pickle_key("a pickle key")
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class FakeHomeserver:
    """Records the uploads; answers a query with the master key it was given."""

    def __init__(self, master_on_server: str | None = None, failures: Any = None) -> None:
        self.master_on_server = master_on_server
        self.failures = failures or {}
        self.signing_uploads: list[Mapping[str, Any]] = []
        self.signature_uploads: list[Mapping[str, Any]] = []

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        if self.master_on_server is None:
            return {"device_keys": {}}
        key = self.master_on_server
        return {"master_keys": {BOT: {"user_id": BOT, "keys": {f"ed25519:{key}": key}}}}

    async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
        self.signing_uploads.append(body)

    async def upload_signatures(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        self.signature_uploads.append(body)
        return {"failures": self.failures}


async def memory_store() -> Store:
    store = open_store("memory://")
    await store.open()
    return store


async def device_keys(store: Store) -> dict[str, Any]:
    account = await OlmAccount.load_or_create(CryptoVault(store, f"{BOT}|DEV", KEY), BOT, "DEV")
    return account.device_keys()


def only_key(obj: Mapping[str, Any]) -> str:
    (key,) = obj["keys"].values()
    return str(key)


async def test_the_identity_signs_its_keys_and_the_device() -> None:
    store = await memory_store()
    server = FakeHomeserver()
    keys = await CrossSigning(CryptoVault(store, BOT, KEY), BOT, server).ensure(
        await device_keys(store)
    )
    (upload,) = server.signing_uploads
    master = only_key(upload["master_key"])
    assert master == keys.master_public
    assert upload["master_key"]["usage"] == ["master"]
    for name, usage in (("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")):
        assert upload[name]["usage"] == [usage]
        assert verify_json(upload[name], BOT, master, master)
    self_signing = only_key(upload["self_signing_key"])
    (signed_device,) = [devices["DEV"] for devices in server.signature_uploads[0].values()]
    assert verify_json(signed_device, BOT, self_signing, self_signing)
    assert verify_json(signed_device, BOT, "DEV", signed_device["keys"]["ed25519:DEV"])
    assert not verify_json({**signed_device, "device_id": "OTHER"}, BOT, self_signing, self_signing)


async def test_published_once_and_kept_across_restarts() -> None:
    store = await memory_store()
    server = FakeHomeserver()
    device = await device_keys(store)
    first = await CrossSigning(CryptoVault(store, BOT, KEY), BOT, server).ensure(device)
    again = await CrossSigning(CryptoVault(store, BOT, KEY), BOT, server).ensure(device)
    assert again.seeds() == first.seeds()
    assert len(server.signing_uploads) == len(server.signature_uploads) == 1
    # The seeds are sealed: no seed is in the store's bytes, and another key does not open them.
    stored = b"".join((await store.crypto_items(BOT, "cross_signing")).values())
    assert not any(first.seeds()[i : i + 32] in stored for i in (0, 32, 64))
    with pytest.raises(Exception, match="pickle key"):
        await CrossSigning(CryptoVault(store, BOT, derive_pickle_key("other")), BOT, server).ensure(
            device
        )


async def test_a_store_without_the_identity_replaces_it_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = await memory_store()
    server = FakeHomeserver(master_on_server="T0xEIG1hc3RlciBrZXk")
    with caplog.at_level(logging.WARNING):
        keys = await CrossSigning(CryptoVault(store, BOT, KEY), BOT, server).ensure(
            await device_keys(store)
        )
    assert "T0xEIG1hc3RlciBrZXk" in caplog.text and "REPLACED" in caplog.text
    assert keys.master_public in caplog.text


async def test_a_refused_signature_is_an_error_and_is_tried_again() -> None:
    store = await memory_store()
    server = FakeHomeserver(failures={BOT: {"DEV": {"errcode": "M_INVALID_SIGNATURE"}}})
    identity = CrossSigning(CryptoVault(store, BOT, KEY), BOT, server)
    with pytest.raises(CrossSigningFailed, match="M_INVALID_SIGNATURE"):
        await identity.ensure(await device_keys(store))
    server.failures = {}
    await identity.ensure(await device_keys(store))
    assert len(server.signature_uploads) == 2


def decode_recovery_key(text: str) -> bytes:
    """The spec: base58 of 0x8B 0x01, the key, and a parity byte (XOR of all before)."""
    number = 0
    for char in text.replace(" ", ""):
        number = number * 58 + BASE58.index(char)
    raw = number.to_bytes(35, "big")
    assert raw[:2] == b"\x8b\x01"
    parity = 0
    for byte in raw:
        parity ^= byte
    assert parity == 0
    return raw[2:34]


def test_the_recovery_key_holds_the_master_seed() -> None:
    keys = CrossSigningKeys.generate()
    text = recovery_key(keys.master)
    groups = text.split(" ")
    assert all(len(group) == 4 for group in groups[:-1]) and 0 < len(groups[-1]) <= 4
    assert decode_recovery_key(text) == keys.seeds()[:32]


async def test_a_homeserver_asking_for_interactive_auth_is_one_clear_error() -> None:
    class Uia(FakeHomeserver):
        async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
            flows = {"flows": [{"stages": ["m.login.password"]}]}
            raise MatrixRequestError(401, None, "", flows)

    store = await memory_store()
    identity = CrossSigning(CryptoVault(store, BOT, KEY), BOT, Uia())
    with pytest.raises(CrossSigningFailed, match=r"refused the cross-signing keys of .* \(401"):
        await identity.ensure(await device_keys(store))
