"""The crypto core (bridge_kit.crypto) against libolm (python-olm) as the independent peer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import olm
import pytest

from bridge_kit.crypto import (
    CryptoMachine,
    CryptoVault,
    DeviceTracker,
    InboundGroupSessions,
    OlmAccount,
    OlmSessions,
    OutboundGroupSessions,
    RotationSettings,
    canonical_json,
    derive_pickle_key,
    sign_json,
    verify_json,
)
from bridge_kit.crypto.machine import RESERVED_INDEXES
from bridge_kit.crypto.signing import unpadded_b64decode
from bridge_kit.crypto.vault import _hkdf_sha256
from bridge_kit.errors import NoRoomKey, UndecryptableEvent, WrongPickleKey
from bridge_kit.store import Store, open_store
from tests.helpers.crypto_peers import KeyDirectory, OlmPeer, megolm_content

BOT = "@bot:test.local"
DEVICE = "BRIDGEDEV"
ALICE = "@alice:test.local"
BOB = "@bob:test.local"
ROOM = "!room:test.local"
KEY = derive_pickle_key("a configured pickle key")


async def memory_store() -> Store:
    """The real in-memory store (its crypto table is what the SQLite and PostgreSQL
    stores have too; tests/test_device_store.py checks those against each other)."""
    store = open_store("memory://")
    await store.open()
    return store


async def _parts(store: Store | None = None, key: bytes = KEY):
    store = store or await memory_store()
    vault = CryptoVault(store, f"{BOT}|{DEVICE}", key)
    account = await OlmAccount.load_or_create(vault, BOT, DEVICE)
    tracker = DeviceTracker(vault)
    await tracker.load()
    sessions = OlmSessions(account, vault, tracker)
    await sessions.load()
    inbound = InboundGroupSessions(vault)
    return store, vault, account, tracker, sessions, inbound


def _peer_with_session(account: OlmAccount, upload_otks: dict) -> OlmPeer:
    """Alice's libolm device, with an Olm session to our device from one of our OTKs."""
    alice = OlmPeer(ALICE, "ALICEDEV")
    one_time = next(iter(upload_otks.values()))
    assert verify_json(one_time, BOT, DEVICE, account.ed25519)
    alice.start_session(account.curve25519, one_time["key"])
    return alice


# -- signing -----------------------------------------------------------------


def test_canonical_json_follows_the_spec_examples() -> None:
    assert canonical_json({}) == b"{}"
    assert canonical_json({"one": 1, "two": "Two"}) == b'{"one":1,"two":"Two"}'
    assert canonical_json({"b": "2", "a": "1"}) == b'{"a":"1","b":"2"}'
    nested = {
        "auth": {
            "success": True,
            "mxid": "@john.doe:example.com",
            "profile": {
                "three_pids": [{"medium": "email", "address": "john.doe@example.org"}],
                "display_name": "John Doe",
            },
        }
    }
    assert canonical_json(nested) == (
        b'{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
        b'"three_pids":[{"address":"john.doe@example.org","medium":"email"}]},"success":true}}'
    )
    assert canonical_json({"a": "日本語"}) == '{"a":"日本語"}'.encode()
    assert canonical_json({"a": "\u0000"}) == b'{"a":"\\u0000"}'
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_signatures_interoperate_with_libolm_both_ways() -> None:
    import vodozemac

    ours = vodozemac.Account()
    value = {
        "b": 1,
        "a": "x",
        "unsigned": {"age": 5},
        "signatures": {"@other:x": {"ed25519:O": "sig"}},
    }
    signed = sign_json(value, ours, BOT, DEVICE)
    assert signed["unsigned"] == {"age": 5} and "@other:x" in signed["signatures"]
    signature = signed["signatures"][BOT][f"ed25519:{DEVICE}"]
    olm.ed25519_verify(ours.ed25519_key.to_base64(), canonical_json({"a": "x", "b": 1}), signature)
    assert verify_json(signed, BOT, DEVICE, ours.ed25519_key.to_base64())
    # Changing a signed field breaks it; changing unsigned does not.
    assert not verify_json({**signed, "b": 2}, BOT, DEVICE, ours.ed25519_key.to_base64())
    assert verify_json({**signed, "unsigned": {}}, BOT, DEVICE, ours.ed25519_key.to_base64())

    theirs = olm.Account()
    body = {"key": "abc"}
    their_signature = theirs.sign(canonical_json(body))
    stamped = {**body, "signatures": {ALICE: {"ed25519:A": their_signature}}}
    assert verify_json(stamped, ALICE, "A", theirs.identity_keys["ed25519"])
    assert not verify_json(stamped, ALICE, "A", ours.ed25519_key.to_base64())
    assert not verify_json(stamped, ALICE, "B", theirs.identity_keys["ed25519"])
    assert not verify_json(
        {**stamped, "signatures": {ALICE: {"ed25519:A": "!!"}}},
        ALICE,
        "A",
        theirs.identity_keys["ed25519"],
    )
    assert not verify_json(stamped, ALICE, "A", "not a key")


def test_hkdf_matches_rfc_5869_case_1_and_pickle_keys_differ_by_secret() -> None:
    okm = _hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    assert len(derive_pickle_key("as_token")) == 32
    assert derive_pickle_key("as_token") == derive_pickle_key("as_token")
    assert derive_pickle_key("as_token") != derive_pickle_key("as_token2")


# -- the account -------------------------------------------------------------


async def test_device_keys_are_self_signed_and_one_time_keys_topped_up_to_half() -> None:
    _, _, account, *_ = await _parts()
    keys = account.device_keys()
    assert keys["keys"] == {
        f"curve25519:{DEVICE}": account.curve25519,
        f"ed25519:{DEVICE}": account.ed25519,
    }
    olm.ed25519_verify(
        account.ed25519,
        canonical_json({k: v for k, v in keys.items() if k != "signatures"}),
        keys["signatures"][BOT][f"ed25519:{DEVICE}"],
    )
    first = await account.keys_to_upload(server_count=0)
    assert first.device_keys == keys
    target = account.account.max_number_of_one_time_keys // 2
    assert len(first.one_time_keys) == target == account.one_time_key_target
    for key_id, body in first.one_time_keys.items():
        assert key_id.startswith("signed_curve25519:")
        assert verify_json(body, BOT, DEVICE, account.ed25519)
    [(fallback_id, fallback)] = first.fallback_keys.items()
    assert fallback["fallback"] is True and verify_json(fallback, BOT, DEVICE, account.ed25519)
    await account.mark_published()

    assert (
        await account.keys_to_upload(
            server_count=target, unused_fallback_types=["signed_curve25519"]
        )
    ).empty
    # Ten were claimed: exactly ten more, and no device keys again.
    refill = await account.keys_to_upload(server_count=target - 10)
    assert refill.device_keys is None and len(refill.one_time_keys) == 10
    assert not set(refill.one_time_keys) & set(first.one_time_keys)
    # An upload that failed is offered again, not doubled.
    again = await account.keys_to_upload(server_count=target - 10)
    assert again.one_time_keys == refill.one_time_keys
    await account.mark_published()
    # The fallback key was used: a new one.
    renewed = await account.keys_to_upload(server_count=target, unused_fallback_types=[])
    [(new_id, _)] = renewed.fallback_keys.items()
    assert new_id != fallback_id


async def test_the_account_and_its_flags_survive_a_reload_and_a_wrong_key_is_named() -> None:
    store, _, account, *_ = await _parts()
    await account.keys_to_upload(0)
    await account.mark_published()
    _, _, again, *_ = await _parts(store)
    assert (again.curve25519, again.ed25519) == (account.curve25519, account.ed25519)
    assert again.device_keys_uploaded
    with pytest.raises(WrongPickleKey, match="pickle key"):
        await _parts(store, derive_pickle_key("another key"))


# -- Olm -------------------------------------------------------------------------


async def test_olm_prekey_and_normal_messages_from_libolm_decrypt_and_replies_reach_it() -> None:
    _, _, account, tracker, sessions, _ = await _parts()
    upload = await account.keys_to_upload(0)
    await account.mark_published()
    alice = _peer_with_session(account, upload.one_time_keys)
    await tracker.apply_query({"device_keys": {ALICE: {"ALICEDEV": alice.device_keys()}}})

    first = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": 1})
    assert first["ciphertext"][account.curve25519]["type"] == 0
    payload = await sessions.decrypt(ALICE, first)
    assert (payload.type, payload.content, payload.sender_key) == (
        "m.dummy",
        {"n": 1},
        alice.curve25519,
    )
    assert payload.sender_device is not None and payload.sender_device.device_id == "ALICEDEV"

    reply = await sessions.encrypt(payload.sender_device, "m.dummy", {"n": 2})
    decrypted = alice.decrypt(reply)
    assert decrypted["content"] == {"n": 2} and decrypted["sender"] == BOT
    assert decrypted["recipient_keys"] == {"ed25519": alice.ed25519}
    assert decrypted["keys"] == {"ed25519": account.ed25519}

    # Now that we answered, libolm sends normal (type 1) messages.
    second = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": 3})
    assert second["ciphertext"][account.curve25519]["type"] == 1
    assert (await sessions.decrypt(ALICE, second)).content == {"n": 3}


async def test_olm_sessions_survive_a_reload() -> None:
    store, _, account, _tracker, sessions, _ = await _parts()
    upload = await account.keys_to_upload(0)
    await account.mark_published()
    alice = _peer_with_session(account, upload.one_time_keys)
    await sessions.decrypt(
        ALICE, alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {})
    )
    *_, reloaded, _ = await _parts(store)
    message = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": "after"})
    assert (await reloaded.decrypt(ALICE, message)).content == {"n": "after"}


async def test_an_olm_message_decrypts_again_when_retried_replayed_or_after_a_reload() -> None:
    """Olm decrypts a message once; the inbox decrypts it on every attempt and on a
    replayed dead letter. The same message gives the same payload each time (kept
    sealed, not in clear), and only for the same sender and ciphertext."""
    store, vault, account, _tracker, sessions, _ = await _parts()
    upload = await account.keys_to_upload(0)
    await account.mark_published()
    alice = _peer_with_session(account, upload.one_time_keys)
    first = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": "one"})
    assert (await sessions.decrypt(ALICE, first)).content == {"n": "one"}
    assert (await sessions.decrypt(ALICE, first)).content == {"n": "one"}  # a retry
    second = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.dummy", {"n": "two"})
    assert (await sessions.decrypt(ALICE, second)).content == {"n": "two"}
    *_, reloaded, _ = await _parts(store)
    for message, n in ((first, "one"), (second, "two")):  # a replay after a restart
        assert (await reloaded.decrypt(ALICE, message)).content == {"n": n}
    # Another sender does not get Alice's plaintext: Olm itself refuses it.
    with pytest.raises(UndecryptableEvent):
        await reloaded.decrypt("@mallory:test.local", second)
    kept = await store.crypto_items(vault.owner, "olm_decrypted")
    assert len(kept) == 2
    assert not any(b'"two"' in sealed or b"m.dummy" in sealed for sealed in kept.values())
    # A sealed record opens only where it was put, and only with the key.
    (name, sealed), (other, _) = kept.items()
    await store.crypto_put(vault.owner, "olm_decrypted", other, sealed)
    with pytest.raises(WrongPickleKey):
        await vault.get_sealed("olm_decrypted", other)
    wrong = CryptoVault(store, vault.owner, derive_pickle_key("another key"))
    with pytest.raises(WrongPickleKey):
        await wrong.get_sealed("olm_decrypted", name)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sender": "@mallory:test.local"}, "sender"),
        ({"recipient": "@other:test.local"}, "another recipient"),
        ({"recipient_keys": {"ed25519": "AAAA"}}, "another recipient device"),
        ({"keys": {}}, "ed25519"),
        ({"content": "text"}, "content"),
    ],
)
async def test_olm_payloads_that_do_not_match_their_envelope_are_refused(
    change: dict, reason: str
) -> None:
    _, _, account, _, sessions, _ = await _parts()
    upload = await account.keys_to_upload(0)
    alice = _peer_with_session(account, upload.one_time_keys)
    payload = json.loads(alice.payload(BOT, account.ed25519, "m.dummy", {}))
    payload.update(change)
    with pytest.raises(UndecryptableEvent, match=reason):
        await sessions.decrypt(ALICE, alice.encrypt_raw(account.curve25519, json.dumps(payload)))


async def test_an_ed25519_key_other_than_the_tracked_devices_is_refused() -> None:
    _, _, account, tracker, sessions, _ = await _parts()
    upload = await account.keys_to_upload(0)
    alice = _peer_with_session(account, upload.one_time_keys)
    await tracker.apply_query({"device_keys": {ALICE: {"ALICEDEV": alice.device_keys()}}})
    payload = json.loads(alice.payload(BOT, account.ed25519, "m.dummy", {}))
    payload["keys"] = {"ed25519": olm.Account().identity_keys["ed25519"]}
    with pytest.raises(UndecryptableEvent, match="not its device's key"):
        await sessions.decrypt(ALICE, alice.encrypt_raw(account.curve25519, json.dumps(payload)))


@pytest.mark.parametrize(
    "content",
    [
        {},
        {"algorithm": "m.megolm.v1.aes-sha2"},
        {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "x", "ciphertext": {}},
        {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "x", "ciphertext": "str"},
        "MINE:{'type': 7, 'body': 'AAAA'}",
        "MINE:{'type': 0, 'body': '!!!'}",
        "MINE:{'type': 0, 'body': 'AAAA'}",
        "MINE:{'type': 1, 'body': 'AwAAAA'}",
        "MINE:{'type': True, 'body': 'AAAA'}",
    ],
)
async def test_garbage_olm_messages_are_an_undecryptable_error_never_a_crash(
    content: object,
) -> None:
    _, _, account, _, sessions, _ = await _parts()
    if isinstance(content, str):
        mine = eval(content.removeprefix("MINE:"))  # noqa: S307 - test table
        content = {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "sender_key": olm.Account().identity_keys["curve25519"],
            "ciphertext": {account.curve25519: mine},
        }
    with pytest.raises(UndecryptableEvent):
        await sessions.decrypt(ALICE, content)  # type: ignore[arg-type]


async def test_outbound_sessions_need_a_one_time_key_signed_by_the_device() -> None:
    _, _, _account, tracker, sessions, _ = await _parts()
    alice = OlmPeer(ALICE, "ALICEDEV")
    await tracker.apply_query({"device_keys": {ALICE: {"ALICEDEV": alice.device_keys()}}})
    device = tracker.devices(ALICE)["ALICEDEV"]
    forged = OlmPeer(ALICE, "ALICEDEV").claim_one_time_key()  # signed by another key
    assert "signature" in (await sessions.create_outbound(device, forged) or "")
    assert "no signed_curve25519" in (
        await sessions.create_outbound(device, {"curve25519:X": "k"}) or ""
    )
    assert not sessions.has_session(alice.curve25519)
    assert await sessions.create_outbound(device, alice.claim_one_time_key()) is None
    message = await sessions.encrypt(device, "m.dummy", {"hello": 1})
    assert alice.decrypt(message)["content"] == {"hello": 1}


async def test_device_tracking_keeps_only_self_signed_devices_with_their_first_key() -> None:
    store, _, _, tracker, *_ = await _parts()
    good, bad = OlmPeer(ALICE, "GOOD"), OlmPeer(ALICE, "BAD")
    unsigned = {**bad.device_keys(), "signatures": {}}
    mislabeled = {**OlmPeer(ALICE, "OTHER").device_keys()}
    added = await tracker.apply_query(
        {"device_keys": {ALICE: {"GOOD": good.device_keys(), "BAD": unsigned, "WRONG": mislabeled}}}
    )
    assert added == {ALICE: ["GOOD"]}
    assert set(tracker.devices(ALICE)) == {"GOOD"}
    # An impostor under the same id with another ed25519 key is ignored.
    impostor = OlmPeer(ALICE, "GOOD")
    await tracker.apply_query({"device_keys": {ALICE: {"GOOD": impostor.device_keys()}}})
    assert tracker.devices(ALICE)["GOOD"].ed25519 == good.ed25519
    assert tracker.outdated_among([ALICE, "@bob:test.local"]) == ["@bob:test.local"]
    await tracker.mark_outdated([ALICE])
    assert tracker.outdated_among([ALICE]) == [ALICE]
    # Stored, and reloaded with the outdated flag.
    *_, reloaded, _, _ = await _parts(store)
    assert reloaded.devices(ALICE)["GOOD"].curve25519 == good.curve25519
    assert reloaded.outdated_among([ALICE]) == [ALICE]
    await reloaded.forget([ALICE])
    assert reloaded.devices(ALICE) == {}


# -- Megolm ------------------------------------------------------------------


async def _room_key_from_alice(
    account,
    sessions,
    inbound,
    group: olm.OutboundGroupSession,
    alice: OlmPeer | None = None,
    session_key: str | None = None,
) -> OlmPeer:
    upload = await account.keys_to_upload(0)
    one_time = next(iter(upload.one_time_keys.values()))
    alice = alice or OlmPeer(ALICE, "ALICEDEV")
    alice.start_session(account.curve25519, one_time["key"])
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.id,
        "session_key": session_key or group.session_key,
    }
    payload = await sessions.decrypt(
        ALICE, alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.room_key", room_key)
    )
    assert await inbound.add_room_key(payload) == (ROOM, group.id)
    return alice


async def test_room_events_from_libolm_decrypt_with_the_room_key_and_replays_are_refused() -> None:
    _, _, account, _, sessions, inbound = await _parts()
    group = olm.OutboundGroupSession()
    alice = OlmPeer(ALICE, "ALICEDEV")
    from_start = group.session_key
    early = megolm_content(group, alice, ROOM, "m.room.message", {"body": "too early"})
    with pytest.raises(NoRoomKey) as missing:
        await inbound.decrypt(ROOM, "$early", ALICE, early)
    assert missing.value.reason == "no room key" and missing.value.session_id == group.id

    await _room_key_from_alice(account, sessions, inbound, group, alice, from_start)
    content = {
        "msgtype": "m.text",
        "body": "hi",
        "m.relates_to": {"rel_type": "m.thread", "event_id": "$root"},
    }
    encrypted = megolm_content(group, alice, ROOM, "m.room.message", content)
    event = await inbound.decrypt(ROOM, "$one", ALICE, encrypted)
    assert (event.type, event.content, event.message_index) == ("m.room.message", content, 1)
    assert (event.sender_key, event.sender_ed25519) == (alice.curve25519, alice.ed25519)
    # The early event decrypts now that the key is there (index 0).
    assert (await inbound.decrypt(ROOM, "$early", ALICE, early)).content == {"body": "too early"}
    # The same event again is fine (redelivery); the same index under another id is not.
    assert (await inbound.decrypt(ROOM, "$one", ALICE, encrypted)).content == content
    with pytest.raises(UndecryptableEvent, match="replayed"):
        await inbound.decrypt(ROOM, "$two", ALICE, encrypted)
    # The key is Alice's: a message under it claiming another sender is refused.
    other = megolm_content(group, alice, ROOM, "m.room.message", {"body": "x"})
    with pytest.raises(UndecryptableEvent, match="another user"):
        await inbound.decrypt(ROOM, "$three", "@mallory:test.local", other)
    # Copied into another room, it is refused too (the plaintext names the room).
    with pytest.raises(NoRoomKey):
        await inbound.decrypt("!other:test.local", "$four", ALICE, other)


async def test_room_keys_and_room_events_that_are_garbage_are_refused_with_a_reason() -> None:
    _, _, account, _, sessions, inbound = await _parts()
    group = olm.OutboundGroupSession()
    alice = await _room_key_from_alice(account, sessions, inbound, group)
    base = megolm_content(group, alice, ROOM, "m.room.message", {"body": "x"})
    for content, reason in [
        ({**base, "algorithm": "m.other"}, "algorithm"),
        ({**base, "ciphertext": 5}, "ciphertext"),
        ({**base, "ciphertext": "AAAA"}, "cannot decrypt"),
        ({**base, "sender_key": 5}, "sender_key"),
    ]:
        with pytest.raises(UndecryptableEvent, match=reason):
            await inbound.decrypt(ROOM, "$x", ALICE, content)
    with pytest.raises(NoRoomKey):  # the session as another device shares it: not here yet
        await inbound.decrypt(ROOM, "$x", ALICE, {**base, "sender_key": "someone else"})
    wrong_room = json.dumps({"type": "m.room.message", "content": {}, "room_id": "!elsewhere:x"})
    with pytest.raises(UndecryptableEvent, match="another room"):
        await inbound.decrypt(ROOM, "$y", ALICE, {**base, "ciphertext": group.encrypt(wrong_room)})
    bad_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": "nope",
        "session_key": group.session_key,
    }
    payload = await sessions.decrypt(
        ALICE, alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.room_key", bad_key)
    )
    with pytest.raises(UndecryptableEvent, match="session_id"):
        await inbound.add_room_key(payload)


async def test_our_room_events_decrypt_in_libolm_and_sessions_rotate_by_the_settings() -> None:
    _, vault, account, _, _, inbound = await _parts()
    outbound = OutboundGroupSessions(account, vault, inbound)
    settings = RotationSettings(period_ms=10_000, period_msgs=2)
    session = await outbound.current(ROOM, settings, now_ms=1_000)
    alice = OlmPeer(ALICE, "A")
    alice.take_room_key({"type": "m.room_key", "content": outbound.room_key_content(session)})
    reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e", "key": "👍"}}
    encrypted = await outbound.encrypt(session, "m.reaction", reaction)
    assert encrypted["m.relates_to"] == reaction["m.relates_to"]  # readable by the server
    assert {"algorithm", "sender_key", "ciphertext", "session_id", "device_id"} <= encrypted.keys()
    payload, index = alice.decrypt_room(encrypted)
    assert payload == {"type": "m.reaction", "content": reaction, "room_id": ROOM} and index == 0
    # We can read our own messages back (our copy of the inbound session).
    assert (await inbound.decrypt(ROOM, "$own", BOT, encrypted)).type == "m.reaction"

    await outbound.encrypt(session, "m.room.message", {"body": "2"})
    by_count = await outbound.current(ROOM, settings, now_ms=1_001)
    assert by_count.session.session_id != session.session.session_id
    same = await outbound.current(ROOM, settings, now_ms=10_999)
    assert same.session.session_id == by_count.session.session_id
    by_time = await outbound.current(ROOM, settings, now_ms=11_001)
    assert by_time.session.session_id != by_count.session.session_id
    await outbound.discard(ROOM)
    assert (await outbound.current(ROOM, settings)).session.session_id != by_time.session.session_id


def test_rotation_settings_take_valid_values_and_default_the_rest() -> None:
    assert RotationSettings.from_content(None) == RotationSettings(604_800_000, 100)
    assert RotationSettings.from_content(
        {"rotation_period_ms": 5, "rotation_period_msgs": 3}
    ) == RotationSettings(5, 3)
    assert (
        RotationSettings.from_content({"rotation_period_ms": "5", "rotation_period_msgs": True})
        == RotationSettings()
    )
    assert RotationSettings.from_content({"rotation_period_msgs": 0}) == RotationSettings()


# -- the machine: key sharing, rotation on leave, late devices, restarts --------


async def _machine(store: Store, directory: KeyDirectory, key: bytes = KEY) -> CryptoMachine:
    machine = CryptoMachine(store, BOT, DEVICE, key, directory)
    await machine.start()
    return machine


async def test_the_machine_uploads_keys_and_shares_room_keys_with_every_device() -> None:
    store, directory = await memory_store(), KeyDirectory()
    machine = await _machine(store, directory)
    assert directory.uploaded_device_keys == machine.account.device_keys()
    assert len(directory.one_time_keys) == machine.account.one_time_key_target
    assert len(directory.fallback_keys) == 1
    assert (
        await machine.top_up(machine.account.one_time_key_target - 3)
        == machine.account.one_time_key_target + 3
    )

    phone, laptop = directory.add(OlmPeer(ALICE, "PHONE")), directory.add(OlmPeer(ALICE, "LAPTOP"))
    bob = directory.add(OlmPeer("@bob:test.local", "BOB"))
    members = [ALICE, "@bob:test.local", BOT]
    first = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "one"}, members)
    directory.deliver(BOT)
    for peer in (phone, laptop, bob):
        assert peer.decrypt_room(first)[0]["content"] == {"body": "one"}
    # Known devices get nothing again; no claim, no query.
    claims, queries = directory.claims, len(directory.queries)
    second = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "two"}, members)
    assert directory.sent == [] and (directory.claims, len(directory.queries)) == (claims, queries)
    assert phone.decrypt_room(second)[0]["content"] == {"body": "two"}
    assert second["session_id"] == first["session_id"]

    # A device Alice adds later gets the key before the next message.
    tablet = directory.add(OlmPeer(ALICE, "TABLET"))
    await machine.on_device_lists(changed=[ALICE], left=[])
    third = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "three"}, members)
    assert third["session_id"] == first["session_id"]
    directory.deliver(BOT)
    assert tablet.decrypt_room(third)[0]["content"] == {"body": "three"}

    # Bob leaves: a new session, which Bob never gets.
    fourth = await machine.encrypt_room_event(
        ROOM, "m.room.message", {"body": "four"}, [ALICE, BOT]
    )
    assert fourth["session_id"] != first["session_id"]
    recipients = {user for _, messages in directory.sent for user in messages}
    assert recipients == {ALICE}
    directory.deliver(BOT)
    assert phone.decrypt_room(fourth)[0]["content"] == {"body": "four"}
    assert fourth["session_id"] not in bob.group_sessions

    # A removed device also rotates the session.
    directory.remove(laptop)
    await machine.on_device_lists(changed=[ALICE], left=[])
    fifth = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "five"}, [ALICE, BOT])
    assert fifth["session_id"] != fourth["session_id"]


async def test_a_settled_room_still_shares_with_a_joiner_whose_devices_are_known() -> None:
    """Once every device of a room has the key, the next messages skip the device
    check; a member who joins (their devices known from another room, so the device
    list did not change) must still get the key before the next message."""
    store, directory = await memory_store(), KeyDirectory()
    machine = await _machine(store, directory)
    phone, bob = directory.add(OlmPeer(ALICE, "PHONE")), directory.add(OlmPeer(BOB, "BOB"))
    other_room = "!other:test.local"
    await machine.encrypt_room_event(other_room, "m.room.message", {"n": 0}, [BOB, BOT])
    sent = [
        await machine.encrypt_room_event(ROOM, "m.room.message", {"n": n}, [ALICE, BOT])
        for n in range(3)
    ]
    directory.deliver(BOT)
    queries = len(directory.queries)
    joined = await machine.encrypt_room_event(ROOM, "m.room.message", {"n": 3}, [ALICE, BOB, BOT])
    assert len(directory.queries) == queries  # Bob's devices were known: no query
    directory.deliver(BOT)
    assert bob.decrypt_room(joined)[0]["content"] == {"n": 3}
    assert {c["session_id"] for c in [*sent, joined]} == {sent[0]["session_id"]}
    assert [phone.decrypt_room(c)[0]["content"]["n"] for c in [*sent, joined]] == [0, 1, 2, 3]
    # Settled again; a device the tracker learns of without a device-list push (a
    # query made for another room) also gets the key before the next message.
    await machine.encrypt_room_event(ROOM, "m.room.message", {"n": 4}, [ALICE, BOB, BOT])
    directory.deliver(BOT)
    tablet = directory.add(OlmPeer(ALICE, "TABLET"))
    await machine.tracker.apply_query(await directory.query_keys([ALICE]))
    later = await machine.encrypt_room_event(ROOM, "m.room.message", {"n": 5}, [ALICE, BOB, BOT])
    directory.deliver(BOT)
    assert tablet.decrypt_room(later)[0]["content"] == {"n": 5}


async def test_a_stale_pushed_key_count_uploads_no_keys_the_server_has() -> None:
    """Pushed counts travel through the inbox and may predate our last upload; each
    one taken at its word made the server hold ever more keys (74 for a target of
    25 on Synapse), past what the account keeps the secret halves of."""
    store, directory = await memory_store(), KeyDirectory()
    machine = await _machine(store, directory)
    target = machine.account.one_time_key_target
    assert len(directory.one_time_keys) == target
    for stale in (0, 0, target - 1):
        assert await machine.on_key_counts(stale) == target
    assert len(directory.one_time_keys) == target
    for key_id in list(directory.one_time_keys)[:10]:  # others claimed ten
        del directory.one_time_keys[key_id]
    assert await machine.on_key_counts(target - 10) == target
    assert len(directory.one_time_keys) == target
    assert await machine.on_key_counts(target) == target  # nothing asked, nothing sent


async def test_a_restarted_machine_keeps_its_identity_sessions_and_room_session() -> None:
    store, directory = await memory_store(), KeyDirectory()
    machine = await _machine(store, directory)
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    first = await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "one"}, [ALICE])
    directory.deliver(BOT)
    uploaded = dict(directory.one_time_keys)

    restarted = await _machine(store, directory)
    assert restarted.identity_keys() == machine.identity_keys()
    assert directory.one_time_keys == uploaded  # nothing new needed
    second = await restarted.encrypt_room_event(ROOM, "m.room.message", {"body": "two"}, [ALICE])
    assert second["session_id"] == first["session_id"] and directory.sent == []
    payload, index = phone.decrypt_room(second)
    # The session goes on past the indexes promised to the store before the restart
    # (one commit per RESERVED_INDEXES messages; none is used twice).
    assert payload["content"] == {"body": "two"} and index == RESERVED_INDEXES
    # The Olm session with the phone survived too: a new room's key needs no claim.
    claims = directory.claims
    await restarted.encrypt_room_event("!other:test.local", "m.room.message", {}, [ALICE])
    assert directory.claims == claims
    directory.deliver(BOT)


async def test_a_room_key_over_olm_decrypts_and_a_device_without_keys_is_skipped() -> None:
    store, directory = await memory_store(), KeyDirectory()
    machine = await _machine(store, directory)
    alice = directory.add(OlmPeer(ALICE, "PHONE"))
    await machine.refresh_devices([ALICE])
    _key_id, one_time = next(iter(directory.one_time_keys.items()))
    alice.start_session(machine.account.curve25519, one_time["key"])
    group = olm.OutboundGroupSession()
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.id,
        "session_key": group.session_key,
    }
    payload = await machine.decrypt_to_device(
        ALICE,
        alice.encrypt_to(
            BOT, machine.account.curve25519, machine.account.ed25519, "m.room_key", room_key
        ),
    )
    assert payload.sender_device is not None and payload.sender_device.device_id == "PHONE"
    event = await machine.decrypt_room_event(
        ROOM, "$e", ALICE, megolm_content(group, alice, ROOM, "m.room.message", {"body": "hello"})
    )
    assert event.content == {"body": "hello"}
    assert machine.sender_device(ALICE, event.sender_key).device_id == "PHONE"  # type: ignore[union-attr]

    class NoKeys(OlmPeer):
        def claim_one_time_key(self) -> dict:
            return {}

    directory.add(NoKeys(ALICE, "EMPTY"))
    await machine.on_device_lists([ALICE], [])
    await machine.encrypt_room_event(ROOM, "m.room.message", {}, [ALICE])
    reached = {device for _, messages in directory.sent for device in messages[ALICE]}
    assert reached == {"PHONE"}


# -- what the store holds -----------------------------------------------------


def _forms(secret: bytes) -> list[bytes]:
    """A secret as raw bytes and as (padded and unpadded) base64."""
    b64 = base64.b64encode(secret)
    return [secret, b64, b64.rstrip(b"=")]


async def test_the_sqlite_file_holds_no_plaintext_key_material(tmp_path: Path) -> None:
    store, directory = open_store(f"sqlite:///{tmp_path / 'bk.db'}"), KeyDirectory()
    await store.open()
    machine = await _machine(store, directory)
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    session = await machine.outbound.current(ROOM, RotationSettings())
    shared_key = machine.outbound.room_key_content(session)["session_key"]
    await machine.encrypt_room_event(ROOM, "m.room.message", {"body": "secret words"}, [ALICE])
    directory.deliver(BOT)
    assert session.session.session_id in phone.group_sessions
    current_key = machine.outbound.room_key_content(session)["session_key"]
    assert current_key != shared_key
    # Inbound from Alice, too.
    group = olm.OutboundGroupSession()
    one_time = next(iter(directory.one_time_keys.values()))
    phone.start_session(machine.account.curve25519, one_time["key"])
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": ROOM,
        "session_id": group.id,
        "session_key": group.session_key,
    }
    await machine.decrypt_to_device(
        ALICE,
        phone.encrypt_to(
            BOT, machine.account.curve25519, machine.account.ed25519, "m.room_key", room_key
        ),
    )

    await store.close()
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("bk.db*"))
    assert phone.curve25519.encode() in stored  # the public keys are there: the grep sees them
    for exported in (shared_key, current_key, group.session_key):
        raw = unpadded_b64decode(exported)
        ratchet = raw[5 : 5 + 128]  # version, index, then the 128-byte secret ratchet
        for chunk in (ratchet[:32], ratchet[32:64], ratchet[64:96], ratchet[96:]):
            for form in _forms(chunk):
                assert form not in stored
        assert exported.encode() not in stored
    assert b"secret words" not in stored
    # The pickles open only with the key: with another, a clear error.
    store = open_store(f"sqlite:///{tmp_path / 'bk.db'}")
    async with store:
        with pytest.raises(WrongPickleKey):
            await _machine(store, directory, derive_pickle_key("wrong"))
        assert (await _machine(store, directory)).identity_keys() == machine.identity_keys()


async def test_the_vault_rejects_a_pickle_key_of_the_wrong_size_and_hides_it() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CryptoVault(await memory_store(), "o", b"short")
    vault = CryptoVault(await memory_store(), "o", KEY)
    assert KEY.hex() not in repr(vault) and "o" in repr(vault)


async def test_the_machine_restarts_from_postgresql(postgres_dsn: str, unique: str) -> None:
    directory = KeyDirectory()
    phone = directory.add(OlmPeer(ALICE, "PHONE"))
    async with open_store(postgres_dsn) as store:
        machine = CryptoMachine(store, BOT, f"PG{unique}", KEY, directory)
        await machine.start()
        first = await machine.encrypt_room_event(ROOM, "m.room.message", {"n": 1}, [ALICE])
        directory.deliver(BOT)
    async with open_store(postgres_dsn) as store:
        again = CryptoMachine(store, BOT, f"PG{unique}", KEY, directory)
        await again.start()
        assert again.identity_keys() == machine.identity_keys()
        second = await again.encrypt_room_event(ROOM, "m.room.message", {"n": 2}, [ALICE])
    assert second["session_id"] == first["session_id"] and directory.sent == []
    assert phone.decrypt_room(second) == (
        {"type": "m.room.message", "content": {"n": 2}, "room_id": ROOM},
        1,
    )


async def test_inbound_sessions_beyond_the_memory_cache_are_read_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge_kit.crypto import megolm

    monkeypatch.setattr(megolm, "_CACHED_SESSIONS", 2)
    _, _, account, _, sessions, inbound = await _parts()
    upload = await account.keys_to_upload(0)
    alice = _peer_with_session(account, upload.one_time_keys)
    groups = [olm.OutboundGroupSession() for _ in range(3)]
    for group in groups:
        room_key = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": ROOM,
            "session_id": group.id,
            "session_key": group.session_key,
        }
        content = alice.encrypt_to(BOT, account.curve25519, account.ed25519, "m.room_key", room_key)
        await inbound.add_room_key(await sessions.decrypt(ALICE, content))
    assert len(inbound._cache) == 2
    oldest = megolm_content(groups[0], alice, ROOM, "m.room.message", {"body": "first"})
    assert (await inbound.decrypt(ROOM, "$first", ALICE, oldest)).content == {"body": "first"}
