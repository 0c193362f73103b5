"""The bridge's parts and what connectors and commands call: :class:`BridgeCore`.

:class:`~bridge_kit.bridge.bridge.Bridge` adds the life cycle and the handlers on
top; the handlers and the built-in commands get this, so they never import the
module that imports them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence

import attrs

from bridge_kit._json import json_text
from bridge_kit.app.service import AppService
from bridge_kit.bridge.backfill import Backfill
from bridge_kit.bridge.commands import CommandRegistry, Reply, notice_reply
from bridge_kit.bridge.connector import LoginInfo, NetworkConnector
from bridge_kit.bridge.events import RemoteEvent, Sender, event_payload
from bridge_kit.bridge.ghosts import Ghosts
from bridge_kit.bridge.login_flows import LoginProcess, LoginSessions, OffersLoginFlows
from bridge_kit.bridge.logins import MANAGEMENT_ROOM, Login, Logins
from bridge_kit.bridge.permissions import Permissions
from bridge_kit.bridge.portals import Portals
from bridge_kit.bridge.provisioning import PREFIX as PROVISIONING_PREFIX
from bridge_kit.bridge.provisioning import AppHost, ProvisioningAPI, ProvisioningSettings
from bridge_kit.bridge.reachability import ReachabilityWatch
from bridge_kit.bridge.records import LoginRecord, LoginState, PortalKey, PortalRecord
from bridge_kit.bridge.send_status import NoticeMode, SendStatusReporter
from bridge_kit.bridge.status import StatusReporter
from bridge_kit.config import Config
from bridge_kit.errors import MatrixRequestError
from bridge_kit.inbox.records import ItemKind, NewInboxItem

__all__ = ["RELAY_OFF", "BridgeCore", "remote_lane"]

log = logging.getLogger(__name__)

#: A portal's ``relay_login`` when ``unset-relay`` turned relaying off there
#: (``None`` means: the connector's default relay login).
RELAY_OFF = ""


def remote_lane(portal: PortalKey) -> str:
    """The inbox lane of a portal's remote events."""
    return f"remote:{portal}"


class BridgeCore:
    """The parts of a bridge: ghosts, portals, logins, permissions, commands, formatter."""

    def __init__(self, app: AppService, connector: NetworkConnector) -> None:
        self.app = app
        self.connector = connector
        section = app.config.bridge
        self.ghosts = Ghosts(app, connector)
        self.portals = Portals(app, connector, self.ghosts)
        self.logins = Logins(app, connector, tell=self._notice)
        self.permissions = Permissions.from_mapping(section.permissions)
        self.commands: CommandRegistry[BridgeCore] = CommandRegistry(
            self.permissions, prefix=section.command_prefix
        )
        """The commands of the management room and of ``!prefix`` in portals; a
        connector adds its own with ``bridge.commands.command(...)``."""
        self.formatter = connector.formatter()
        self.status = StatusReporter(
            endpoint=section.status_endpoint,
            token=app.registration.as_token,
            metrics=app.metrics,
        )
        """The bridge's state and each login's, in bridgev2's shape: shown by the
        provisioning API's ``whoami``, posted to ``bridge.status_endpoint``, counted
        in the metrics."""
        self.reachability = ReachabilityWatch(
            app.client, app.registration.id, self.status, section.ping_interval
        )
        """Keeps the bridge's state ``BRIDGE_UNREACHABLE`` while the homeserver's pings fail."""
        self.logins.observers.append(self._report_login_state)
        self.backfill = Backfill(
            app.store,
            connector,
            self.handle_remote,
            max_catchup=section.backfill_max_catchup,
            initial=section.backfill_initial,
        )
        """Catches each portal up on its missed messages when a login connects."""
        self.send_status = SendStatusReporter(
            lambda: app.bot, connector.network_id, mode=NoticeMode(section.message_status)
        )
        """Tells a room about each Matrix event that could not be bridged."""
        self.login_sessions: LoginSessions[LoginInfo] = LoginSessions(
            self._create_login, self._finish_login
        )
        """The step-by-step logins under way (provisioning API and ``login`` command)."""
        host = AppHost(app, connector, self._logout, self._management_room, self.permissions)
        self.provisioning = ProvisioningAPI(
            host, self.login_sessions, self.status, ProvisioningSettings.from_config(section)
        )
        if section.provisioning and section.provisioning_port is None:
            app.web_apps[PROVISIONING_PREFIX] = self.provisioning.app

    @property
    def config(self) -> Config:
        return self.app.config

    # -- the remote side's door ---------------------------------------------------

    async def handle_remote(self, event: RemoteEvent) -> bool:
        """Store ``event`` in its portal's inbox lane; False when it was accepted before.

        Returns once the event is committed: the connector may acknowledge it to
        the remote network then. Events of one portal are handled in the order
        they were accepted; an event with an ``id`` is accepted once.
        """
        txn_id = self._remote_txn_id(event)
        content = {"type": event.type, "key": txn_id, "content": event_payload(event)["content"]}
        item = NewInboxItem(remote_lane(event.portal), ItemKind.REMOTE, json_text(content))
        accepted = bool(await self.app.store.accept_transaction(txn_id, [item]))
        if accepted:
            self.app.inbox.wake()
        return accepted

    def _remote_txn_id(self, event: RemoteEvent) -> str:
        if not event.id:
            return f"remote:{uuid.uuid4().hex}"
        # NUL cannot be in any of these meaningfully: the join is unambiguous.
        parts = (self.connector.network_id, str(event.portal), event.type, event.id)
        digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
        return f"remote:{digest[:40]}"

    # -- what connectors and commands call ------------------------------------------

    async def add_login(
        self, user_id: str, info: LoginInfo, *, management_room: str | None = None
    ) -> Login:
        """Store a login of Matrix user ``user_id`` (replacing one of the same id),
        load its client and connect it (in the background, with backoff)."""
        return await self.logins.add(user_id, info, management_room=management_room)

    async def set_relay(self, portal: PortalKey, login_id: str | None) -> None:
        """Make ``login_id`` relay in ``portal`` (``None``: the connector's default,
        :data:`RELAY_OFF`: nobody)."""
        record = await self.app.store.portal(portal) or PortalRecord(portal)
        await self.app.store.put_portal(attrs.evolve(record, relay_login=login_id))

    async def ensure_portal(self, portal: PortalKey) -> str:
        """The room of ``portal``, created (with its members) if it has none yet."""
        record = await self.portals.ensure_room(portal)
        assert record.room_id is not None
        return record.room_id

    async def sync_members(
        self, portal: PortalKey, members: Sequence[Sender], *, exclusive: bool = False
    ) -> None:
        """Join the ghosts of ``members`` to the portal's room (which must exist), in
        bulk; with ``exclusive`` the room's other ghosts leave. Call it from the
        portal's lane (a remote event's handling) or knowing no event of it runs."""
        record = await self.portals.ensure_room(portal)
        await self.portals.sync_members(record, members, exclusive=exclusive)

    def relay_login(self, portal: PortalRecord) -> Login | None:
        """The login relaying in ``portal``, if any (and loaded)."""
        login_id = portal.relay_login
        if login_id is None:
            login_id = self.connector.default_relay_login
        if not login_id:
            return None
        return self.logins.get(login_id)

    def relay_text(self, mxid: str, displayname: str, text: str) -> str:
        """A relayed message's text as ``bridge.relay_template`` says."""
        template = self.app.config.bridge.relay_template
        # One line: a name with line breaks would pass for more messages, by others.
        name = " ".join("".join(c if c.isprintable() else " " for c in displayname).split())
        return template.format(displayname=name, message=text, mxid=mxid)

    async def is_management_room(self, room_id: str) -> bool:
        """A room the bot shares with one user only, that is no portal: a DM with the bot."""
        try:
            members = await self.app.room_state.get_members(room_id)
        except MatrixRequestError:
            return False  # the bot may not even look: not its room
        return self.app.bot.user_id in members and len(members) <= 2

    def reply_to(self, room_id: str, event_id: str | None) -> Reply:
        """The commands' reply: a notice from the bot, answering ``event_id``."""
        return notice_reply(self.app.bot, room_id, reply_to=event_id)

    # -- logins, for the provisioning API and the state reporter --------------------------

    async def _report_login_state(self, login: Login, state: LoginState, message: str) -> None:
        await self.status.set_login(
            login.user_id, login.id, state, remote_name=login.remote_name, message=message
        )
        if state is LoginState.CONNECTED:
            self.backfill.start_catch_up(login)

    async def _create_login(self, user_id: str, flow_id: str) -> LoginProcess[LoginInfo] | None:
        connector = self.connector
        if not isinstance(connector, OffersLoginFlows):
            return None
        process: LoginProcess[LoginInfo] | None = await connector.create_login(user_id, flow_id)
        return process

    async def _finish_login(
        self, user_id: str, info: LoginInfo, relogin: str | None, room: str | None
    ) -> str:
        old = self.logins.get(relogin) if relogin and relogin != info.id else None
        if old is not None and old.user_id == user_id:
            await self.logins.remove(old)  # a re-login into another account replaces it
        if room is None:
            room = await self._management_room(user_id)
        login = await self.add_login(user_id, info, management_room=room)
        return login.id

    async def _logout(self, record: LoginRecord) -> None:
        login = self.logins.get(record.id)
        if login is not None:
            await self.logins.remove(login)
        else:
            await self.app.store.delete_login(record.id)

    async def _management_room(self, user_id: str) -> str | None:
        """The management room a login of the user was made in (the newest such)."""
        for record in reversed(await self.app.store.logins(user_id)):
            room = record.metadata.get(MANAGEMENT_ROOM)
            if isinstance(room, str):
                return room
        return None

    async def _notice(self, room_id: str, text: str) -> None:
        await self.app.bot.send_notice(room_id, text)
