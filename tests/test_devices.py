"""Devices (MSC4190), masquerading, keys and to-device messages against a real Synapse.

The ``synapse_devices`` homeserver loads our registration with
``io.element.msc4190``; every effect is read back by someone other than the
puppet's bridge_kit intent: Synapse's admin API, or a real user with its own
access token talking plain HTTP (``Human``), who also checks the signatures.
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yarl
from aiohttp import ClientSession, web
from signedjson.key import decode_verify_key_base64, encode_verify_key_base64, generate_signing_key
from signedjson.sign import sign_json, verify_signed_json

from bridge_kit.client.homeserver import HomeserverClient, RetryPolicy, quote_segment
from bridge_kit.errors import (
    AppserviceLoginUnsupported,
    DevicesUnavailable,
    MatrixRequestError,
    UnknownDevice,
    UserInUse,
)
from bridge_kit.intent import Intent
from bridge_kit.intent.state_store import RoomStateStore
from bridge_kit.store import MemoryStore
from bridge_kit.types.keys import DeviceKeys, OneTimeKey
from bridge_kit.types.register import RegisterRequest
from tests.conftest import TestHomeserver
from tests.test_intent_api import CLIENT, Human

ALGORITHMS = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]


def random_key() -> str:
    """A stand-in curve25519 public key: 32 random bytes, unpadded base64."""
    return base64.b64encode(os.urandom(32)).decode().rstrip("=")


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as opened:
        yield opened


@pytest.fixture
async def client(synapse_devices: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse_devices.url, synapse_devices.as_token) as client:
        yield client


def make_intent(
    client: HomeserverClient, hs: TestHomeserver, localpart: str, store: MemoryStore | None
) -> Intent:
    async def register() -> None:
        with contextlib.suppress(UserInUse):
            await client.register(RegisterRequest.for_puppet(localpart))

    state = None if store is None else RoomStateStore(store, lambda: intent)
    intent = Intent(
        client, f"@{localpart}:{hs.server_name}", register, state, device_management=True
    )
    return intent


@pytest.fixture
def puppet(
    client: HomeserverClient, synapse_devices: TestHomeserver, unique: str, store: MemoryStore
) -> Intent:
    return make_intent(client, synapse_devices, f"_bk_dev_{unique}", store)


@pytest.fixture
async def human(synapse_devices: TestHomeserver, unique: str) -> Human:
    localpart = f"keys_human_{unique}"
    token = await synapse_devices.create_user(localpart)
    return Human(synapse_devices, f"@{localpart}:{synapse_devices.server_name}", token)


async def admin_devices(hs: TestHomeserver, user_id: str) -> dict[str, Any]:
    """The user's devices by ID, as Synapse's admin API lists them."""
    headers = {"Authorization": f"Bearer {await hs.admin_token()}"}
    url = f"{hs.url}/_synapse/admin/v2/users/{quote_segment(user_id)}/devices"
    async with hs.http.get(url, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return {device["device_id"]: device for device in body["devices"]}


async def as_appservice(hs: TestHomeserver, method: str, path: str, **query: str) -> Any:
    """A plain request with the as_token (no bridge_kit): status and body."""
    headers = {"Authorization": f"Bearer {hs.as_token}"}
    async with hs.http.request(
        method, hs.url + path, params=query, headers=headers, json={}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


# -- devices ---------------------------------------------------------------------------


async def test_a_created_device_shows_to_the_puppet_and_to_the_admin_api(
    puppet: Intent, synapse_devices: TestHomeserver, store: MemoryStore
) -> None:
    await puppet.create_device("BKPHONE", "Bridge phone")
    # The puppet's own view, asked with plain HTTP as the appservice masquerading as it.
    status, body = await as_appservice(
        synapse_devices, "GET", f"{CLIENT}/devices", user_id=puppet.user_id
    )
    assert status == 200, body
    assert {d["device_id"]: d.get("display_name") for d in body["devices"]} == {
        "BKPHONE": "Bridge phone"
    }
    admin = await admin_devices(synapse_devices, puppet.user_id)
    assert admin["BKPHONE"]["display_name"] == "Bridge phone"
    listed = await puppet.list_devices()
    assert [(d.device_id, d.display_name) for d in listed] == [("BKPHONE", "Bridge phone")]
    assert await store.known_devices(puppet.user_id) == {"BKPHONE": "Bridge phone"}


async def test_creating_again_is_idempotent_and_renames(
    puppet: Intent, synapse_devices: TestHomeserver, store: MemoryStore
) -> None:
    await puppet.create_device("BKTWICE", "first")
    await puppet.create_device("BKTWICE", "second")
    await puppet.create_device("BKTWICE", "second")
    admin = await admin_devices(synapse_devices, puppet.user_id)
    assert list(admin) == ["BKTWICE"]
    assert admin["BKTWICE"]["display_name"] == "second"
    assert await store.known_devices(puppet.user_id) == {"BKTWICE": "second"}


async def test_creating_again_without_a_name_keeps_the_name_everywhere(
    puppet: Intent, synapse_devices: TestHomeserver, store: MemoryStore
) -> None:
    """MSC4190's PUT without a display name leaves the device's name as it is (a bridge
    that ensures its device at every start); the store must say the same."""
    await puppet.create_device("BKNAMED", "Bridge")
    await puppet.create_device("BKNAMED")
    admin = await admin_devices(synapse_devices, puppet.user_id)
    assert admin["BKNAMED"]["display_name"] == "Bridge"
    assert await store.known_devices(puppet.user_id) == {"BKNAMED": "Bridge"}


async def test_the_homeserver_answers_201_then_200(
    puppet: Intent, synapse_devices: TestHomeserver
) -> None:
    """What create_device relies on being idempotent: MSC4190's PUT upserts."""
    await puppet.ensure_registered()
    path = f"{CLIENT}/devices/BKSTATUS"
    first, _ = await as_appservice(synapse_devices, "PUT", path, user_id=puppet.user_id)
    second, _ = await as_appservice(synapse_devices, "PUT", path, user_id=puppet.user_id)
    assert (first, second) == (201, 200)


async def test_deleting_a_device_removes_it(
    puppet: Intent, synapse_devices: TestHomeserver, store: MemoryStore
) -> None:
    await puppet.create_device("BKGONE")
    await puppet.create_device("BKSTAYS")
    await puppet.delete_device("BKGONE")
    assert list(await admin_devices(synapse_devices, puppet.user_id)) == ["BKSTAYS"]
    assert [d.device_id for d in await puppet.list_devices()] == ["BKSTAYS"]
    assert await store.known_devices(puppet.user_id) == {"BKSTAYS": None}
    # Gone for masquerading too: the homeserver refuses the device it no longer has.
    with pytest.raises(UnknownDevice):
        await puppet.with_device("BKGONE").keys_upload(one_time_keys={})


async def test_masquerading_as_a_device_that_does_not_exist_is_refused(puppet: Intent) -> None:
    ghost = puppet.with_device("NOSUCHDEVICE")
    assert ghost.device_id == "NOSUCHDEVICE" and puppet.device_id is None
    with pytest.raises(UnknownDevice, match="NOSUCHDEVICE"):
        await ghost.get_state("!unknown:test.local")


# -- keys ------------------------------------------------------------------------------


def signed_device_keys(user_id: str, device_id: str, signing_key: Any) -> dict[str, Any]:
    keys = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ALGORITHMS,
        "keys": {
            f"curve25519:{device_id}": random_key(),
            f"ed25519:{device_id}": encode_verify_key_base64(signing_key.verify_key),
        },
    }
    return dict(sign_json(keys, user_id, signing_key))


def signed_otk(user_id: str, signing_key: Any, *, fallback: bool | None = None) -> OneTimeKey:
    unsigned: dict[str, Any] = {"key": random_key()}
    if fallback:
        unsigned["fallback"] = True  # part of what is signed (client-server spec)
    signed = sign_json(unsigned, user_id, signing_key)
    return OneTimeKey(key=signed["key"], signatures=signed["signatures"], fallback=fallback)


async def test_keys_uploaded_by_masquerading_are_seen_and_claimed_by_a_real_user(
    puppet: Intent, human: Human
) -> None:
    device = "BKKEYS"
    signing_key = generate_signing_key(device)
    await puppet.create_device(device, "keys")
    as_device = puppet.with_device(device)
    device_keys = signed_device_keys(puppet.user_id, device, signing_key)
    otks = {f"signed_curve25519:AAAA{n}": signed_otk(puppet.user_id, signing_key) for n in range(2)}
    counts = await as_device.keys_upload(device_keys=device_keys, one_time_keys=otks)
    assert counts == {"signed_curve25519": 2}

    # A real user's own client: keys/query shows the device's keys, correctly signed.
    status, query = await human.call(
        "POST", f"{CLIENT}/keys/query", {"device_keys": {puppet.user_id: []}}
    )
    assert status == 200, query
    seen = query["device_keys"][puppet.user_id][device]
    assert seen["keys"] == device_keys["keys"]
    verify_key = decode_verify_key_base64("ed25519", device, seen["keys"][f"ed25519:{device}"])
    verify_signed_json(seen, puppet.user_id, verify_key)  # raises if it does not verify

    # ... and keys/claim hands it one of the uploaded one-time keys, still signed.
    status, claim = await human.call(
        "POST",
        f"{CLIENT}/keys/claim",
        {"one_time_keys": {puppet.user_id: {device: "signed_curve25519"}}},
    )
    assert status == 200, claim
    [(key_id, claimed)] = claim["one_time_keys"][puppet.user_id][device].items()
    assert key_id in otks and claimed["key"] == otks[key_id].key
    verify_signed_json(claimed, puppet.user_id, verify_key)

    # The device's count went down by the claimed key; an empty upload reports it.
    assert await as_device.keys_upload() == {"signed_curve25519": 1}


async def test_the_typed_query_and_claim_calls(puppet: Intent, human: Human) -> None:
    device = "BKTYPED"
    signing_key = generate_signing_key(device)
    await puppet.create_device(device)
    as_device = puppet.with_device(device)
    keys = DeviceKeys(**signed_device_keys(puppet.user_id, device, signing_key))
    otk = signed_otk(puppet.user_id, signing_key)
    fallback_key = signed_otk(puppet.user_id, signing_key, fallback=True)
    counts = await as_device.keys_upload(
        device_keys=keys,
        one_time_keys={"signed_curve25519:ONE": otk, "curve25519:BARE": random_key()},
        fallback_keys={"signed_curve25519:FB": fallback_key},
    )
    assert counts == {"signed_curve25519": 1, "curve25519": 1}

    query = await as_device.keys_query([puppet.user_id, human.user_id, "@nobody:elsewhere.invalid"])
    typed = query.device_keys[puppet.user_id][device]
    assert isinstance(typed, DeviceKeys) and typed.keys == keys.keys
    assert typed.signatures == keys.signatures
    assert query.device_keys[human.user_id] == {}  # a device without keys shows none
    assert "elsewhere.invalid" in query.failures

    claim = await puppet.keys_claim({puppet.user_id: {device: "signed_curve25519"}})
    assert claim.one_time_keys[puppet.user_id][device] == {"signed_curve25519:ONE": otk}
    # With the one-time keys used up, the fallback key is handed out, marked as one.
    again = await puppet.keys_claim({puppet.user_id: {device: "signed_curve25519"}})
    assert again.one_time_keys[puppet.user_id][device] == {"signed_curve25519:FB": fallback_key}


async def test_keys_for_another_device_are_refused_before_sending(puppet: Intent) -> None:
    signing_key = generate_signing_key("OTHER")
    keys = signed_device_keys(puppet.user_id, "OTHER", signing_key)
    with pytest.raises(ValueError, match="this intent is"):
        await puppet.with_device("BKMINE").keys_upload(device_keys=keys)
    with pytest.raises(ValueError, match="with_device"):
        await puppet.keys_upload(one_time_keys={"curve25519:X": random_key()})
    with pytest.raises(ValueError, match="device_keys"):
        await puppet.with_device("BKMINE").keys_upload(device_keys={"user_id": puppet.user_id})


# -- to-device -------------------------------------------------------------------------


async def human_to_device(human: Human, marker: str) -> dict[str, Any]:
    """Sync as the real user until a to-device event carrying ``marker`` arrives."""
    since: str | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        params = {"timeout": "1000"} | ({} if since is None else {"since": since})
        sync = await human.get(f"{CLIENT}/sync", params)
        since = sync["next_batch"]
        for event in sync.get("to_device", {}).get("events", []):
            if event.get("content", {}).get("marker") == marker:
                return dict(event)
    raise AssertionError("the to-device message never arrived")


async def test_send_to_device_reaches_a_real_users_device(
    puppet: Intent, human: Human, unique: str
) -> None:
    status, whoami = await human.call("GET", f"{CLIENT}/account/whoami")
    assert status == 200 and whoami["device_id"], whoami
    await puppet.create_device("BKSENDER")
    marker = f"hello-{unique}"
    await puppet.with_device("BKSENDER").send_to_device(
        "org.example.bridge_kit.test",
        {human.user_id: {whoami["device_id"]: {"marker": marker}}},
    )
    event = await human_to_device(human, marker)
    assert event["type"] == "org.example.bridge_kit.test"
    assert event["sender"] == puppet.user_id


# -- what goes on the wire ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording_proxy(target: str) -> AsyncIterator[tuple[str, list[yarl.URL]]]:
    """A pass-through HTTP proxy in front of Synapse that records every request URL."""
    seen: list[yarl.URL] = []

    async def forward(request: web.Request) -> web.Response:
        seen.append(request.rel_url)
        async with (
            ClientSession() as session,
            session.request(
                request.method,
                target + str(request.rel_url),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as reply,
        ):
            body = await reply.read()
            return web.Response(status=reply.status, body=body, headers={
                "Content-Type": reply.headers.get("Content-Type", "application/json")
            })  # fmt: skip

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_every_request_as_a_device_carries_the_stable_device_parameter(
    synapse_devices: TestHomeserver, unique: str, human: Human
) -> None:
    async with (
        recording_proxy(synapse_devices.url) as (proxy_url, seen),
        HomeserverClient(proxy_url, synapse_devices.as_token) as proxied,
    ):
        puppet = make_intent(proxied, synapse_devices, f"_bk_wire_{unique}", None)
        await puppet.create_device("BKWIRE")
        seen.clear()
        as_device = puppet.with_device("BKWIRE")
        room_id = await as_device.create_room(invite=[human.user_id])
        await as_device.get_state(room_id)
        await as_device.send_text(room_id, "from a device")
        mxc = await as_device.upload_media(b"bytes", "text/plain", "a.txt")
        assert await as_device.download_media(mxc) == b"bytes"
        await as_device.keys_upload(one_time_keys={"curve25519:W": random_key()})
        await as_device.send_to_device("org.example.t", {human.user_id: {"*": {}}})
    assert len(seen) >= 7
    unstable = {"/_matrix/client/v3/keys/upload", "/_matrix/client/v3/sendToDevice"}
    for url in seen:
        assert url.query.get("user_id") == puppet.user_id, url
        assert url.query.get("device_id") == "BKWIRE", url  # spec v1.17 (MSC4326)
        # MSC3202's name only where the device matters, for homeservers before v1.17.
        wanted = "BKWIRE" if url.path.startswith(tuple(unstable)) else None
        assert url.query.get("org.matrix.msc3202.device_id") == wanted, url
    assert {path for path in unstable if any(url.path.startswith(path) for url in seen)} == unstable


# -- without MSC4190 -------------------------------------------------------------------------


async def test_synapse_creates_the_device_even_without_the_flag(synapse: TestHomeserver) -> None:
    """The finding behind bridge_kit's own check: Synapse 1.163 does not refuse the PUT
    when the registration lacks io.element.msc4190; it creates the device (201)."""
    localpart = f"_bk_noflag_{os.urandom(4).hex()}"
    async with HomeserverClient(synapse.url, synapse.as_token) as client:
        await client.register(RegisterRequest.for_puppet(localpart))
    user_id = f"@{localpart}:{synapse.server_name}"
    status, _ = await as_appservice(synapse, "PUT", f"{CLIENT}/devices/LENIENT", user_id=user_id)
    assert status == 201
    assert "LENIENT" in await admin_devices(synapse, user_id)


async def test_without_the_flag_create_device_is_a_clear_error(
    synapse: TestHomeserver, unique: str
) -> None:
    """What an AppService's intent does when its registration lacks io.element.msc4190."""
    async with HomeserverClient(synapse.url, synapse.as_token) as client:
        puppet = make_intent(client, synapse, f"_bk_nomsc_{unique}", None)
        puppet.device_management = bool(synapse.registration_data().get("io.element.msc4190"))
        with pytest.raises(DevicesUnavailable) as caught:
            await puppet.create_device("BKNOPE")
        message = str(caught.value)
        assert "io.element.msc4190: true" in message and puppet.user_id in message
        assert "msc3202_transaction_extensions" in message  # the homeserver options too
        with pytest.raises(DevicesUnavailable, match=r"io\.element\.msc4190"):
            await puppet.delete_device("BKNOPE")
        await puppet.ensure_registered()
    assert await admin_devices(synapse, puppet.user_id) == {}  # nothing was asked


@pytest.mark.parametrize(
    ("status", "errcode"),
    [(404, "M_UNRECOGNIZED"), (404, "M_NOT_FOUND"), (403, "M_FORBIDDEN"), (400, "M_UNKNOWN")],
)
async def test_a_homeserver_that_refuses_the_put_gives_the_clear_error(
    status: int, errcode: str
) -> None:
    """Homeservers without MSC4190 (or an older Synapse without the flag, which answers
    404 M_NOT_FOUND "Unknown device") refuse the PUT; Synapse 1.163 will not, so a small
    real HTTP server answers as they do."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"errcode": errcode, "error": "no"}, status=status)

    app = web.Application()
    app.router.add_put("/_matrix/client/v3/devices/{device}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with HomeserverClient(url, "token") as client:
            intent = Intent(client, "@_bk_x:test.local")
            with pytest.raises(DevicesUnavailable) as caught:
                await intent.create_device("DEV")
    finally:
        await runner.cleanup()
    assert f"{status} {errcode}" in str(caught.value)
    assert "io.element.msc4190: true" in str(caught.value)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize(("status", "errcode"), [(500, "M_UNKNOWN"), (503, "M_UNKNOWN")])
async def test_a_homeserver_outage_is_not_called_a_missing_flag(status: int, errcode: str) -> None:
    """A 5xx (Synapse's internal error is 500 M_UNKNOWN; a 503 after the client's
    retries) is an outage: the homeserver's error goes up as it is, not
    DevicesUnavailable telling the operator to set a flag they have set."""

    async def fail(request: web.Request) -> web.Response:
        return web.json_response(
            {"errcode": errcode, "error": "Internal server error"}, status=status
        )

    app = web.Application()
    app.router.add_put("/_matrix/client/v3/devices/{device}", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with HomeserverClient(
            url, "token", retry=RetryPolicy(max_attempts=2, base_delay=0)
        ) as client:
            intent = Intent(client, "@_bk_x:test.local", device_management=True)
            with pytest.raises(MatrixRequestError) as caught:
                await intent.create_device("DEV")
    finally:
        await runner.cleanup()
    assert not isinstance(caught.value, DevicesUnavailable)
    assert (caught.value.status, caught.value.errcode) == (status, errcode)


def test_device_ids_are_checked_before_anything_is_sent() -> None:
    intent = Intent(HomeserverClient("http://127.0.0.1:1", "t"), "@_bk_x:test.local")
    for bad in ("", "a\x00b"):
        with pytest.raises(ValueError, match="device ID"):
            intent.with_device(bad)
    assert repr(intent.with_device("D")) == "<Intent @_bk_x:test.local device D>"


async def test_an_appservice_login_under_msc4190_is_a_clear_error(
    synapse_devices: TestHomeserver, unique: str
) -> None:
    """Spec v1.17's M_APPSERVICE_LOGIN_UNSUPPORTED maps to its own error, which says why."""
    localpart = f"_bk_login_{unique}"
    body = {
        "type": "m.login.application_service",
        "identifier": {"type": "m.id.user", "user": f"@{localpart}:{synapse_devices.server_name}"},
    }
    async with HomeserverClient(synapse_devices.url, synapse_devices.as_token) as client:
        await client.register(RegisterRequest.for_puppet(localpart))
        with pytest.raises(AppserviceLoginUnsupported) as caught:
            await client.request("POST", f"{CLIENT}/login", body=body, resend=False)
    assert caught.value.errcode == "M_APPSERVICE_LOGIN_UNSUPPORTED"
    assert "io.element.msc4190: true" in str(caught.value)
    assert "Intent.create_device" in str(caught.value)
