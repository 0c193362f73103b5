"""The bridge: an :class:`~bridge_kit.AppService` and a network connector, tied together.

::

    config = Config.load("config.yaml", sections=MyConnector.config_sections)
    bridge = Bridge(AppService(config), MyConnector())
    raise SystemExit(bridge.run())

or ``async with bridge:`` (tests, or a program with its own loop).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from types import TracebackType

from bridge_kit._json import json_text
from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import LoginHandle, LoginInfo, NetworkConnector
from bridge_kit.bridge.events import RemoteEvent, event_payload
from bridge_kit.bridge.records import PortalKey
from bridge_kit.config import Config
from bridge_kit.inbox.records import ItemKind, NewInboxItem

__all__ = ["Bridge", "remote_lane"]

log = logging.getLogger(__name__)


def remote_lane(portal: PortalKey) -> str:
    """The inbox lane of a portal's remote events."""
    return f"remote:{portal}"


class Bridge:
    """The bridge layer on ``app`` for the network ``connector``.

    Build it before the app starts: it registers the app's handlers (Matrix
    events, the alias and user queries) in the constructor.
    """

    def __init__(self, app: AppService, connector: NetworkConnector) -> None:
        self.app = app
        self.connector = connector

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

    # -- what connectors call -------------------------------------------------------

    async def add_login(self, user_id: str, info: LoginInfo) -> LoginHandle:
        """Store a login of Matrix user ``user_id`` (replacing one of the same id),
        load its client and connect it (in the background, with backoff)."""
        raise NotImplementedError

    async def set_relay(self, portal: PortalKey, login_id: str | None) -> None:
        """Make ``login_id`` relay in ``portal`` (``None``: the connector's default)."""
        raise NotImplementedError

    async def ensure_portal(self, portal: PortalKey) -> str:
        """The room of ``portal``, created (with its members) if it has none yet."""
        raise NotImplementedError

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the app, load and connect the stored logins, start the connector."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the connector, disconnect the logins, stop the app."""
        raise NotImplementedError

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
        """Serve until SIGTERM or SIGINT, like :func:`~bridge_kit.run_app`; the exit status."""
        raise NotImplementedError
