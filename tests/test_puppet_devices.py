"""PuppetDevices (bridge_kit.crypto.puppet_devices) in process: what ``prepare`` leaves
behind when a puppet's device cannot be made. The devices themselves, on Synapse,
are in tests/test_client_trust.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge_kit.config import EncryptionConfig
from bridge_kit.crypto.bridge import option_warnings
from bridge_kit.crypto.puppet_devices import PuppetDevices, stored_device_id
from bridge_kit.errors import CrossSigningFailed
from bridge_kit.store import open_store


class FakeIntent:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    async def create_device(self, device_id: str, name: str) -> None:
        pass

    def with_device(self, device_id: str | None) -> FakeIntent:
        return self


class FakeMachine:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.account = self

    def device_keys(self) -> dict[str, Any]:
        return {"device_id": self.device_id}


class SlowAndFailing:
    """Makes machines: ``@bad`` fails at once, ``@slow`` only once let go."""

    def __init__(self) -> None:
        self.let_go = asyncio.Event()
        self.failed = asyncio.Event()
        self.made: list[str] = []

    async def __call__(self, intent: FakeIntent, device_id: str) -> FakeMachine:
        if intent.user_id == "@bad:test.local":
            self.failed.set()
            raise CrossSigningFailed("refused")
        if intent.user_id == "@slow:test.local":
            await self.let_go.wait()
        self.made.append(intent.user_id)
        return FakeMachine(device_id)


class NoIdentity:
    async def ensure(self, device_keys: Any) -> None:
        pass


async def test_prepare_leaves_nothing_running_when_one_fails() -> None:
    store = open_store("memory://")
    await store.open()
    factory = SlowAndFailing()
    puppets = PuppetDevices(
        store,
        FakeIntent,
        factory,
        lambda intent, user_id: NoIdentity(),  # type: ignore[arg-type]
    )
    users = ["@bad:test.local", "@slow:test.local", "@fine:test.local"]
    prepare = asyncio.create_task(puppets.prepare(users))
    # The failure is not raised while another puppet's device is still being made: the
    # loop turns (no time passes, no I/O) are many more than a raised failure needs.
    await factory.failed.wait()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not prepare.done()
    factory.let_go.set()
    with pytest.raises(CrossSigningFailed, match="refused"):
        await prepare
    assert sorted(factory.made) == ["@fine:test.local", "@slow:test.local"]
    assert {m.device_id for m in puppets.loaded()} == {
        await _device(store, "@slow:test.local"),
        await _device(store, "@fine:test.local"),
    }


async def _device(store: Any, user_id: str) -> str:
    device_id = await stored_device_id(store, user_id)
    assert device_id is not None
    return device_id


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"self_sign": True, "msc4350": True}, None),
        ({"self_sign": True, "puppet_devices": True}, None),
        ({"msc4350": True}, "msc4350 without self_sign"),
        ({"self_sign": True, "puppet_devices": True, "msc4350": True}, "msc4350 is ignored"),
    ],
)
def test_a_mix_of_trust_options_that_cannot_work_is_named(
    options: dict[str, bool], expected: str | None
) -> None:
    warnings = option_warnings(EncryptionConfig(enabled=True, **options))
    if expected is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert expected in warning


class Counting:
    """Makes machines at once, counting them by user."""

    def __init__(self) -> None:
        self.made: list[str] = []

    async def __call__(self, intent: FakeIntent, device_id: str) -> FakeMachine:
        self.made.append(intent.user_id)
        return FakeMachine(device_id)


async def capped(loaded_max: int) -> tuple[PuppetDevices, Counting, Any]:
    store = open_store("memory://")
    await store.open()
    factory = Counting()
    puppets = PuppetDevices(
        store,
        FakeIntent,  # type: ignore[arg-type]
        factory,  # type: ignore[arg-type]
        lambda intent, user_id: NoIdentity(),  # type: ignore[arg-type,return-value]
        loaded_max=loaded_max,
    )
    return puppets, factory, store


def loaded_devices(puppets: PuppetDevices) -> list[str]:
    return [m.device_id for m in puppets.loaded()]


async def test_idle_machines_past_the_cap_are_let_go_and_come_back_the_same() -> None:
    puppets, factory, _ = await capped(2)
    users = [f"@p{n}:test.local" for n in range(3)]
    devices = {}
    for user_id in users:
        devices[user_id] = (await puppets.for_sending(user_id)).device_id
    # The least recently used went: two stay.
    assert loaded_devices(puppets) == [devices[users[1]], devices[users[2]]]
    again = await puppets.for_sending(users[0])
    assert again.device_id == devices[users[0]]  # its stored device, not a new one
    assert factory.made == [*users, users[0]]
    assert loaded_devices(puppets) == [devices[users[2]], devices[users[0]]]


async def test_a_machine_in_use_is_not_let_go() -> None:
    puppets, factory, _ = await capped(1)
    async with puppets.sending("@busy:test.local") as busy:
        await puppets.for_sending("@a:test.local")
        await puppets.prepare(["@b:test.local", "@c:test.local"])
        assert busy in puppets.loaded()
        async with puppets.sending("@busy:test.local") as same:
            assert same is busy
    assert factory.made.count("@busy:test.local") == 1
    # Once let go of, the busy one is the most recent: it stays, the others went.
    assert puppets.loaded() == [busy]


async def test_receiving_finds_only_a_stored_device() -> None:
    puppets, _, _ = await capped(4)
    async with puppets.receiving("@none:test.local", "DEV") as machine:
        assert machine is None
    made = await puppets.for_sending("@p:test.local")
    async with puppets.receiving("@p:test.local", made.device_id) as machine:
        assert machine is made
    async with puppets.receiving("@p:test.local", "OTHER") as machine:
        assert machine is None


def test_the_cap_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="loaded_max"):
        PuppetDevices(None, None, None, None, loaded_max=0)  # type: ignore[arg-type]
