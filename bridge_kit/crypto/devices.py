"""The devices of other users: what ``/keys/query`` answered, kept only when each
device's keys carry a valid signature by the device's own ed25519 key, refreshed
when the homeserver says a user's device list changed."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from bridge_kit.crypto.records import DeviceListsStamp, DeviceRecord, UserDevicesRecord
from bridge_kit.crypto.signing import verify_json
from bridge_kit.crypto.vault import CryptoVault

__all__ = ["DeviceTracker", "TrackedDevice", "verified_device"]

_log = logging.getLogger(__name__)

_KIND: Final = "devices"
_STAMP_KIND: Final = "device_lists"
_STAMP_KEY: Final = "stamp"


@attrs.frozen
class TrackedDevice:
    """One device's public identity keys, checked against its self-signature."""

    user_id: str
    device_id: str
    curve25519: str
    ed25519: str
    algorithms: tuple[str, ...] = ()
    display_name: str | None = None

    def record(self) -> DeviceRecord:
        """What the vault keeps of this device."""
        return DeviceRecord(self.curve25519, self.ed25519, list(self.algorithms), self.display_name)

    @classmethod
    def from_record(cls, user_id: str, device_id: str, record: DeviceRecord) -> TrackedDevice:
        return cls(
            user_id,
            device_id,
            record.curve25519,
            record.ed25519,
            tuple(record.algorithms),
            record.display_name,
        )


def verified_device(user_id: str, device_id: str, payload: Any) -> TrackedDevice | str:
    """The :class:`TrackedDevice` in one ``device_keys[user_id][device_id]`` entry of a
    ``/keys/query`` answer, or the reason it is refused."""
    if not isinstance(payload, Mapping):
        return "not an object"
    if payload.get("user_id") != user_id or payload.get("device_id") != device_id:
        return "its user_id or device_id is not the one it is listed under"
    keys = payload.get("keys")
    if not isinstance(keys, Mapping):
        return "no keys"
    curve = keys.get(f"curve25519:{device_id}")
    ed25519 = keys.get(f"ed25519:{device_id}")
    if not isinstance(curve, str) or not isinstance(ed25519, str):
        return "no curve25519 or ed25519 key"
    if not verify_json(payload, user_id, device_id, ed25519):
        return "no valid self-signature"
    algorithms = payload.get("algorithms")
    unsigned = payload.get("unsigned")
    name = unsigned.get("device_display_name") if isinstance(unsigned, Mapping) else None
    return TrackedDevice(
        user_id,
        device_id,
        curve,
        ed25519,
        tuple(a for a in algorithms if isinstance(a, str)) if isinstance(algorithms, list) else (),
        name if isinstance(name, str) else None,
    )


class DeviceTracker:
    """Verified devices per user, in memory and in the vault.

    A user is *outdated* until a ``/keys/query`` answer for them was applied, and
    again after a device-list change; :meth:`outdated_among` says whom to query.

    On a store several daemons share (``crypto_shared``), the homeserver tells one
    of them of a change; every change therefore writes a new stamp, and
    :meth:`catch_up` reads the lists again when the stamp is not the one last read.
    """

    def __init__(self, vault: CryptoVault) -> None:
        self.vault = vault
        self._devices: dict[str, dict[str, TrackedDevice]] = {}
        self._outdated: set[str] = set()
        self._loaded = False
        self._stamp: str | None = None
        self.version = 0
        """Changes with every change to the devices known: a check of a room's devices
        made at one version holds while it is the same."""

    async def load(self) -> None:
        """Read the stored devices (once: machines sharing this tracker each ask)."""
        if self._loaded:
            return
        await self._read(await self._stored_stamp())
        self._loaded = True

    async def catch_up(self) -> None:
        """On a shared store, read the device lists again if another daemon (or this
        one) changed them since they were read; elsewhere nothing to do."""
        if not self.vault.store.crypto_shared:
            return
        # The stamp before the lists: a change made in between is caught next time.
        stamp = await self._stored_stamp()
        if stamp != self._stamp:
            await self._read(stamp)

    async def _stored_stamp(self) -> str | None:
        if not self.vault.store.crypto_shared:
            return None
        stamp = await self.vault.get_record(_STAMP_KIND, _STAMP_KEY, DeviceListsStamp)
        return stamp.token if stamp is not None else None

    async def _read(self, stamp: str | None = None) -> None:
        devices: dict[str, dict[str, TrackedDevice]] = {}
        outdated: set[str] = set()
        for user_id, record in (await self.vault.records(_KIND, UserDevicesRecord)).items():
            devices[user_id] = {
                device_id: TrackedDevice.from_record(user_id, device_id, entry)
                for device_id, entry in record.devices.items()
            }
            if record.outdated:
                outdated.add(user_id)
        self._devices, self._outdated, self._stamp = devices, outdated, stamp
        self.version += 1

    def devices(self, user_id: str) -> dict[str, TrackedDevice]:
        """The known devices of ``user_id`` (empty if never queried)."""
        return dict(self._devices.get(user_id, {}))

    def device_by_curve25519(self, user_id: str, curve25519: str) -> TrackedDevice | None:
        for device in self._devices.get(user_id, {}).values():
            if device.curve25519 == curve25519:
                return device
        return None

    def outdated_among(self, user_ids: Iterable[str]) -> list[str]:
        """Those of ``user_ids`` never queried or whose device list changed since."""
        return sorted({u for u in user_ids if u not in self._devices or u in self._outdated})

    async def mark_outdated(self, user_ids: Iterable[str]) -> None:
        """Device lists changed: query these users again before trusting their list."""
        changed = {u for u in user_ids if u in self._devices and u not in self._outdated}
        self._outdated |= changed
        self.version += 1
        await self._save(changed)

    async def forget(self, user_ids: Iterable[str]) -> None:
        """We no longer share a room with these users: drop their devices."""
        self.version += 1
        forgotten = False
        for user_id in user_ids:
            if self._devices.pop(user_id, None) is not None:
                await self.vault.delete(_KIND, user_id)
                forgotten = True
            self._outdated.discard(user_id)
        if forgotten:
            await self._stamp_change()

    async def apply_query(self, answer: Mapping[str, Any]) -> dict[str, list[str]]:
        """Take in a ``/keys/query`` answer; return the devices new since the last one.

        A device refused by :func:`verified_device`, or whose ed25519 key differs from
        the one first seen for its id, is left out (the spec: such a device must be
        ignored, a changed ed25519 key means someone else holds the device id).
        """
        device_keys = answer.get("device_keys")
        if not isinstance(device_keys, Mapping):
            return {}
        added: dict[str, list[str]] = {}
        for user_id, listed in device_keys.items():
            if not isinstance(listed, Mapping):
                continue
            devices = self._accepted_devices(user_id, listed)
            new = sorted(devices.keys() - self._devices.get(user_id, {}).keys())
            if new:
                added[user_id] = new
            self._devices[user_id] = devices
            self._outdated.discard(user_id)
        self.version += 1
        await self._save(set(device_keys) & self._devices.keys())
        return added

    def _accepted_devices(
        self, user_id: str, listed: Mapping[str, Any]
    ) -> dict[str, TrackedDevice]:
        known = self._devices.get(user_id, {})
        accepted: dict[str, TrackedDevice] = {}
        for device_id, payload in listed.items():
            device = verified_device(user_id, str(device_id), payload)
            if isinstance(device, str):
                _log.warning("ignoring device %s of %s: %s", device_id, user_id, device)
                continue
            previous = known.get(device.device_id)
            if previous is not None and previous.ed25519 != device.ed25519:
                _log.warning(
                    "ignoring device %s of %s: its ed25519 key changed", device_id, user_id
                )
                accepted[previous.device_id] = previous
                continue
            accepted[device.device_id] = device
        return accepted

    async def _save(self, user_ids: Iterable[str]) -> None:
        records = {
            user_id: UserDevicesRecord(
                {d.device_id: d.record() for d in self._devices[user_id].values()},
                outdated=user_id in self._outdated,
            )
            for user_id in user_ids
            if user_id in self._devices
        }
        if records:
            await self.vault.put_records(_KIND, records)
            await self._stamp_change()

    async def _stamp_change(self) -> None:
        # Not taken as the stamp last read: a change another daemon made just before
        # this one would be missed. The next catch_up reads everything again.
        if self.vault.store.crypto_shared:
            stamp = DeviceListsStamp(secrets.token_hex(16))
            await self.vault.put_record(_STAMP_KIND, _STAMP_KEY, stamp)
