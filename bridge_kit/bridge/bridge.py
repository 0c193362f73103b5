"""The bridge: an :class:`~bridge_kit.AppService` and a network connector, tied together.

::

    config = Config.load("config.yaml", sections=MyConnector.config_sections)
    bridge = Bridge(AppService(config), MyConnector())
    raise SystemExit(bridge.run())

or ``async with bridge:`` (tests, or a program with its own loop).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiohttp import web

from bridge_kit.app.runner import StopSignals, run_app, serve_until_stopped
from bridge_kit.app.service import AppService
from bridge_kit.bridge.builtin_commands import add_builtin_commands
from bridge_kit.bridge.connector import NetworkConnector
from bridge_kit.bridge.core import RELAY_OFF, BridgeCore, remote_lane
from bridge_kit.bridge.events import Sender
from bridge_kit.bridge.matrix import MatrixHandler
from bridge_kit.bridge.permissions import Level
from bridge_kit.bridge.provisioning import PREFIX as PROVISIONING_PREFIX
from bridge_kit.bridge.records import PortalRecord
from bridge_kit.bridge.remote import RemoteHandler
from bridge_kit.bridge.status import StateEvent
from bridge_kit.errors import BridgeKitError, MatrixRequestError, UnknownChat
from bridge_kit.inbox.items import RemoteItem
from bridge_kit.inbox.records import ItemKind
from bridge_kit.logs import configure_logging
from bridge_kit.server.appservice_api import serve_app
from bridge_kit.types import Event

__all__ = ["RELAY_OFF", "Bridge", "remote_lane"]

log = logging.getLogger(__name__)

#: Seconds an alias query waits for its portal's room (Synapse gives up at 60 s).
ALIAS_QUERY_WAIT = 20.0


class Bridge(BridgeCore):
    """The bridge layer on ``app`` for the network ``connector``.

    Build it before the app starts: the constructor registers the app's handlers
    (Matrix events, remote events, the alias and user queries) and the built-in
    commands. :meth:`start` starts the app, then loads and connects the stored
    logins, then the connector.
    """

    def __init__(self, app: AppService, connector: NetworkConnector) -> None:
        super().__init__(app, connector)
        self.matrix = MatrixHandler(self)
        self.remote = RemoteHandler(app, self.portals, self.ghosts)
        self.portals.on_created.append(self._backfill_new_room)
        app.on_event("m.room.message")(self.matrix.on_message)
        app.on_event("m.reaction")(self.matrix.on_reaction)
        app.on_event("m.room.redaction")(self.matrix.on_redaction)
        app.on_event("m.room.member")(self.on_member)
        app.on_ephemeral("m.typing")(self.matrix.on_typing)
        app.handlers.decorator(ItemKind.REMOTE)(self.on_remote)
        app.on_alias_query(self.on_alias_query)
        app.on_user_query(self.on_user_query)
        add_builtin_commands(self.commands)
        self._connector_started = False
        self._provisioning_runner: web.AppRunner | None = None

    # -- handlers -----------------------------------------------------------------------

    async def on_remote(self, item: RemoteItem) -> None:
        """A remote event from a portal's lane."""
        await self.remote(item)

    async def on_member(self, event: Event) -> None:
        """The bot joins a room it is invited to (a DM with it is a management room);
        a ghost invited by a Matrix user joins if the connector makes the room a portal.
        An invite from a user who may not use the bridge (below ``relay``) is
        rejected; whether a ghost's invite makes a portal is the connector's call."""
        bot = self.app.bot.user_id
        invited, room_id, inviter = event.state_key, event.room_id, event.sender
        if invited is None or room_id is None or inviter is None:
            return
        if event.content.get("membership") != "invite" or self.ghosts.is_ghost(inviter):
            return
        if invited != bot:
            if not self.ghosts.is_ghost(invited):
                return
            if self.permissions.allows(inviter, Level.RELAY):
                await self._ghost_invited(room_id, inviter, invited)
            else:
                await self._refuse_invite(room_id, inviter, invited)
            return
        if not self.permissions.allows(inviter, Level.RELAY):
            await self._refuse_invite(room_id, inviter, bot)
            return
        try:
            await self.app.bot.join_room(room_id)
        except MatrixRequestError as exc:
            if not 400 <= exc.status < 500 or exc.status == 429:
                raise
            log.warning("could not join %s on %s's invite: %s", room_id, inviter, exc)
            return
        if event.content.get("is_direct"):
            name = self.connector.display_name
            await self.app.bot.send_notice(
                room_id,
                f"This is your room for the {name} bridge. Send `help` for the commands.",
            )

    async def _refuse_invite(self, room_id: str, inviter: str, invited: str) -> None:
        """Reject an invite from a user whose level does not let them use the bridge."""
        log.info(
            "%s may not use the bridge: %s rejects the invite to %s", inviter, invited, room_id
        )
        intent = self.app.bot
        if invited != intent.user_id:
            remote_id = self.connector.ghost_for_localpart(invited[1:].partition(":")[0])
            if remote_id is None:
                return
            intent = self.ghosts.intent(remote_id)
        try:
            await intent.leave_room(room_id, "You may not use this bridge.")
        except MatrixRequestError as exc:
            if not 400 <= exc.status < 500 or exc.status == 429:
                raise
            log.warning("%s could not reject the invite to %s: %s", invited, room_id, exc)

    async def _ghost_invited(self, room_id: str, inviter: str, user_id: str) -> None:
        remote_id = self.connector.ghost_for_localpart(user_id[1:].partition(":")[0])
        if remote_id is None:
            return
        key = await self.connector.portal_for_invite(room_id, inviter, remote_id)
        if key is None:
            return
        won = await self.app.store.claim_portal_room(key, room_id)
        if won != room_id:
            log.info(
                "%s invited %s to %s, but portal %s is %s", inviter, user_id, room_id, key, won
            )
            return
        await self.ghosts.ensure([Sender(remote_id)])
        try:
            await self.ghosts.intent(remote_id).join_room(room_id)
        except MatrixRequestError as exc:
            if not 400 <= exc.status < 500 or exc.status == 429:
                raise
            log.warning("%s could not join %s: %s", user_id, room_id, exc)

    async def _backfill_new_room(self, portal: PortalRecord) -> None:
        await self.backfill.new_room(portal, self.remote.message)

    async def on_alias_query(self, alias: str) -> bool:
        """A portal's alias: create the portal's room (with that alias) if the chat exists.

        A query while this process makes that room (a user joins the alias as the
        bridge creates it) waits for the room, a while at most: the bridge never
        asks about its own alias, but should the homeserver ask during our
        ``createRoom``, a bounded wait turns a deadlock into a slow "no".
        """
        localpart = alias[1:].partition(":")[0]
        key = self.connector.portal_for_alias(localpart)
        if key is None:
            return False
        try:
            async with asyncio.timeout(ALIAS_QUERY_WAIT):
                info = await self.connector.get_chat_info(key)
                if info is None:
                    return False
                await self.portals.ensure_room(key, info, members_later=True)
        except UnknownChat:
            return False
        except TimeoutError:
            log.warning("the room of %s took more than %g s: answered no", alias, ALIAS_QUERY_WAIT)
            return False
        except BridgeKitError as exc:
            log.warning("could not make the room of %s: %s", alias, exc)
            return False
        return True

    async def on_user_query(self, user_id: str) -> bool:
        """A ghost's user ID: it exists if the connector knows the remote user."""
        localpart = user_id[1:].partition(":")[0]
        remote_id = self.connector.ghost_for_localpart(localpart)
        if remote_id is None:
            return False
        return await self.connector.get_user_info(remote_id) is not None

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the app, load and connect the stored logins, start the connector."""
        await self.app.start()
        try:
            await self.status.start()
            await self._listen_for_provisioning()
            name = self.config.bridge.bot_displayname
            if name:
                await self.app.bot.set_displayname(name)
            await self.logins.load_all()
            await self.connector.start(self)
            self._connector_started = True
            await self.status.set_bridge(StateEvent.RUNNING)
            self.reachability.start()
        except BaseException:
            await self._stop_parts()
            await self.app.stop()
            raise

    async def _listen_for_provisioning(self) -> None:
        """The provisioning API on a port of its own, when ``bridge.provisioning_port`` says."""
        section = self.config.bridge
        if not section.provisioning or section.provisioning_port is None:
            return
        root = web.Application()
        root.add_subapp(PROVISIONING_PREFIX, self.provisioning.app())
        host = self.config.appservice.host
        self._provisioning_runner = await serve_app(root, host, section.provisioning_port)
        log.info(
            "provisioning API on http://%s:%d%s",
            host,
            section.provisioning_port,
            PROVISIONING_PREFIX,
        )

    async def stop(self) -> None:
        """Stop the connector, disconnect the logins, stop the app."""
        try:
            await self._stop_parts()
        finally:
            await self.app.stop()

    async def _stop_parts(self) -> None:
        try:
            if self._connector_started:
                self._connector_started = False
                await self.connector.stop()
        finally:
            await self.reachability.close()
            await self.backfill.close()
            await self.login_sessions.close()
            await self.portals.close()
            await self.logins.close_all()
            await self.status.close()
            if self._provisioning_runner is not None:
                runner, self._provisioning_runner = self._provisioning_runner, None
                await runner.cleanup()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, like :func:`~bridge_kit.run_app`; the exit status
        (a :class:`~bridge_kit.errors.BridgeKitError` is one ``error:`` line and 2)."""
        if not logging.getLogger().handlers:
            configure_logging(self.config.logging.level, self.config.logging.format)
        return run_app(self._serve)

    async def _serve(self, stop: StopSignals) -> int:
        def ready() -> None:
            name, bot = self.connector.display_name, self.app.bot.user_id
            log.info("%s bridge is ready as %s", name, bot)

        return await serve_until_stopped(self.start, self.stop, stop, ready)
