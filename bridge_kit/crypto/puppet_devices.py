"""``encryption.puppet_devices``: each puppet that sends into an encrypted room gets
a device of its own, so clients see its messages come from its own device.

A puppet's device is made the first time the puppet must encrypt (MSC4190), with
its own Olm account, its own Megolm session per room, and a cross-signing identity
of its own that signs the device: clients then show its messages like those of
any person whose identity they did not verify (no shield), and strict clients
(MSC4153) share room keys with it. The device id is kept in the store, so a
restart (or a second daemon) finds the same device; making it again is a no-op
on the homeserver.

Every device of the bridge reads the same inbound room keys and tracked devices
(the bot's machine holds them): a key that reached a puppet's device opens the
room's events for the whole bridge, and the bot need not be in the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Final, overload

from bridge_kit.crypto.cross_signing import CrossSigning
from bridge_kit.crypto.machine import CryptoMachine

if TYPE_CHECKING:
    from bridge_kit.intent import Intent
    from bridge_kit.store import Store

__all__ = ["DEVICE_NAME", "LOADED_MAX", "PuppetDevices", "device_id_for", "stored_device_id"]

log = logging.getLogger(__name__)

DEVICE_NAME: Final = "bridge_kit"
#: Puppets' machines kept in memory at most (each holds an Olm account and an Olm
#: session per human device it shared a key with: 30 kB with 5 devices). Past it, the
#: least recently used that nobody is using are let go: their state is in the store,
#: and one comes back in a few requests, with its device, keys and identity.
LOADED_MAX: Final = 1000
_BRIDGE_KIND: Final = "bridge"
_DEVICE_KEY: Final = "device_id"


async def stored_device_id(store: Store, user_id: str) -> str | None:
    """``user_id``'s bridge device id, if one was made."""
    stored = await store.crypto_get(user_id, _BRIDGE_KIND, _DEVICE_KEY)
    return None if stored is None else stored.decode("utf-8")


async def device_id_for(store: Store, user_id: str) -> str:
    """``user_id``'s bridge device id: made once, then kept in the store."""
    stored = await stored_device_id(store, user_id)
    if stored is not None:
        return stored
    # Under the user's crypto lock: a second daemon making it at the same moment
    # finds this one's instead of storing another.
    async with store.crypto_lock(user_id):
        stored = await stored_device_id(store, user_id)
        if stored is not None:
            return stored
        device_id = "BK" + secrets.token_hex(5).upper()
        await store.crypto_put(user_id, _BRIDGE_KIND, _DEVICE_KEY, device_id.encode("utf-8"))
        return device_id


#: Makes the machine of a user's device: (the device's intent, device id) -> started machine.
MachineFactory = Callable[["Intent", str], Awaitable[CryptoMachine]]
_Find = Callable[["Store", str], Awaitable[str | None]]
_Make = Callable[["Store", str], Awaitable[str]]
#: The cross-signing identity of a user, acting as one of its devices.
IdentityFactory = Callable[["Intent", str], CrossSigning]


class PuppetDevices:
    """The puppets' devices and machines, made on first need, one at a time per puppet."""

    def __init__(
        self,
        store: Store,
        intent_of: Callable[[str], Intent],
        make_machine: MachineFactory,
        identity_of: IdentityFactory,
        loaded_max: int = LOADED_MAX,
    ) -> None:
        if loaded_max < 1:
            raise ValueError(f"loaded_max must be at least 1, not {loaded_max}")
        self.store = store
        self.intent_of = intent_of
        self.make_machine = make_machine
        self.identity_of = identity_of
        self.loaded_max = loaded_max
        # Least recently used first.
        self._machines: OrderedDict[str, CryptoMachine] = OrderedDict()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._in_use: Counter[str] = Counter()

    def loaded(self) -> list[CryptoMachine]:
        return list(self._machines.values())

    async def for_sending(self, user_id: str) -> CryptoMachine:
        """The puppet's machine, its device made, keyed and cross-signed if it was not.

        To encrypt with it, hold :meth:`sending` instead: a machine nobody holds may
        be let go (and loaded again as another object) once :attr:`loaded_max` others
        were loaded since."""
        machine = await self._machine(user_id, device_id_for)
        self._used_now(user_id)
        return machine

    @contextlib.asynccontextmanager
    async def sending(self, user_id: str) -> AsyncIterator[CryptoMachine]:
        """:meth:`for_sending`, the machine kept loaded for the ``async with`` block."""
        self._in_use[user_id] += 1
        try:
            yield await self.for_sending(user_id)
        finally:
            self._done_with(user_id)

    @contextlib.asynccontextmanager
    async def receiving(self, user_id: str, device_id: str) -> AsyncIterator[CryptoMachine | None]:
        """:meth:`for_device`, the machine kept loaded for the ``async with`` block."""
        self._in_use[user_id] += 1
        try:
            yield await self.for_device(user_id, device_id)
        finally:
            self._done_with(user_id)

    def _done_with(self, user_id: str) -> None:
        self._in_use[user_id] -= 1
        if self._in_use[user_id] <= 0:
            del self._in_use[user_id]
        self._used_now(user_id)

    def _used_now(self, user_id: str) -> None:
        """``user_id``'s machine is the most recently used; let go of idle ones past the cap."""
        if user_id in self._machines:
            self._machines.move_to_end(user_id)
        self._let_go_of_idle()

    def _let_go_of_idle(self) -> None:
        """Past :attr:`loaded_max`, let go of the least recently used machines that no
        block holds and no one is loading (two objects of one device would each move
        its ratchets on from the same state)."""
        excess = len(self._machines) - self.loaded_max
        for user_id in list(self._machines):
            if excess <= 0:
                return
            lock = self._locks.get(user_id)
            if user_id in self._in_use or (lock is not None and lock.locked()):
                continue
            del self._machines[user_id]
            self._locks.pop(user_id, None)
            excess -= 1

    async def prepare(self, user_ids: Iterable[str], concurrency: int = 8) -> None:
        """Make the devices of many puppets ahead of their first message (a portal
        with many members), ``concurrency`` at a time; those made already cost nothing."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        gate = asyncio.Semaphore(concurrency)

        async def one(user_id: str) -> None:
            async with gate:
                await self.for_sending(user_id)

        wanted = list(dict.fromkeys(user_ids))
        # All are awaited before a failure is raised: none goes on behind the caller's
        # back, its failure never retrieved. The first is raised, the others logged.
        outcomes = await asyncio.gather(
            *(one(user_id) for user_id in wanted), return_exceptions=True
        )
        failed = [
            (user_id, outcome)
            for user_id, outcome in zip(wanted, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]
        for user_id, failure in failed[1:]:
            log.warning("encryption: no device made for %s: %s", user_id, failure)
        if failed:
            raise failed[0][1]

    async def for_device(self, user_id: str, device_id: str) -> CryptoMachine | None:
        """The machine of one of our puppets' devices (to-device messages and key
        counts addressed to it), or None if it is not one the bridge made."""
        machine = await self._machine(user_id, stored_device_id)
        self._used_now(user_id)
        return machine if machine is not None and machine.device_id == device_id else None

    @overload
    async def _machine(self, user_id: str, find: _Make) -> CryptoMachine: ...
    @overload
    async def _machine(self, user_id: str, find: _Find) -> CryptoMachine | None: ...
    async def _machine(self, user_id: str, find: _Find) -> CryptoMachine | None:
        """The puppet's machine; ``find`` gives its device id (or makes one)."""
        if user_id in self._machines:
            return self._machines[user_id]
        # The user's crypto lock too: two daemons setting the same puppet up at once
        # would each make a cross-signing identity, and the homeserver keep one.
        async with self._locks[user_id], self.store.crypto_lock(user_id):
            if user_id in self._machines:
                return self._machines[user_id]
            device_id = await find(self.store, user_id)
            if device_id is None:
                return None
            intent = self.intent_of(user_id)
            # Idempotent on the homeserver: after a crash between the store and the PUT,
            # or on a second daemon, the same device.
            await intent.create_device(device_id, DEVICE_NAME)
            machine = await self.make_machine(intent.with_device(device_id), device_id)
            await self.identity_of(intent.with_device(device_id), user_id).ensure(
                machine.account.device_keys()
            )
            log.info("encryption: %s speaks from its own device %s", user_id, device_id)
            self._machines[user_id] = machine
            return machine
