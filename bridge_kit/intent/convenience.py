"""The calls of :class:`~bridge_kit.intent.Intent` that consult the room-state store:
``ensure_joined``, ``ensure_power_level`` and the profile setters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from bridge_kit.client.homeserver import quote_segment, structure_reply
from bridge_kit.errors import Banned, MatrixRequestError, NotFound
from bridge_kit.intent._actor import CLIENT, room_path
from bridge_kit.intent.state_store import RoomStateStore, membership_event
from bridge_kit.types.events import Event
from bridge_kit.types.room import AvatarUrlUpdate, DisplaynameUpdate
from bridge_kit.types.room_state import Member

if TYPE_CHECKING:
    from bridge_kit.intent import Intent

_STATE_ENDPOINT: Final = "/rooms/{roomId}/state/{eventType}/{stateKey}"


#: Join rules under which an invite is the way in for a user with no membership.
_INVITE_RULES: Final = frozenset({"invite", "knock", "restricted", "knock_restricted"})
#: Memberships a refused join may be "not invited" for (a kick leaves ``leave``).
_OUTSIDE: Final = frozenset({"leave", "knock"})


async def ensure_joined(
    intent: Intent, state: RoomStateStore[Intent] | None, room_id: str, unban: bool
) -> None:
    """Join unless the store says the intent is joined; on a 403, let the bot find out
    why (see :func:`let_in`) and, when an invite is the way in, invite and join again."""
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
        if not about_the_room(error) or bot.user_id == intent.user_id:
            raise  # not a matter of the room's rules, or nobody above the bot to let it in
        await let_in(bot, room_id, intent.user_id, error, unban=unban)
    await intent.join_room(room_id)


#: The errcodes of a 403 that may be about the room's membership rules: not invited, a
#: rule such as a server ACL (``M_FORBIDDEN``), or a ban (Synapse: ``M_BAD_STATE``,
#: "Cannot join user who was banned").
_ROOM_REFUSALS: Final = frozenset({"M_FORBIDDEN", "M_BAD_STATE"})


def about_the_room(refusal: MatrixRequestError) -> bool:
    """Whether a refused join may be about the room's membership rules (a 403 with
    one of :data:`_ROOM_REFUSALS`). A 403 with another errcode is about the user or
    the homeserver (a suspended account, ``M_USER_SUSPENDED``; the user limit,
    ``M_RESOURCE_LIMIT_EXCEEDED``; consent not given): no invite helps, so the bot
    neither looks nor invites."""
    return refusal.status == 403 and refusal.errcode in _ROOM_REFUSALS


async def let_in(
    bot: Intent, room_id: str, user_id: str, refusal: MatrixRequestError, *, unban: bool
) -> bool:
    """After ``user_id``'s join was refused with ``refusal`` (a 403), have the bot open
    the way when the refusal means "not invited"; raise otherwise. True when the bot
    invited it (False: only unbanned, in a room anyone may join).

    The bot reads the user's membership and the room's join rule:

    - banned: :class:`~bridge_kit.errors.Banned` (room moderators decide who is in),
      unless ``unban``; then the bot lifts the ban first;
    - no membership (or left, or knocking) in a room one enters by invite: the bot
      invites it;
    - anything else (an open room that still refused it: a server ACL, a spam
      checker; a pending invite): ``refusal`` itself, nothing changed.
    """
    member = await _member_event(bot, room_id, user_id, refusal)
    membership = None if member is None else member.content.get("membership")
    unbanned = False
    if member is not None and membership == "ban":
        if not unban:
            raise _banned(room_id, user_id, member, refusal) from refusal
        await bot.unban(room_id, user_id)
        unbanned = True
    elif membership is not None and membership not in _OUTSIDE:
        raise refusal
    if await _invite_only(bot, room_id, refusal):
        await bot.invite(room_id, user_id)
        return True
    if not unbanned:
        raise refusal  # an open room refused it: not a matter of an invite
    return False


async def _member_event(
    bot: Intent, room_id: str, user_id: str, refusal: MatrixRequestError
) -> Event | None:
    """``user_id``'s ``m.room.member`` event as the bot sees it; None for no membership.
    A bot that cannot see the room cannot let anyone in: then ``refusal`` stands."""
    path = f"{room_path(room_id)}/state/m.room.member/{quote_segment(user_id)}"
    try:
        reply = await bot._request(
            "GET", path, _STATE_ENDPOINT, body=None, query={"format": "event"}
        )
    except NotFound:
        return None
    except MatrixRequestError as error:
        raise refusal from error
    return structure_reply(reply, Event, "m.room.member")


async def _invite_only(bot: Intent, room_id: str, refusal: MatrixRequestError) -> bool:
    """Whether the room's join rule makes an invite the way in (no rule: ``invite``)."""
    try:
        rules = await bot.get_state_event(room_id, "m.room.join_rules")
    except NotFound:
        return True  # the spec's default join rule
    except MatrixRequestError as error:
        raise refusal from error
    return rules.get("join_rule") in _INVITE_RULES


def _banned(room_id: str, user_id: str, member: Event, refusal: MatrixRequestError) -> Banned:
    reason = member.content.get("reason")
    return Banned(
        room_id,
        user_id,
        banner=member.sender,
        reason=reason if isinstance(reason, str) and reason else None,
        body=refusal.body,
    )


async def ensure_power_level(
    intent: Intent, state: RoomStateStore[Intent] | None, room_id: str, user_id: str, level: int
) -> None:
    """Set ``user_id``'s level unless the (stored) power levels already give it ``level``;
    a room creator (room version 12+) is above every level: left alone."""
    if state is None:
        levels = await intent.get_power_levels(room_id)
    else:
        levels = await state.get_power_levels(room_id, intent)
    if user_id not in levels.creators and levels.user_level(user_id) != level:
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
