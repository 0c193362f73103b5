"""Encryption wired into an :class:`~bridge_kit.AppService`: the bot's device, the
inbox seams that decrypt to-device and room events before handlers see them, the
key-tracking subscribers, and the encryption of what intents send to encrypted rooms.

Which device messages come from: the bot's one device. Puppets send their
``m.room.encrypted`` events as themselves, encrypted with the Megolm session of
the bot's device (``device_id`` and ``sender_key`` in the content are the bot's).
Clients decrypt them, and show them as sent by a device that is not the sender's
own (Element: "encrypted by a device not verified by its owner"). Room keys from
users reach the bot's device only when the bot is joined to the room: it must be
a member of every encrypted room it bridges.

An event whose room key has not arrived is *parked* (see :mod:`bridge_kit.inbox.parking`):
its room's later events go on at once, and it is handled when the key comes
(after those later events), or becomes a dead letter "no room key" after
``key_wait`` seconds. An ``m.room_key.withheld`` for its session (the sender's
client refused to share the key, e.g. ``m.unverified``) makes it a dead letter at
once, naming the code and reason; a notice that comes first is remembered (the
last 10,000, in memory), so the event is buried as soon as it arrives.

Withheld notices travel in the clear (as the spec and today's clients send them),
so which device sent one cannot be proven. A notice is accepted only if it names
the curve25519 key of one of its sender's devices, and it only ends the wait of
that same sender's events: at worst a lying homeserver makes an event fail at
once instead of after ``key_wait``, as it could by dropping the key.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs

from bridge_kit.config import EncryptionConfig
from bridge_kit.crypto.account import SIGNED_CURVE25519
from bridge_kit.crypto.cross_signing import CrossSigning, CrossSigningKeys, stored_identity
from bridge_kit.crypto.impersonation import Impersonation
from bridge_kit.crypto.machine import ENCRYPTED, ROOM_KEY, CryptoMachine
from bridge_kit.crypto.megolm import RotationSettings
from bridge_kit.crypto.puppet_devices import (
    DEVICE_NAME,
    PuppetDevices,
    device_id_for,
    stored_device_id,
)
from bridge_kit.crypto.vault import CryptoVault, derive_pickle_key
from bridge_kit.crypto.withheld import WITHHELD_TYPES, WithheldNotice
from bridge_kit.errors import MatrixRequestError, NoRoomKey, UndecryptableEvent
from bridge_kit.ids import split_user_id
from bridge_kit.inbox.records import InboxItem, ItemKind
from bridge_kit.inbox.signals import NotReady, Park
from bridge_kit.intent import devices
from bridge_kit.types import DeviceListUpdate, Event, OtkCounts, ToDeviceEvent

if TYPE_CHECKING:
    from bridge_kit.inbox.handlers import HandlerRegistry
    from bridge_kit.inbox.lanes import Inbox
    from bridge_kit.intent import Intent
    from bridge_kit.intent.state_store import RoomStateStore
    from bridge_kit.registration import Registration
    from bridge_kit.store import Store

__all__ = ["BridgeEncryption", "EncryptionHost", "bot_identity_keys", "option_warnings"]

log = logging.getLogger(__name__)

#: Decrypted to-device events kept by inbox record id: Olm decrypts a message once,
#: and a retried item (a later handler failed) must not be decrypted again.
_DECRYPTED_CACHE: Final = 1024
#: Seconds between tries of an event whose room key has not arrived.
_KEY_POLL: Final = 1.0
#: Withheld sessions remembered for events that arrive after the notice.
_WITHHELD_KEPT: Final = 10_000

#: A room event's wait for its key: (room id, session id, sender).
_Waiting = tuple[str, str, str]


def _park_key(waiting: _Waiting) -> str:
    """The inbox park key of events waiting for one sender's Megolm session."""
    return "room_key:" + json.dumps(waiting, separators=(",", ":"))


class _IntentKeys:
    """The machine's homeserver calls, made by the bot as its device."""

    def __init__(self, device: Intent) -> None:
        self.device = device

    async def upload_keys(
        self,
        device_keys: dict[str, Any] | None,
        one_time_keys: dict[str, Any],
        fallback_keys: dict[str, Any],
    ) -> Mapping[str, int]:
        return await self.device.keys_upload(
            device_keys, one_time_keys or None, fallback_keys or None
        )

    # The replies as the homeserver sent them: the machine checks each device and key
    # on its own (signatures over exactly these objects), and leaves out a malformed
    # one, where the typed replies would refuse all for one (another server's) device.

    async def query_keys(self, user_ids: Collection[str]) -> Mapping[str, Any]:
        return await devices.keys_query_json(self.device, list(user_ids), None)

    async def claim_keys(self, wanted: Mapping[str, Mapping[str, str]]) -> Mapping[str, Any]:
        reply = await devices.keys_claim_json(self.device, wanted, None)
        claimed = reply.get("one_time_keys")
        return claimed if isinstance(claimed, Mapping) else {}

    async def send_to_device(
        self, event_type: str, messages: Mapping[str, Mapping[str, Any]]
    ) -> None:
        await self.device.send_to_device(event_type, messages)

    async def upload_signing_keys(self, body: Mapping[str, Any]) -> None:
        await self.device.upload_signing_keys(body)

    async def upload_signatures(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.device.upload_signatures(body)


def pickle_key_of(settings: EncryptionConfig, registration: Registration) -> bytes:
    """The key the crypto state is sealed with: from ``pickle_key``, else the as_token."""
    return derive_pickle_key(settings.pickle_key or registration.as_token)


async def bot_identity_keys(
    store: Store, bot_user_id: str, settings: EncryptionConfig, registration: Registration
) -> CrossSigningKeys | None:
    """The bot's cross-signing keys as stored (for the recovery-key export)."""
    vault = CryptoVault(store, bot_user_id, pickle_key_of(settings, registration))
    return await stored_identity(vault)


def option_warnings(settings: EncryptionConfig) -> list[str]:
    """What is wrong with a mix of the trust options, one line each (the start goes on)."""
    warnings = []
    if settings.msc4350 and settings.puppet_devices:
        warnings.append(
            "msc4350 is ignored with puppet_devices: puppets send from their own devices"
        )
    elif settings.msc4350 and not settings.self_sign:
        # MSC4350: an impersonated message counts as from a non-cross-signed device
        # when the impersonator's device is not cross-signed itself.
        warnings.append(
            "msc4350 without self_sign: clients that implement MSC4350 trust a puppet's "
            "message only when the bot's device is cross-signed; turn self_sign on"
        )
    return warnings


class EncryptionHost(Protocol):
    """What the encryption uses of the :class:`~bridge_kit.AppService` it runs in.

    A protocol, so the encryption is given its parts and never imports the app."""

    @property
    def registration(self) -> Registration: ...
    @property
    def bot(self) -> Intent: ...
    @property
    def store(self) -> Store: ...
    @property
    def inbox(self) -> Inbox: ...
    @property
    def handlers(self) -> HandlerRegistry: ...
    @property
    def room_state(self) -> RoomStateStore[Intent]: ...
    def intent(self, localpart: str) -> Intent: ...


class BridgeEncryption:
    """The crypto of one AppService; :meth:`start` makes the device and hooks it in."""

    def __init__(self, app: EncryptionHost, settings: EncryptionConfig) -> None:
        self.app = app
        self.settings = settings
        self._pickle_key = pickle_key_of(settings, app.registration)
        self._machine: CryptoMachine | None = None
        self._decrypted: OrderedDict[int, ToDeviceEvent] = OrderedDict()
        # Users outside the namespace that sent with our sessions (double puppets):
        # their events come back in transactions and must decrypt like the puppets'.
        self._other_senders: set[str] = set()
        self._withheld: OrderedDict[_Waiting, str] = OrderedDict()
        self._impersonation: Impersonation | None = None
        self.puppets = PuppetDevices(
            app.store, self._intent_of, self._make_machine, self._identity_of
        )

    @property
    def machine(self) -> CryptoMachine:
        if self._machine is None:
            raise RuntimeError("BridgeEncryption.start() was not called")
        return self._machine

    @property
    def device_id(self) -> str:
        return self.machine.device_id

    async def start(self) -> None:
        """Make (or find) the bot's device, load or create its keys, upload what the
        homeserver lacks, and add the inbox seams. Before the inbox starts."""
        bot = self.app.bot
        device_id = await device_id_for(self.app.store, bot.user_id)
        await bot.create_device(device_id, DEVICE_NAME)
        device = bot.with_device(device_id)
        self._machine = CryptoMachine(
            self.app.store,
            bot.user_id,
            device_id,
            self._pickle_key,
            _IntentKeys(device),
            ours=self._is_our_user,
            bridge_users=self._bridge_users(),
        )
        await self._machine.start()
        log.info(
            "encryption: the bot's device is %s (ed25519 %s)",
            device_id,
            self._machine.account.ed25519,
        )
        if self.settings.self_sign:
            await self._self_sign(self._machine, _IntentKeys(device))
        for warning in option_warnings(self.settings):
            log.warning("encryption: %s", warning)
        if self.settings.msc4350 and not self.settings.puppet_devices:
            self._impersonation = Impersonation(self.app.store, self._machine.account)
        inbox, handlers = self.app.inbox, self.app.handlers
        inbox.add_preprocessor(ItemKind.TO_DEVICE, self.decrypt_to_device)
        inbox.add_preprocessor(ItemKind.EVENT, self.decrypt_event)
        handlers.add_internal(ItemKind.TO_DEVICE, self.on_room_key, ROOM_KEY)
        for withheld in WITHHELD_TYPES:
            handlers.add_internal(ItemKind.TO_DEVICE, self.on_withheld, withheld)
        handlers.add_internal(ItemKind.EVENT, self.on_member, "m.room.member")
        handlers.add_internal(ItemKind.DEVICE_LISTS, self.on_device_lists)
        handlers.add_internal(ItemKind.OTK_COUNTS, self.on_otk_counts)

    def _identity_of(self, device: Intent, user_id: str) -> CrossSigning:
        """The cross-signing identity of one of our users, kept in the store."""
        vault = CryptoVault(self.app.store, user_id, self._pickle_key)
        return CrossSigning(vault, user_id, _IntentKeys(device))

    async def _self_sign(self, machine: CryptoMachine, api: _IntentKeys) -> None:
        identity = self._identity_of(api.device, machine.user_id)
        # Under the bot's crypto lock: two daemons starting at once would each make an
        # identity, and the homeserver keep only one of them.
        async with self.app.store.crypto_lock(machine.user_id):
            keys = await identity.ensure(machine.account.device_keys())
        log.info(
            "encryption: %s's device %s is signed by its cross-signing identity %s",
            machine.user_id, machine.device_id, keys.master_public,
        )  # fmt: skip

    def _intent_of(self, user_id: str) -> Intent:
        return self.app.intent(split_user_id(user_id)[0])

    async def _make_machine(self, device: Intent, device_id: str) -> CryptoMachine:
        """A started machine for a puppet's device, sharing the bot's tracked devices
        and inbound room keys."""
        machine = CryptoMachine(
            self.app.store,
            device.user_id,
            device_id,
            self._pickle_key,
            _IntentKeys(device),
            shared_with=self.machine,
            bridge_users=self._bridge_users(),
        )
        await machine.start()
        return machine

    def _bridge_users(self) -> Callable[[str], bool] | None:
        """With puppet devices (or MSC4350's keyless ones), the users whose devices are
        all the bridge's: no room key is shared with them (every device of the bridge
        reads the same keys)."""
        settings = self.settings
        return self._is_bridge_user if settings.puppet_devices or settings.msc4350 else None

    def _is_bridge_user(self, user_id: str) -> bool:
        if user_id == self.app.bot.user_id:
            return True
        return self.app.registration.is_user_in_namespace(user_id, exclusive_only=True)

    def _is_puppet(self, user_id: str) -> bool:
        return user_id != self.app.bot.user_id and self._is_bridge_user(user_id)

    def _speaks_from_own_device(self, user_id: str) -> bool:
        return self.settings.puppet_devices and self._is_puppet(user_id)

    @contextlib.asynccontextmanager
    async def _machine_for(
        self, user_id: str, device_id: str
    ) -> AsyncIterator[CryptoMachine | None]:
        """The machine of one of the bridge's devices (kept loaded for the block), or
        None if it is not one."""
        if self._is_ours(user_id, device_id):
            yield self.machine
        elif self._speaks_from_own_device(user_id):
            async with self.puppets.receiving(user_id, device_id) as machine:
                yield machine
        else:
            yield None

    async def _is_bridge_device(self, user_id: str, device_id: str) -> bool:
        """Whether a device is the bot's or a puppet's (without loading its machine)."""
        if self._is_ours(user_id, device_id):
            return True
        if not self._speaks_from_own_device(user_id):
            return False
        return await stored_device_id(self.app.store, user_id) == device_id

    def _is_our_user(self, user_id: str) -> bool:
        """The bot, the puppets and the double puppets that sent: the users that send
        with the bot's Megolm sessions."""
        registration = self.app.registration
        if user_id == self.machine.user_id or user_id in self._other_senders:
            return True
        return registration.is_user_in_namespace(user_id, exclusive_only=True)

    def _is_ours(self, user_id: str, device_id: str) -> bool:
        return user_id == self.machine.user_id and device_id == self.machine.device_id

    # -- the inbox seams ---------------------------------------------------------

    async def decrypt_to_device(self, event: ToDeviceEvent, record: InboxItem) -> ToDeviceEvent:
        """An Olm ``m.room.encrypted`` to one of the bridge's devices (the bot's, a
        puppet's) becomes the event inside it (a room key is taken in on the way, for
        the whole bridge); anything else passes unchanged."""
        if event.type != ENCRYPTED:
            return event
        async with self._machine_for(event.to_user_id, event.to_device_id) as machine:
            if machine is None:
                return event
            cached = self._decrypted.get(record.id)
            if cached is not None:
                return cached
            # Knowing the sender's devices lets the payload's ed25519 key be checked, and
            # the room events this key opens be attributed to their device.
            await machine.refresh_devices([event.sender])
            try:
                payload = await machine.decrypt_to_device(event.sender, event.content)
            except UndecryptableEvent as exc:
                raise NotReady(exc.reason, retry_after=_KEY_POLL, give_up_after=0) from None
        decrypted = attrs.evolve(event, type=payload.type, content=payload.content)
        self._decrypted[record.id] = decrypted
        if len(self._decrypted) > _DECRYPTED_CACHE:
            self._decrypted.popitem(last=False)
        return decrypted

    async def decrypt_event(self, event: Event, record: InboxItem) -> Event:
        """A room ``m.room.encrypted`` becomes the event inside it, marked ``encrypted``;
        without its room key it is parked up to ``key_wait`` seconds (its room goes on),
        then is a dead letter; with its key withheld it is a dead letter at once."""
        if event.type != ENCRYPTED or event.room_id is None or event.state_key is not None:
            return event
        try:
            decrypted = await self.machine.decrypt_room_event(
                event.room_id, event.event_id or "", event.sender or "", event.content
            )
        except NoRoomKey as exc:
            waiting = (exc.room_id, exc.session_id, event.sender or "")
            withheld = self._withheld.get(waiting)
            if withheld is not None:
                raise NotReady(withheld, retry_after=_KEY_POLL, give_up_after=0) from None
            raise Park(
                _park_key(waiting),
                give_up_after=self.settings.key_wait,
                reason=exc.reason,
                recheck=functools.partial(self._wait_is_over, waiting),
            ) from None
        except UndecryptableEvent as exc:
            raise NotReady(exc.reason, retry_after=_KEY_POLL, give_up_after=0) from None
        device = self.machine.sender_device(event.sender or "", decrypted.sender_key)
        return attrs.evolve(
            event,
            type=decrypted.type,
            content=decrypted.content,
            encrypted=True,
            sender_device=None if device is None else device.device_id,
        )

    async def _wait_is_over(self, waiting: _Waiting) -> bool:
        """Whether the key (or a withheld notice) for ``waiting`` came: checked once an
        event is parked, for one that came between the failed decryption and then."""
        return waiting in self._withheld or await self._has_key(waiting)

    async def _has_key(self, waiting: _Waiting) -> bool:
        room_id, session_id, sender = waiting
        return await self.machine.inbound.find(room_id, session_id, sender) is not None

    async def on_room_key(self, event: ToDeviceEvent) -> None:
        """A room key came (decrypted by :meth:`decrypt_to_device`, which stored it): the
        events parked waiting for it go back into their rooms' lanes."""
        room_id, session_id = event.content.get("room_id"), event.content.get("session_id")
        if not isinstance(room_id, str) or not isinstance(session_id, str):
            return
        waiting = (room_id, session_id, event.sender)
        if not await self._has_key(waiting):
            return  # not taken in (sent in the clear, or refused): nothing to wait for
        self._withheld.pop(waiting, None)
        await self.app.inbox.unpark(_park_key(waiting))

    async def on_withheld(self, event: ToDeviceEvent) -> None:
        """An ``m.room_key.withheld``: the events waiting for that session's key become
        dead letters naming the code and reason, now and when they arrive later."""
        if not await self._is_bridge_device(event.to_user_id, event.to_device_id):
            return
        notice = WithheldNotice.from_content(event.content)
        if notice is None:
            return  # not about a room's session (m.no_olm), or malformed
        await self.machine.refresh_devices([event.sender])
        if self.machine.sender_device(event.sender, notice.sender_key) is None:
            log.warning(
                "ignored a room key withheld notice from %s: it names a device key that "
                "is not one of theirs", event.sender,
            )  # fmt: skip
            return
        waiting = (notice.room_id, notice.session_id, event.sender)
        if await self._has_key(waiting):
            return  # the key came already: a late notice changes nothing
        error = notice.describe()
        self._withheld[waiting] = error
        self._withheld.move_to_end(waiting)
        if len(self._withheld) > _WITHHELD_KEPT:
            self._withheld.popitem(last=False)
        await self.app.inbox.give_up_parked(_park_key(waiting), error)

    async def on_member(self, event: Event) -> None:
        """A puppet joined an encrypted room: people's clients share room keys with the
        room's devices, so the bridge needs one there. With ``puppet_devices`` the
        puppet's own device is made now (before anyone sends); without, the puppet
        brings the bot in (invite and join)."""
        user_id, room_id = event.state_key, event.room_id
        if user_id is None or room_id is None or event.content.get("membership") != "join":
            return
        if user_id == self.app.bot.user_id or not self._is_bridge_user(user_id):
            return
        puppet = self._intent_of(user_id)
        if not await self.app.room_state.is_encrypted(room_id, puppet):
            return
        if self.settings.puppet_devices:
            await self.puppets.for_sending(user_id)
        else:
            await self._bring_the_bot(room_id, puppet)

    async def _bring_the_bot(self, room_id: str, puppet: Intent) -> None:
        bot = self.app.bot
        if await self.app.room_state.is_joined(room_id, bot.user_id, puppet):
            return
        with contextlib.suppress(MatrixRequestError):  # invited already, or the bot may join
            await puppet.invite(room_id, bot.user_id)
        try:
            await bot.join_room(room_id)
        except MatrixRequestError as exc:
            # Not for retrying: the room's power levels decide, and they rarely change.
            log.warning(
                "encryption: %s joined the encrypted room %s, but could not bring the bot "
                "in (%s); the bridge gets no room keys there", puppet.user_id, room_id, exc,
            )  # fmt: skip
            return
        log.info(
            "encryption: %s brought the bot into the encrypted room %s", puppet.user_id, room_id
        )

    async def on_device_lists(self, update: DeviceListUpdate) -> None:
        await self.machine.on_device_lists(update.changed, update.left)

    async def on_otk_counts(self, counts: OtkCounts) -> None:
        async with self._machine_for(counts.user_id, counts.device_id) as machine:
            if machine is not None:
                count = counts.counts.get(SIGNED_CURVE25519, 0)
                await machine.on_key_counts(count, counts.unused_fallback_key_types)

    # -- outgoing ----------------------------------------------------------------

    async def outgoing(
        self, intent: Intent, room_id: str, event_type: str, content: Any
    ) -> tuple[str, Any]:
        """What ``intent`` sends to ``room_id``: encrypted when the room is (the room key
        shared first with every device of its joined members), else as it is."""
        room_state = self.app.room_state
        if event_type == ENCRYPTED or not await room_state.is_encrypted(room_id, intent):
            return event_type, content
        if not self._is_our_user(intent.user_id):
            self._other_senders.add(intent.user_id)
        members = await room_state.get_members(room_id, intent)
        setting = await self.app.store.state_event(room_id, "m.room.encryption")
        rotation = RotationSettings.from_content(None if setting is None else setting.content)
        if self._speaks_from_own_device(intent.user_id):
            async with self.puppets.sending(intent.user_id) as machine:
                encrypted = await machine.encrypt_room_event(
                    room_id, event_type, content, list(members), rotation
                )
            return ENCRYPTED, encrypted
        if self._impersonation is not None and self._is_puppet(intent.user_id):
            await self._impersonation.ensure(intent.with_device(None))
        encrypted = await self.machine.encrypt_room_event(
            room_id, event_type, content, list(members), rotation
        )
        return ENCRYPTED, encrypted
