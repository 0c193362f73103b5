"""The crypto of one device, put together: the account and its key uploads, device
tracking, Olm to-device messages, room keys in and out, and room event encryption.

It talks to the homeserver through :class:`KeysApi` (the ``/keys`` and
``/sendToDevice`` calls as that device), so it does not care how requests are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any, Final, Protocol

import attrs

from bridge_kit.crypto.account import MEGOLM_ALGORITHM, OLM_ALGORITHM, SIGNED_CURVE25519, OlmAccount
from bridge_kit.crypto.devices import DeviceTracker, TrackedDevice
from bridge_kit.crypto.megolm import (
    DecryptedRoomEvent,
    InboundGroupSessions,
    OutboundGroupSessions,
    OutboundSession,
    RotationSettings,
)
from bridge_kit.crypto.olm import OlmPayload, OlmSessions
from bridge_kit.crypto.vault import CryptoStore, CryptoVault

__all__ = ["ROOM_KEY", "CryptoMachine", "KeysApi"]

_log = logging.getLogger(__name__)

ROOM_KEY: Final = "m.room_key"
ENCRYPTED: Final = "m.room.encrypted"
#: Seconds before a device whose one-time key could not be claimed is tried again.
CLAIM_RETRY: Final = 300.0
#: Where a device's holder of the crypto lock leaves its mark (see CryptoMachine._locked).
_LOCK_KIND: Final = "lock"
_EPOCH: Final = "epoch"
#: Megolm indexes promised per commit on a store one process works on (SQLite): a
#: commit per 64 messages instead of one per message; a crash skips at most 64.
RESERVED_INDEXES: Final = 64


class KeysApi(Protocol):
    """The homeserver calls the machine makes, as its own device."""

    async def upload_keys(
        self,
        device_keys: dict[str, Any] | None,
        one_time_keys: dict[str, Any],
        fallback_keys: dict[str, Any],
    ) -> Mapping[str, int]:
        """``POST /keys/upload``; the one-time key counts by algorithm."""

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        """``POST /keys/query``: the answer body (``device_keys`` by user and device)."""

    async def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> Mapping[str, Any]:
        """``POST /keys/claim``: the answer's ``one_time_keys`` by user and device."""

    async def send_to_device(
        self, event_type: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """``PUT /sendToDevice/{event_type}/{txnId}``."""


def owner_of(user_id: str, device_id: str) -> str:
    """The store owner key of one device's crypto state."""
    return f"{user_id}|{device_id}"


class CryptoMachine:
    """End-to-end encryption for ``user_id``'s device ``device_id``."""

    def __init__(
        self,
        store: CryptoStore,
        user_id: str,
        device_id: str,
        pickle_key: bytes,
        api: KeysApi,
        ours: Callable[[str], bool] | None = None,
        *,
        shared_with: CryptoMachine | None = None,
        bridge_users: Callable[[str], bool] | None = None,
    ) -> None:
        """``ours(user_id)``: whether a user sends with this device's Megolm sessions
        (the bridge's puppets), so that their events can be read back.

        ``shared_with``: another machine of the same bridge (the bot's) whose tracked
        devices and inbound room keys this one uses too, so a room key that reached any
        of the bridge's devices opens the room's events, and each user's devices are
        queried once. ``bridge_users(user_id)``: users whose devices are all the
        bridge's own (the bot, the puppets): room keys are not shared with them, since
        every device of the bridge reads the same inbound keys."""
        self.user_id = user_id
        self.device_id = device_id
        self.api = api
        self.vault = CryptoVault(store, owner_of(user_id, device_id), pickle_key)
        if shared_with is None:
            self.tracker = DeviceTracker(self.vault)
            self.inbound = InboundGroupSessions(self.vault, ours)
        else:
            self.tracker, self.inbound = shared_with.tracker, shared_with.inbound
        self._bridge_users = bridge_users
        self._account: OlmAccount | None = None
        self._olm: OlmSessions | None = None
        self._outbound: OutboundGroupSessions | None = None
        # The account, the Olm sessions and the room sessions change on every use:
        # one user of them at a time, in this process and (the store's crypto lock)
        # in every daemon sharing the store.
        self._lock = asyncio.Lock()
        self._epoch: bytes | None = None
        self._claim_failed: dict[tuple[str, str], float] = {}
        self._settled: dict[str, _Settled] = {}

    # -- start-up and keys ---------------------------------------------------

    async def start(self) -> None:
        """Load (or create) the account and sessions, then upload what the server lacks."""
        if self.tracker.vault is self.vault:
            await self.tracker.load()
        async with self._locked():
            await self._load()
        counts = await self.api.upload_keys(None, {}, {})
        await self.top_up(counts.get(SIGNED_CURVE25519, 0))

    async def _load(self) -> None:
        """(Re)read the device's account and sessions from the store."""
        self._account = await OlmAccount.load_or_create(self.vault, self.user_id, self.device_id)
        self._olm = OlmSessions(self._account, self.vault, self.tracker)
        # A store other daemons share saves every message: the next holder of the
        # lock goes on from the exact index instead of jumping a reservation.
        reserve = 1 if self.vault.store.crypto_shared else RESERVED_INDEXES
        self._outbound = OutboundGroupSessions(
            self._account, self.vault, self.inbound, reserve=reserve
        )
        await self._olm.load()

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the device's state: this process's lock, then the store's crypto lock.

        On a store other daemons share, each holder leaves a fresh epoch mark as it
        takes the lock; a mark other than the one this machine left means another
        daemon used the device since, and what is in memory is read again first."""
        store = self.vault.store
        if not store.crypto_shared:  # one process: this process's lock is the whole lock
            async with self._lock:
                yield
            return
        async with self._lock, store.crypto_lock(self.vault.owner):
            found = await store.crypto_get(self.vault.owner, _LOCK_KIND, _EPOCH)
            if found != self._epoch and self._account is not None:
                _log.info("%s %s: another daemon used the device; reloading its state",
                          self.user_id, self.device_id)  # fmt: skip
                await self._load()
            self._epoch = secrets.token_bytes(16)
            await store.crypto_put(self.vault.owner, _LOCK_KIND, _EPOCH, self._epoch)
            yield

    @property
    def account(self) -> OlmAccount:
        if self._account is None:
            raise RuntimeError("CryptoMachine.start() was not called")
        return self._account

    @property
    def olm(self) -> OlmSessions:
        if self._olm is None:
            raise RuntimeError("CryptoMachine.start() was not called")
        return self._olm

    @property
    def outbound(self) -> OutboundGroupSessions:
        if self._outbound is None:
            raise RuntimeError("CryptoMachine.start() was not called")
        return self._outbound

    def identity_keys(self) -> dict[str, str]:
        return {"curve25519": self.account.curve25519, "ed25519": self.account.ed25519}

    async def top_up(
        self, server_count: int, unused_fallback_types: Collection[str] | None = None
    ) -> int:
        """Upload device keys (once), one-time keys up to the target and a fresh
        fallback key if the last was used; return the server's count afterwards."""
        async with self._locked():
            upload = await self.account.keys_to_upload(server_count, unused_fallback_types)
            if upload.empty:
                return server_count
            counts = await self.api.upload_keys(
                upload.device_keys, upload.one_time_keys, upload.fallback_keys
            )
            await self.account.mark_published()
        return int(counts.get(SIGNED_CURVE25519, 0))

    async def on_key_counts(
        self, pushed_count: int, unused_fallback_types: Collection[str] | None = None
    ) -> int:
        """Top up after the homeserver pushed this device's key counts; return the
        server's count afterwards.

        A pushed count may predate our last upload (it waits in the inbox), and
        keys made from a stale one pile up on the server past what the account
        keeps the secret halves of. So a low count is only a hint: the server's
        own count (an empty upload answers it) decides how many keys to make."""
        fallback_used = (
            unused_fallback_types is not None and SIGNED_CURVE25519 not in unused_fallback_types
        )
        if pushed_count >= self.account.one_time_key_target and not fallback_used:
            return pushed_count
        counts = await self.api.upload_keys(None, {}, {})
        return await self.top_up(int(counts.get(SIGNED_CURVE25519, 0)), unused_fallback_types)

    # -- devices ---------------------------------------------------------------

    async def on_device_lists(self, changed: Collection[str], left: Collection[str]) -> None:
        await self.tracker.mark_outdated(changed)
        await self.tracker.forget(left)

    async def refresh_devices(self, user_ids: Collection[str]) -> None:
        """``/keys/query`` the users whose device list is unknown or changed (here, or
        in another daemon on a shared store)."""
        await self.tracker.catch_up()
        outdated = self.tracker.outdated_among(user_ids)
        if outdated:
            await self.tracker.apply_query(await self.api.query_keys(outdated))

    # -- incoming --------------------------------------------------------------

    async def decrypt_to_device(self, sender: str, content: Mapping[str, Any]) -> OlmPayload:
        """Decrypt a to-device ``m.room.encrypted``; an ``m.room_key`` in it becomes an
        inbound Megolm session (only when its sender is the device the Olm session
        is with, which is what Olm proves)."""
        async with self._locked():
            payload = await self.olm.decrypt(sender, content)
        if payload.type == ROOM_KEY:
            await self.inbound.add_room_key(payload)
        return payload

    async def decrypt_room_event(
        self, room_id: str, event_id: str, sender: str, content: Mapping[str, Any]
    ) -> DecryptedRoomEvent:
        return await self.inbound.decrypt(room_id, event_id, sender, content)

    def sender_device(self, sender: str, sender_key: str) -> TrackedDevice | None:
        return self.tracker.device_by_curve25519(sender, sender_key)

    # -- outgoing --------------------------------------------------------------

    async def encrypt_room_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any],
        members: Collection[str],
        settings: RotationSettings | None = None,
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content for one event, after the room key reached
        every device of ``members`` (the room's joined users) that lacks it."""
        await self.refresh_devices(members)
        async with self._locked():
            session = await self._prepare_room(room_id, members, settings or RotationSettings())
            # Saved with its ratchet moved on before the lock is let go: the next
            # holder, here or in another daemon, goes on from the next index.
            return await self.outbound.encrypt(session, event_type, content)

    async def prepare_room(
        self, room_id: str, members: Collection[str], settings: RotationSettings
    ) -> OutboundSession:
        """The room's outbound session, rotated if a device that had its key is no
        longer in the room, and shared with every member device that lacks it."""
        await self.refresh_devices(members)
        async with self._locked():
            return await self._prepare_room(room_id, members, settings)

    async def _prepare_room(
        self, room_id: str, members: Collection[str], settings: RotationSettings
    ) -> OutboundSession:
        session = await self.outbound.current(room_id, settings)
        # The steady state: nothing changed since every device in the room had the
        # key. Checking the devices again costs per device, each message.
        check = _Settled(session, self.tracker.version, frozenset(members))
        settled = self._settled.get(room_id)
        if settled is not None and settled.holds_for(check):
            return session
        devices = self._room_devices(members)
        current = {(d.user_id, d.device_id, d.curve25519) for d in devices}
        if _shared_set(session) - current:
            await self.outbound.discard(room_id)
            session = await self.outbound.current(room_id, settings)
        shared = _shared_set(session)
        missing = [d for d in devices if (d.user_id, d.device_id, d.curve25519) not in shared]
        if missing:
            self._settled.pop(room_id, None)
            await self._share_room_key(session, missing)
        elif session is check.session:
            self._settled[room_id] = check
        return session

    def _room_devices(self, members: Collection[str]) -> list[TrackedDevice]:
        devices = []
        for user_id in sorted(set(members)):
            if self._bridge_users is not None and self._bridge_users(user_id):
                continue
            for device in self.tracker.devices(user_id).values():
                ours = user_id == self.user_id and device.device_id == self.device_id
                supports = (
                    OLM_ALGORITHM in device.algorithms and MEGOLM_ALGORITHM in device.algorithms
                )
                if not ours and supports:
                    devices.append(device)
        return devices

    async def share_room_key(self, session: OutboundSession, devices: list[TrackedDevice]) -> None:
        """Send ``m.room_key`` over Olm to ``devices``; the ones it reached are recorded
        in the session (the rest are tried again on the next message)."""
        async with self._locked():
            await self._share_room_key(session, devices)

    async def _share_room_key(self, session: OutboundSession, devices: list[TrackedDevice]) -> None:
        await self._ensure_olm_sessions(devices)
        room_key = self.outbound.room_key_content(session)
        messages: dict[str, dict[str, Any]] = {}
        reached: list[TrackedDevice] = []
        for device in devices:
            if not self.olm.has_session(device.curve25519):
                continue
            content = await self.olm.encrypt(device, ROOM_KEY, room_key)
            messages.setdefault(device.user_id, {})[device.device_id] = content
            reached.append(device)
        if messages:
            await self.api.send_to_device(ENCRYPTED, messages)
        for device in reached:
            session.shared_with.setdefault(device.user_id, {})[device.device_id] = device.curve25519
        await self.outbound.save(session)

    async def _ensure_olm_sessions(self, devices: list[TrackedDevice]) -> None:
        now = time.monotonic()
        wanted: dict[str, dict[str, str]] = {}
        for device in devices:
            failed_at = self._claim_failed.get((device.user_id, device.device_id))
            if self.olm.has_session(device.curve25519):
                continue
            if failed_at is not None and now - failed_at < CLAIM_RETRY:
                continue
            wanted.setdefault(device.user_id, {})[device.device_id] = SIGNED_CURVE25519
        if not wanted:
            return
        claimed = await self.api.claim_keys(wanted)
        for device in devices:
            if device.device_id not in wanted.get(device.user_id, {}):
                continue
            by_device = claimed.get(device.user_id)
            keys = by_device.get(device.device_id) if isinstance(by_device, Mapping) else None
            problem = (
                await self.olm.create_outbound(device, keys)
                if isinstance(keys, Mapping)
                else "no one-time key"
            )
            if problem is not None:
                _log.warning(
                    "no Olm session with %s %s: %s", device.user_id, device.device_id, problem
                )
                self._claim_failed[(device.user_id, device.device_id)] = now

    async def forget_room_session(self, room_id: str) -> None:
        """Rotate the room's session now (a member left, or the settings changed)."""
        async with self._locked():
            self._settled.pop(room_id, None)
            await self.outbound.discard(room_id)


@attrs.frozen
class _Settled:
    """What a room's check of its devices saw when every device had the key: the
    room's session, the tracker's version and the members."""

    session: OutboundSession = attrs.field(eq=False)
    devices_version: int
    members: frozenset[str]

    def holds_for(self, check: _Settled) -> bool:
        # The session itself, not an equal copy: one read again after another daemon
        # used the device is another object, and is checked again.
        return self.session is check.session and self == check


def _shared_set(session: OutboundSession) -> set[tuple[str, str, str]]:
    return {
        (user_id, device_id, curve)
        for user_id, devices in session.shared_with.items()
        for device_id, curve in devices.items()
    }
