"""The device hooks end to end: a real Synapse with the MSC2409/MSC3202 options pushes
to-device events, device lists and one-time-key counts to a running AppService.

The puppets' devices are made with raw MSC4190 requests and their keys uploaded with
raw masqueraded requests (as the appservice), so these tests depend only on the hooks.
The human is a real user with their own access token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import attrs
import pytest

from bridge_kit import AppService, AppServiceConfig, Config, HomeserverConfig
from bridge_kit.client.homeserver import quote_segment
from bridge_kit.types import DeviceListUpdate, Event, OtkCounts, ToDeviceEvent
from tests.conftest import SERVER_NAME, TestHomeserver
from tests.helpers.daemons import real_user

TIMEOUT = 60.0
T = TypeVar("T")


@attrs.define
class Received:
    """What the app's device hooks got, in order."""

    to_device: list[ToDeviceEvent] = attrs.field(factory=list)
    device_lists: list[DeviceListUpdate] = attrs.field(factory=list)
    otk_counts: list[OtkCounts] = attrs.field(factory=list)
    typing: list[Event] = attrs.field(factory=list)

    async def wait_for(self, found: Callable[[], T | None], what: str) -> T:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if (value := found()) is not None:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what} never reached the hook")


@pytest.fixture(scope="module")
async def bridge(
    synapse_devices: TestHomeserver, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[AppService, Received]]:
    """One app for the module: the homeserver backs off from an appservice it found
    down, so it listens throughout."""
    hs = synapse_devices
    db = tmp_path_factory.mktemp("device-hooks") / "bk.db"
    app = AppService(
        Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path), store=f"sqlite:///{db}",
                port=hs.appservice_port,
            ),
        )
    )  # fmt: skip
    received = Received()

    @app.on_to_device()
    async def on_to_device(event: ToDeviceEvent) -> None:
        received.to_device.append(event)

    @app.on_device_lists
    async def on_device_lists(update: DeviceListUpdate) -> None:
        received.device_lists.append(update)

    @app.on_otk_counts
    async def on_otk_counts(counts: OtkCounts) -> None:
        received.otk_counts.append(counts)

    @app.on_ephemeral("m.typing")
    async def on_typing(event: Event) -> None:
        received.typing.append(event)

    async with app:
        yield app, received


async def puppet_with_device(app: AppService, localpart: str, device_id: str) -> str:
    """Register the puppet and create its device with MSC4190, raw (201, then 200)."""
    await app.puppets.ensure_registered(localpart)
    user_id = f"@{localpart}:{SERVER_NAME}"
    path = f"/_matrix/client/v3/devices/{quote_segment(device_id)}"
    await app.client.request("PUT", path, body={"display_name": "hooks test"}, user_id=user_id)
    return user_id


async def upload_keys(app: AppService, user_id: str, device_id: str, body: Any) -> Any:
    """``POST /keys/upload`` as the appservice, masquerading as the puppet's device."""
    return await app.client.request(
        "POST",
        "/_matrix/client/v3/keys/upload",
        body=body,
        query={"device_id": device_id, "org.matrix.msc3202.device_id": device_id},
        user_id=user_id,
    )


async def test_a_real_user_s_to_device_message_reaches_on_to_device(
    bridge: tuple[AppService, Received], synapse_devices: TestHomeserver, unique: str
) -> None:
    app, received = bridge
    puppet = await puppet_with_device(app, f"_bk_todev{unique}", f"PUPDEV{unique}")
    client, human = await real_user(synapse_devices, f"todev{unique}")
    event_type = f"org.example.test.{unique}"
    async with client:
        await client.request(
            "PUT",
            f"/_matrix/client/v3/sendToDevice/{event_type}/txn{unique}",
            body={"messages": {puppet: {f"PUPDEV{unique}": {"hello": unique}}}},
        )
    event = await received.wait_for(
        lambda: next((e for e in received.to_device if e.type == event_type), None),
        "the to-device message",
    )
    assert (event.to_user_id, event.to_device_id) == (puppet, f"PUPDEV{unique}")
    assert (event.sender, event.content) == (human.user_id, {"hello": unique})
    assert app.inbox.stats.dead_letters == 0


async def test_a_real_user_s_new_device_shows_in_on_device_lists(
    bridge: tuple[AppService, Received], synapse_devices: TestHomeserver, unique: str
) -> None:
    """Synapse tells an appservice of the device changes of users sharing a room
    with its users; the puppet needs no device for that."""
    app, received = bridge
    localpart = f"_bk_lists{unique}"
    name = f"lists{unique}"
    client, human = await real_user(synapse_devices, name)
    async with client:
        room_id = await human.create_room()
        await human.invite(room_id, f"@{localpart}:{SERVER_NAME}")
        await app.intent(localpart).join_room(room_id)
        before = len(received.device_lists)
        # The human logs in on a new device, with a plain HTTP client of their own.
        login = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": name},
            "password": "pw",
            "device_id": f"NEWDEV{unique}",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{synapse_devices.url}/_matrix/client/v3/login", json=login) as reply,
        ):
            assert reply.status == 200, await reply.text()
        await received.wait_for(
            lambda: next(
                (u for u in received.device_lists[before:] if human.user_id in u.changed), None
            ),
            f"{human.user_id}'s new device",
        )


async def test_one_time_key_counts_arrive_after_an_upload(
    bridge: tuple[AppService, Received], synapse_devices: TestHomeserver, unique: str
) -> None:
    app, received = bridge
    device_id = f"OTKDEV{unique}"
    puppet = await puppet_with_device(app, f"_bk_otk{unique}", device_id)
    keys = {
        f"signed_curve25519:AAAA{n}{unique}": {"key": f"k{n}{unique}", "signatures": {}}
        for n in range(3)
    }
    fallback = {f"signed_curve25519:FB{unique}": {"key": "f", "fallback": True, "signatures": {}}}
    reply = await upload_keys(
        app, puppet, device_id, {"one_time_keys": keys, "fallback_keys": fallback}
    )
    assert reply["one_time_key_counts"].get("signed_curve25519") == 3
    # Synapse adds the counts of the users a transaction concerns: send the puppet something.
    client, _ = await real_user(synapse_devices, f"otk{unique}")
    async with client:
        await client.request(
            "PUT",
            f"/_matrix/client/v3/sendToDevice/org.example.ping/otk{unique}",
            body={"messages": {puppet: {device_id: {}}}},
        )
    counts = await received.wait_for(
        lambda: next(
            (c for c in received.otk_counts if (c.user_id, c.device_id) == (puppet, device_id)),
            None,
        ),
        "the one-time-key counts",
    )
    assert counts.counts.get("signed_curve25519") == 3
    assert counts.unused_fallback_key_types == ["signed_curve25519"]


async def test_an_ephemeral_event_is_handled_once_with_both_ephemeral_keys(
    bridge: tuple[AppService, Received], synapse_devices: TestHomeserver, unique: str
) -> None:
    """The registration has receive_ephemeral and de.sorunome.msc2409.push_ephemeral (as
    generate-registration --encryption writes): Synapse then sends each ephemeral event
    under both names, and the bridge must handle it once."""
    app, received = bridge
    assert synapse_devices.registration_data().get("receive_ephemeral") is True
    assert synapse_devices.registration_data().get("de.sorunome.msc2409.push_ephemeral") is True
    localpart = f"_bk_typing{unique}"
    client, human = await real_user(synapse_devices, f"typing{unique}")
    async with client:
        room_id = await human.create_room()
        await human.invite(room_id, f"@{localpart}:{SERVER_NAME}")
        await app.intent(localpart).join_room(room_id)
        await human.set_typing(room_id, 30_000)

        def typing_in_room() -> list[Event] | None:
            found = [e for e in received.typing if e.room_id == room_id]
            return found or None

        await received.wait_for(typing_in_room, "the typing notice")
        # Both copies (if two) were accepted in one commit: wait until both are handled.
        while (await app.store.inbox_stats()).depth:
            await asyncio.sleep(0.05)
    typing = [e for e in received.typing if e.room_id == room_id]
    assert [e.content["user_ids"] for e in typing] == [[human.user_id]]
