"""A complete, tiny bridge on the bridge layer: a puppet invited to a room joins it
and echoes what real users say there.

Run it with the daemon's config (it replaces ``bridge-kit run``: both serve the
registration's port, so run one or the other)::

    python examples/echo_bridge.py -c config.yaml

Invite ``@<prefix>echo:<domain>`` (any localpart in the bridge's user namespace
works) to a room: the homeserver asks the bridge whether the user exists, the
bridge registers the puppet, the puppet joins, and it echoes every ``m.text``
and ``m.emote`` message, formatting included.

The "remote network" here is an echo service in this process, and the bridge is
written the way any bridge on :mod:`bridge_kit.bridge` is: a connector, and a
client per login. The layer does the rest, which is what a real bridge needs:

- **It survives restarts.** The invited room becomes a *portal* in the store (a
  remote chat and its room), so a new process knows which puppet echoes where.
- **It posts nothing twice.** A Matrix message is claimed in the message map
  before it is sent to the echo service, and an echo is a remote event with an
  id derived from the message's, accepted once and posted with a transaction ID
  derived from it, whatever crashes in between.
- **It logs what retrying cannot fix** (the homeserver refuses: the puppet was
  kicked or may not speak) and moves on; other failures (the homeserver is
  unreachable) are retried by the inbox.
- **It uses only the public API** of bridge_kit and its bridge layer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import attrs

from bridge_kit import AppService, BridgeKitError, Config, InvalidInput, configure_logging
from bridge_kit.bridge.bridge import Bridge
from bridge_kit.bridge.connector import (
    BridgeContext,
    LoginHandle,
    LoginInfo,
    MatrixMessage,
    NetworkClient,
    NetworkConnector,
    SentMessage,
    UserInfo,
)
from bridge_kit.bridge.events import MessageKind, RemoteMessage, Sender
from bridge_kit.bridge.records import LoginState, PortalKey, PortalRecord

#: What is echoed. Never m.notice: bots answer notices with notices, and two of
#: them would talk forever.
ECHOED = (MessageKind.TEXT, MessageKind.EMOTE)
#: The portal metadata key naming the room's echo puppet (its remote id).
ECHOER = "echoer"


class EchoClient(NetworkClient):
    """The one login: the echo service, which answers each message at once."""

    def __init__(self, connector: EchoConnector, login: LoginHandle) -> None:
        self.connector = connector
        self.login = login

    async def connect(self) -> None:
        await self.login.set_state(LoginState.CONNECTED)

    async def disconnect(self) -> None:
        return None

    async def send_message(self, message: MatrixMessage) -> SentMessage:
        remote_id = f"in:{message.event_id}"
        echoer = message.portal.metadata.get(ECHOER)
        body = message.content.get("body")
        if message.kind in ECHOED and isinstance(echoer, str) and isinstance(body, str):
            await self.connector.echo(message, echoer, body)
        return SentMessage(remote_id)


class EchoConnector(NetworkConnector):
    """The echo network: every localpart in the registration's namespace is an echoer."""

    network_id = "echo"
    display_name = "Echo"
    default_relay_login = "echo"

    def __init__(self, app: AppService) -> None:
        self.app = app
        self.bridge: BridgeContext | None = None

    async def start(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        await bridge.add_login(bridge.app.bot.user_id, LoginInfo(id="echo", remote_name="echo"))

    def load_login(self, login: LoginHandle) -> NetworkClient:
        return EchoClient(self, login)

    async def login(self, user_id: str, args: Sequence[str]) -> LoginInfo:
        raise InvalidInput("the echo bridge has no logins: everyone is relayed")

    # A puppet's localpart is the echoer's remote id: any name in the namespace.
    def ghost_localpart(self, user_id: str) -> str:
        return user_id

    def ghost_for_localpart(self, localpart: str) -> str | None:
        user_id = f"@{localpart}:{self.app.domain}"
        return localpart if self.app.registration.is_user_in_namespace(user_id) else None

    async def get_user_info(self, user_id: str) -> UserInfo | None:
        return UserInfo()  # every echoer exists; no profile to set

    async def portal_for_invite(
        self, room_id: str, inviter: str, ghost_id: str
    ) -> PortalKey | None:
        """An invited room is a portal of its own, echoed by the invited puppet."""
        assert self.bridge is not None
        key = PortalKey(room_id)
        await self.bridge.app.store.put_portal(
            attrs.evolve(
                await self.bridge.app.store.portal(key) or PortalRecord(key),
                metadata={ECHOER: ghost_id},
            )
        )
        return key

    async def echo(self, message: MatrixMessage, echoer: str, body: str) -> None:
        """The echo service's answer, as a remote event (stored, then posted in order)."""
        assert self.bridge is not None
        html = f"echo: {message.html}" if message.html is not None else None
        await self.bridge.handle_remote(
            RemoteMessage(
                portal=message.portal.key,
                sender=Sender(echoer),
                id=f"echo:{message.event_id}",
                text=f"echo: {body}",
                html=html,
                kind=message.kind,
            )
        )


def build(config: Config) -> Bridge:
    """The echo bridge; everyone may be relayed unless ``bridge.permissions`` says otherwise."""
    if not config.bridge.permissions:
        config = attrs.evolve(
            config, bridge=attrs.evolve(config.bridge, permissions={"*": "relay"})
        )
    app = AppService(config)
    return Bridge(app, EchoConnector(app))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    try:
        config = Config.load(parser.parse_args().config)
        configure_logging(config.logging.level, config.logging.format)
        return build(config).run()
    except BridgeKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
