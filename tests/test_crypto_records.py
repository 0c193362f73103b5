"""The crypto records are attrs classes now; the bytes the stores hold did not change.

Each test writes a record as the earlier releases wrote it (the literal bytes of
their hand-built dicts, in canonical JSON), reads it with the current code, has
the current code write it again and compares the bytes.
"""

from __future__ import annotations

import json
import secrets

import pytest
import vodozemac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge_kit.crypto import (
    MEGOLM_ALGORITHM,
    OLM_ALGORITHM,
    CryptoVault,
    DeviceTracker,
    InboundGroupSessions,
    OlmAccount,
    OutboundGroupSessions,
    RotationSettings,
    derive_pickle_key,
)
from bridge_kit.crypto.vault import _hkdf_sha256
from bridge_kit.errors import StoreError, UndecryptableEvent
from bridge_kit.store import Store, open_store
from bridge_kit.store.retention import REPLAY_RECORDS, SEALED_PAYLOADS

OWNER = "@bot:test.local|BRIDGEDEV"
ALICE = "@alice:test.local"
ROOM = "!room:test.local"
KEY = derive_pickle_key("a configured pickle key")


async def _vault() -> tuple[Store, CryptoVault]:
    store = open_store("memory://")
    await store.open()
    return store, CryptoVault(store, OWNER, KEY)


async def _stored(store: Store, kind: str, key: str) -> bytes:
    raw = await store.crypto_get(OWNER, kind, key)
    assert raw is not None
    return raw


async def test_the_account_meta_reads_and_writes_the_old_bytes() -> None:
    store, vault = await _vault()
    account = await OlmAccount.load_or_create(vault, "@bot:test.local", "BRIDGEDEV")
    old = b'{"device_keys_uploaded":true}'
    await store.crypto_put(OWNER, "account", "meta", old)
    again = await OlmAccount.load_or_create(vault, "@bot:test.local", "BRIDGEDEV")
    assert again.device_keys_uploaded
    assert again.curve25519 == account.curve25519
    await again.save()
    assert await _stored(store, "account", "meta") == old


async def test_device_lists_read_and_write_the_old_bytes_and_older_entries_get_defaults() -> None:
    store, vault = await _vault()
    device_a = (
        b'"ADEV":{"algorithms":["' + OLM_ALGORITHM.encode() + b'"],'
        b'"curve25519":"curveA","display_name":null,"ed25519":"edA"}'
    )
    # BDEV as the first releases wrote it, before algorithms and display names.
    old = b'{"devices":{' + device_a + b',"BDEV":{"curve25519":"curveB","ed25519":"edB"}},'
    old += b'"outdated":false}'
    await store.crypto_put(OWNER, "devices", ALICE, old)
    tracker = DeviceTracker(vault)
    await tracker.load()
    devices = tracker.devices(ALICE)
    assert devices["ADEV"].algorithms == (OLM_ALGORITHM,)
    assert (devices["ADEV"].curve25519, devices["ADEV"].ed25519) == ("curveA", "edA")
    assert devices["BDEV"].algorithms == ()
    assert devices["BDEV"].display_name is None
    assert tracker.outdated_among([ALICE]) == []
    await tracker.mark_outdated([ALICE])
    written = await _stored(store, "devices", ALICE)
    assert written == (
        b'{"devices":{' + device_a + b',"BDEV":{"algorithms":[],"curve25519":"curveB",'
        b'"display_name":null,"ed25519":"edB"}},"outdated":true}'
    )
    reloaded = DeviceTracker(vault)
    await reloaded.load()
    assert reloaded.outdated_among([ALICE]) == [ALICE]


def _old_inbound(pickle: str, *, own: bool | None) -> bytes:
    record = {"pickle": pickle, "sender": ALICE, "sender_key": "curveA", "ed25519": "edA"}
    if own is not None:
        record["own"] = own
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("own", [True, False, None], ids=["own", "theirs", "before-own"])
async def test_inbound_sessions_read_and_write_the_old_bytes(own: bool | None) -> None:
    store, vault = await _vault()
    group = vodozemac.GroupSession()
    session = vodozemac.InboundGroupSession(group.session_key)
    old = _old_inbound(vault.seal(session).decode("ascii"), own=own)
    await store.crypto_put(OWNER, "megolm_inbound", f"{ROOM}|{session.session_id}", old)
    inbound = InboundGroupSessions(vault)
    found = await inbound.get(ROOM, "curveA", session.session_id)  # moves to its new key
    assert found is not None
    assert (found.sender, found.sender_key, found.sender_ed25519) == (ALICE, "curveA", "edA")
    assert found.own is bool(own)
    assert found.session.session_id == group.session_id
    await inbound.add(ROOM, found.session, ALICE, "curveA", "edA", own=bool(own))
    assert await store.crypto_get(OWNER, "megolm_inbound", f"{ROOM}|{session.session_id}") is None
    written = await _stored(store, "megolm_inbound", f"{ROOM}|curveA|{session.session_id}")
    pickle = json.loads(written)["pickle"]  # sealed again: vodozemac picks a new nonce
    assert written == _old_inbound(pickle, own=bool(own))


async def test_outbound_sessions_read_and_write_the_old_bytes() -> None:
    store, vault = await _vault()
    account = await OlmAccount.load_or_create(vault, "@bot:test.local", "BRIDGEDEV")
    group = vodozemac.GroupSession()
    old_pickle = vault.seal(group)
    old = (
        b'{"created_ms":1700000000000,"pickle":"' + old_pickle + b'",'
        b'"shared_with":{"@alice:test.local":{"ADEV":"curveA"}}}'
    )
    await store.crypto_put(OWNER, "megolm_outbound", ROOM, old)
    outbound = OutboundGroupSessions(account, vault, InboundGroupSessions(vault))
    session = await outbound.current(ROOM, RotationSettings(), now_ms=1700000000001)
    assert session.session.session_id == group.session_id
    assert session.created_ms == 1700000000000
    assert session.shared_with == {ALICE: {"ADEV": "curveA"}}
    assert outbound.room_key_content(session)["algorithm"] == MEGOLM_ALGORITHM
    await outbound.save(session)
    written = await _stored(store, "megolm_outbound", ROOM)
    pickle = json.loads(written)["pickle"].encode()  # sealed again, with a new nonce
    assert written == old.replace(old_pickle, pickle)


async def test_replay_records_are_the_bare_event_id_as_before() -> None:
    store, vault = await _vault()
    inbound = InboundGroupSessions(vault)
    await store.crypto_put(OWNER, REPLAY_RECORDS, f"{ROOM}|S|0", b'"$first"')
    await inbound._refuse_replay(ROOM, "S", 0, "$first")  # a redelivery
    with pytest.raises(UndecryptableEvent, match=r"first in \$first"):
        await inbound._refuse_replay(ROOM, "S", 0, "$other")
    await inbound._refuse_replay(ROOM, "S", 1, "$second")
    assert await _stored(store, REPLAY_RECORDS, f"{ROOM}|S|1") == b'"$second"'


async def test_a_payload_sealed_in_the_old_framing_opens() -> None:
    store, vault = await _vault()
    # The framing of earlier releases, written out by hand: nonce, then AES-GCM.
    sealing = AESGCM(_hkdf_sha256(KEY, b"bridge_kit e2ee pickle key", b"sealed records v1"))
    nonce = secrets.token_bytes(12)
    bound = f"{OWNER}\0{SEALED_PAYLOADS}\0digest".encode()
    old = nonce + sealing.encrypt(nonce, b'{"type":"m.room_key"}', bound)
    await store.crypto_put(OWNER, SEALED_PAYLOADS, "digest", old)
    assert await vault.get_sealed(SEALED_PAYLOADS, "digest") == b'{"type":"m.room_key"}'
    await vault.put_sealed(SEALED_PAYLOADS, "again", b"secret")
    new = await _stored(store, SEALED_PAYLOADS, "again")
    again = f"{OWNER}\0{SEALED_PAYLOADS}\0again".encode()
    assert sealing.decrypt(new[:12], new[12:], again) == b"secret"


@pytest.mark.parametrize(
    "stored",
    [b"not json", b"[1, 2]", b'{"devices": {"ADEV": {"ed25519": "edA"}}}'],
    ids=["not-json", "not-an-object", "a-field-missing"],
)
async def test_a_damaged_record_is_a_store_error_naming_it(stored: bytes) -> None:
    store, vault = await _vault()
    await store.crypto_put(OWNER, "devices", ALICE, stored)
    with pytest.raises(StoreError, match=f"the stored devices record '{ALICE}' of {OWNER}"):
        await DeviceTracker(vault).load()
