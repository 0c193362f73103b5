"""What the bridge knows of its rooms' state, answered from the store: ``app.room_state``.

:class:`RoomStateStore` reads memberships, power levels and encryption from the
store (:meth:`~bridge_kit.store.RoomRecordStore.apply_state` and friends), with no HTTP.
The store is fed from two places:

- every state event of every accepted transaction. The AppService runs
  :meth:`RoomStateStore.observe_event` as the first handler of each tracked state
  event, from the inbox: the inbox keeps a room's events in order (one lane per
  room), so the store changes in the order the homeserver sent the events, before
  the bridge's own handlers see them, and a store failure retries the event like
  a failing handler would. (Done at accept time instead, one slow write would
  hold up the acknowledgement of the whole transaction.)
- the intents' own successful joins, leaves, invites, kicks, bans and state
  changes (:meth:`RoomStateStore.observe`, called by :class:`~bridge_kit.intent.Intent`).
  Those are recorded with this process's clock as their timestamp: the change
  happened when the homeserver answered.

A miss (a room the store has not seen whole) asks the homeserver once, for the
room's whole state (``GET /rooms/{roomId}/state`` as the bot, or as the intent
given), and stores it: then the room is known and later misses are answers.
Nothing is cached only in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

from bridge_kit.store import Store
from bridge_kit.store.state_records import MEMBER, TRACKED
from bridge_kit.types.events import Event
from bridge_kit.types.room_state import Member, PowerLevels

__all__ = ["STATE_TYPES", "RoomStateStore", "StateAsker"]

#: The state event types the store keeps (the others are not fed to it).
STATE_TYPES: Final = frozenset({MEMBER, *TRACKED})


class StateAsker(Protocol):
    """What the state store asks of a user on a miss (an :class:`~bridge_kit.intent.Intent`).

    A protocol, so the state store stays below the intents that feed it."""

    async def get_state(self, room_id: str) -> list[Event]: ...

    async def get_power_levels(self, room_id: str) -> PowerLevels: ...


AskerT = TypeVar("AskerT", bound=StateAsker)


def now_ms() -> int:
    """This process's clock in milliseconds, the timestamp of the intents' own changes."""
    return int(time.time() * 1000)


class RoomStateStore(Generic[AskerT]):
    """Room membership, power levels and encryption, from the store.

    ``bot`` returns the intent that asks the homeserver on a miss (the
    appservice's bot, unless a call names another ``asker``, e.g. a puppet that
    is in the room).
    """

    def __init__(self, store: Store, bot: Callable[[], AskerT]) -> None:
        self.store = store
        self._bot = bot

    def bot(self) -> AskerT:
        """The appservice's bot, which invites and unbans for ``ensure_joined``."""
        return self._bot()

    # -- reads ---------------------------------------------------------------

    async def is_joined(self, room_id: str, user_id: str, asker: StateAsker | None = None) -> bool:
        """Whether ``user_id`` is joined to the room (one homeserver read on a miss)."""
        member = await self.store.membership(room_id, user_id)
        if member is None and await self._load(room_id, asker):
            member = await self.store.membership(room_id, user_id)
        return member is not None and member.membership == "join"

    async def get_members(self, room_id: str, asker: StateAsker | None = None) -> dict[str, Member]:
        """The room's joined members, by user ID, with display name and avatar."""
        await self._load(room_id, asker)
        return await self.store.members(room_id)

    async def get_power_levels(self, room_id: str, asker: StateAsker | None = None) -> PowerLevels:
        """The room's power levels; :class:`~bridge_kit.errors.NotFound` if it has none."""
        levels = await self.store.power_levels(room_id)
        if levels is None and await self._load(room_id, asker):
            levels = await self.store.power_levels(room_id)
        if levels is None:  # no (well-formed) event: the homeserver's answer is the error
            return await (asker or self.bot()).get_power_levels(room_id)
        return levels

    async def is_encrypted(self, room_id: str, asker: StateAsker | None = None) -> bool:
        """Whether the room has ``m.room.encryption``."""
        encrypted = await self.store.is_encrypted(room_id)
        if encrypted is None:
            await self._load(room_id, asker)
            encrypted = await self.store.is_encrypted(room_id)
        return bool(encrypted)

    async def _load(self, room_id: str, asker: StateAsker | None) -> bool:
        """Fetch and store the room's whole state unless the store knows it; True if fetched."""
        if await self.store.room_state_known(room_id):
            return False
        events = await (asker or self.bot()).get_state(room_id)
        await self.store.apply_state(room_id, events, complete=True)
        return True

    # -- feeding -------------------------------------------------------------

    async def observe_event(self, event: Event) -> None:
        """Store a state event received in a transaction (the AppService's first handler)."""
        if event.state_key is not None and event.room_id is not None:
            await self.store.apply_state(event.room_id, [event])

    async def observe(self, room_id: str, events: Iterable[Event]) -> None:
        """Store state an intent just changed (events built by the intent)."""
        await self.store.apply_state(room_id, events)


def membership_event(
    room_id: str, sender: str, user_id: str, membership: str, profile: Member | None = None
) -> Event:
    """The ``m.room.member`` event an intent's successful membership change made."""
    content: dict[str, str] = {"membership": membership}
    if profile is not None and profile.displayname is not None:
        content["displayname"] = profile.displayname
    if profile is not None and profile.avatar_url is not None:
        content["avatar_url"] = profile.avatar_url
    return Event(
        type=MEMBER,
        content=content,
        room_id=room_id,
        sender=sender,
        state_key=user_id,
        origin_server_ts=now_ms(),
    )


def own_state_event(
    sender: str, room_id: str, event_type: str, content: dict[str, Any], state_key: str
) -> Event:
    """The state event an intent's successful ``send_state`` made."""
    return Event(
        type=event_type,
        content=content,
        room_id=room_id,
        sender=sender,
        state_key=state_key,
        origin_server_ts=now_ms(),
    )
