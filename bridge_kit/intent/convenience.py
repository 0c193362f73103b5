"""The calls of :class:`~bridge_kit.intent.Intent` that consult the room-state store:
``ensure_joined``, ``ensure_power_level`` and the profile setters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge_kit.client.homeserver import quote_segment
from bridge_kit.errors import MatrixRequestError
from bridge_kit.intent._actor import CLIENT
from bridge_kit.intent.state_store import RoomStateStore, membership_event
from bridge_kit.types.room import AvatarUrlUpdate, DisplaynameUpdate
from bridge_kit.types.room_state import Member

if TYPE_CHECKING:
    from bridge_kit.intent import Intent


async def ensure_joined(intent: Intent, state: RoomStateStore[Intent] | None, room_id: str) -> None:
    """Join unless the store says the intent is joined; on Forbidden, have the bot
    invite it (unbanning it first when it is banned) and join again."""
    if state is None:  # an Intent built by hand: no store, no bot
        await intent.join_room(room_id)
        return
    stored = await state.store.membership(room_id, intent.user_id)
    if stored is not None and stored.membership == "join":
        return  # the whole point: no request at all
    try:
        await intent.join_room(room_id)
        return
    except MatrixRequestError as error:
        bot = state.bot()
        if not _refused(error) or bot.user_id == intent.user_id:
            raise  # not a matter of permission, or nobody above the bot to let it in
        await _let_in(bot, room_id, intent.user_id, stored)
    await intent.join_room(room_id)


def _refused(error: MatrixRequestError) -> bool:
    """A 403: M_FORBIDDEN (not invited), or Synapse's M_BAD_STATE for a banned user."""
    return error.status == 403


async def _let_in(bot: Intent, room_id: str, user_id: str, stored: Member | None) -> None:
    """The bot invites ``user_id``, unbanning it first if it is (or turns out to be) banned."""
    if stored is not None and stored.membership == "ban":
        await bot.unban(room_id, user_id)
        await bot.invite(room_id, user_id)
        return
    try:
        await bot.invite(room_id, user_id)
    except MatrixRequestError as error:
        if not _refused(error):
            raise
        # A ban the store did not know of also refuses the invite: lift it, try again.
        await bot.unban(room_id, user_id)
        await bot.invite(room_id, user_id)


async def ensure_power_level(
    intent: Intent, state: RoomStateStore[Intent] | None, room_id: str, user_id: str, level: int
) -> None:
    """Set ``user_id``'s level unless the (stored) power levels already give it ``level``."""
    if state is None:
        levels = await intent.get_power_levels(room_id)
    else:
        levels = await state.get_power_levels(room_id, intent)
    if levels.user_level(user_id) != level:
        await intent.set_power_level(room_id, user_id, level)


async def set_profile(
    intent: Intent, field: str, update: DisplaynameUpdate | AvatarUrlUpdate
) -> None:
    """Set the intent's ``displayname`` or ``avatar_url`` unless the store says it is set."""
    value = update.displayname if isinstance(update, DisplaynameUpdate) else update.avatar_url
    if await profile_is(intent, field, value):
        return
    await intent._request(
        "PUT",
        f"{CLIENT}/profile/{quote_segment(intent.user_id)}/{field}",
        f"/profile/{{userId}}/{field}",
        body=update,
    )
    await profile_set(intent, field, value)


async def profile_is(intent: Intent, field: str, value: str | None) -> bool:
    """Whether the store says this bridge already set the intent's ``field`` to ``value``."""
    if intent.room_state is None:
        return False
    profile = await intent.room_state.store.profile(intent.user_id)
    return field in profile and profile[field] == value


async def profile_set(intent: Intent, field: str, value: str | None) -> None:
    """Record the profile value the intent just set."""
    if intent.room_state is not None:
        await intent.room_state.store.set_profile(intent.user_id, field, value)


async def own_profile(state: RoomStateStore[Intent], user_id: str) -> Member:
    """The profile this bridge set for ``user_id``, for the member events of its joins."""
    profile = await state.store.profile(user_id)
    return Member(profile.get("displayname"), profile.get("avatar_url"))


async def observe_membership(intent: Intent, room_id: str, user_id: str, membership: str) -> None:
    """Tell the store of a membership change ``intent`` just made; its own joins carry
    the profile it set, which the homeserver puts in the member event too."""
    state = intent.room_state
    if state is None:
        return
    own = await own_profile(state, user_id) if user_id == intent.user_id else None
    event = membership_event(room_id, intent.user_id, user_id, membership, own)
    await state.observe(room_id, [event])
