"""The built-in commands: ``login``, ``logout``, ``logins``, ``set-relay``,
``unset-relay`` and ``sync`` (``help`` comes with the command framework)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from bridge_kit.bridge.commands import CommandContext, CommandRegistry, code
from bridge_kit.bridge.core import RELAY_OFF, BridgeCore
from bridge_kit.bridge.login_flows import LoginFlow, OffersLoginFlows, StepType, login_with_args
from bridge_kit.bridge.logins import Login
from bridge_kit.bridge.permissions import Level
from bridge_kit.bridge.records import PortalRecord
from bridge_kit.errors import CommandError, MatrixRequestError

__all__ = ["add_builtin_commands"]

log = logging.getLogger(__name__)

Context = CommandContext[BridgeCore]


def add_builtin_commands(registry: CommandRegistry[BridgeCore]) -> None:
    """Add the built-in commands to ``registry``."""
    network = "the remote network"
    registry.command("login", help=f"Log in to {network}", usage="<arguments>")(login)
    registry.command("logout", help="Log out", usage="[login]")(logout)
    registry.command("logins", help="List your logins and their states")(logins)
    registry.command(
        "set-relay", help="Relay this room's users without a login through your login"
    )(set_relay)
    registry.command("unset-relay", help="Stop relaying in this room")(unset_relay)
    registry.command(
        "sync", help="Fetch this room's chat info and members again", level=Level.ADMIN
    )(sync)


async def login(ctx: Context) -> None:
    bridge = ctx.state
    if not ctx.management:
        await _refuse_login_here(ctx)
        return
    room = ctx.room_id
    if isinstance(bridge.connector, OffersLoginFlows):
        await _login_by_flow(ctx, bridge.connector.login_flows(), room)
        return
    info = await bridge.connector.login(ctx.sender, ctx.args)
    await bridge.add_login(ctx.sender, info, management_room=room)
    await ctx.reply(f"Logging in as **{info.remote_name or info.id}**…")


async def _login_by_flow(ctx: Context, flows: Sequence[LoginFlow], room: str | None) -> None:
    """``login [flow] <values...>``: the flow's typed fields from the arguments, in order
    (the first flow when the first argument names none)."""
    if not flows:
        raise CommandError("This bridge offers no way to log in.")
    args = list(ctx.args)
    flow = next((f for f in flows if args and f.id == args[0]), None)
    if flow is not None:
        args = args[1:]
    else:
        flow = flows[0]
    step = await login_with_args(
        ctx.state.login_sessions, ctx.sender, flow.id, args, management_room=room
    )
    if step.type is not StepType.COMPLETE:
        hint = f" ({step.instructions})" if step.instructions else ""
        raise CommandError(
            f"The {flow.name} login needs more than a command can give{hint}: "
            "use a client of the provisioning API."
        )
    await ctx.reply(f"Logging in as **{step.login_id}**…")


async def logout(ctx: Context) -> None:
    ctx.require_args(0, 1)
    bridge = ctx.state
    found = _own_logins(ctx)
    if ctx.args:
        found = [login for login in found if login.id == ctx.args[0]]
        if not found:
            raise CommandError(f"You have no login {code(ctx.args[0])}.")
    elif len(found) > 1:
        raise ctx.usage_error("You have several logins: name one")
    await bridge.logins.remove(found[0])
    await ctx.reply(f"Logged out of **{found[0].remote_name or found[0].id}**.")


async def logins(ctx: Context) -> None:
    found = ctx.state.logins.of_user(ctx.sender)
    if not found:
        await ctx.reply("You have no logins. Send `login` to add one.")
        return
    lines = [f"* `{login.id}` ({login.remote_name}): {_state(login)}" for login in found]
    await ctx.reply("\n".join(lines))


async def set_relay(ctx: Context) -> None:
    portal = await _portal(ctx)
    own = _own_logins(ctx)
    if not own:
        raise CommandError("You need a login to relay through: send `login` first.")
    if portal.relay_login:  # another login relays here (not: the default, or off)
        _check_relay_owner(ctx, portal, own, "replace the relay")
    await ctx.state.set_relay(portal.key, own[0].id)
    await ctx.reply(f"Messages of users without a login are relayed through `{own[0].id}`.")


async def unset_relay(ctx: Context) -> None:
    portal = await _portal(ctx)
    _check_relay_owner(ctx, portal, ctx.state.logins.of_user(ctx.sender), "turn off the relay")
    await ctx.state.set_relay(portal.key, RELAY_OFF)
    await ctx.reply("Relaying is off in this room.")


async def sync(ctx: Context) -> None:
    bridge = ctx.state
    portal = await _portal(ctx)
    info = await bridge.connector.get_chat_info(portal.key)
    if info is None:
        raise CommandError("The remote network does not know this chat any more.")
    await bridge.portals.sync_info(portal, info)
    await bridge.portals.sync_members(portal, info.members)
    await ctx.reply(f"Synced the name, topic and {len(info.members)} members.")


def _check_relay_owner(ctx: Context, portal: PortalRecord, own: Sequence[Login], what: str) -> None:
    """Refuse a user who is not a bridge admin to change a relay that is not theirs
    (another user's, turned off, or the bridge's default): everyone's messages there
    would go out through their account, or not at all."""
    if ctx.level >= Level.ADMIN:
        return
    if portal.relay_login and portal.relay_login in {login.id for login in own}:
        return
    raise CommandError(f"Only a bridge admin may {what} that another user or the bridge set here.")


async def _refuse_login_here(ctx: Context) -> None:
    """A login typed in a shared room: everyone there can read its credentials."""
    if ctx.args and ctx.event_id is not None:
        try:
            await ctx.state.app.bot.redact(
                ctx.room_id, ctx.event_id, "credentials in a shared room"
            )
        except MatrixRequestError as exc:
            log.warning("could not redact a login typed in %s: %s", ctx.room_id, exc)
    raise CommandError(
        "Log in in your management room (a DM with the bridge bot), not here: everyone "
        "in this room can read what you type. Change any password you typed here."
    )


def _own_logins(ctx: Context) -> list[Login]:
    found = ctx.state.logins.of_user(ctx.sender)
    if not found:
        raise CommandError("You are not logged in.")
    return found


async def _portal(ctx: Context) -> PortalRecord:
    portal = await ctx.state.portals.by_room(ctx.room_id)
    if portal is None:
        raise CommandError(f"`{ctx.command.name}` works in a bridged room only.")
    return portal


def _state(login: Login) -> str:
    return login.state.name.lower().replace("_", " ")
