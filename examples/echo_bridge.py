"""A complete, tiny bridge: a puppet invited to a room joins it and echoes what
real users say there.

Run it with the daemon's config (it replaces ``bridge-kit run``: both serve the
registration's port, so run one or the other)::

    python examples/echo_bridge.py -c config.yaml

Invite ``@<prefix>echo:<domain>`` (any localpart in the bridge's user namespace
works) to a room: the homeserver asks the bridge whether the user exists, the
bridge registers the puppet, the puppet joins, and it echoes every ``m.text``
and ``m.emote`` message, formatting included.

It is written the way a real bridge should be:

- **It survives restarts.** It keeps nothing in memory that it cannot get back.
  Which puppet echoes in which room is written to the homeserver, as room
  account data of the bridge's bot (which needs no membership in the room), and
  read back into a bounded cache for a room not seen since the start.
- **It is idempotent.** The inbox runs a handler again after a failure or a
  crash. Joining twice or writing the same account data twice changes nothing,
  and an echo sent again from the same event carries the same transaction ID,
  so the homeserver posts it once.
- **It logs what retrying cannot fix** (the homeserver refuses: the puppet was
  kicked or may not speak) and moves on; other failures (the homeserver is
  unreachable) raise, so the inbox retries the event later.
- **It uses only the public API** (``from bridge_kit import ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any
from urllib.parse import quote

from bridge_kit import (
    AppService,
    BridgeKitError,
    Config,
    Event,
    LimitExceeded,
    MatrixRequestError,
    NotFound,
    configure_logging,
    run_app,
    split_user_id,
)

log = logging.getLogger("echo_bridge")

#: The bot's room account data that names the room's echo puppet.
ECHOER_TYPE = "org.bridge_kit.example.echoer"
#: Rooms whose echo puppet is remembered in memory; the rest are asked for again.
CACHE_SIZE = 10_000
#: Message types that are echoed. Never m.notice: bots answer notices with
#: notices, and two of them would talk forever.
ECHOED = frozenset({"m.text", "m.emote"})
HTML = "org.matrix.custom.html"


class EchoBridge:
    """The handlers, and where each room's echo puppet is kept."""

    def __init__(self, app: AppService) -> None:
        self.app = app
        self._echoers: OrderedDict[str, str | None] = OrderedDict()

    def is_ours(self, user_id: str | None) -> bool:
        """A puppet of this bridge, or its bot."""
        if user_id is None:
            return False
        return user_id == self.app.bot.user_id or self.app.registration.is_user_in_namespace(
            user_id
        )

    async def on_member(self, event: Event) -> None:
        """A puppet invited to a room joins it; one that left stops echoing there."""
        puppet, room_id = event.state_key, event.room_id
        if room_id is None or puppet is None or puppet == self.app.bot.user_id:
            return
        if not self.app.registration.is_user_in_namespace(puppet):
            return
        membership = event.content.get("membership")
        if membership == "invite":
            localpart, _ = split_user_id(puppet)
            if await self._refused(self.app.intent(localpart).join_room(room_id), event):
                return
            await self._set_echoer(room_id, puppet)
        elif membership in ("leave", "ban") and await self.echoer(room_id) == puppet:
            await self._set_echoer(room_id, None)

    async def on_message(self, event: Event) -> None:
        """Echo a real user's message as the room's echo puppet."""
        if event.room_id is None or self.is_ours(event.sender):
            return  # never answer a puppet, or two echo puppets would talk forever
        content = echo_content(event.content)
        puppet = await self.echoer(event.room_id) if content else None
        if content is None or puppet is None:
            return
        localpart, _ = split_user_id(puppet)
        send = self.app.intent(localpart).send_event(event.room_id, "m.room.message", content)
        await self._refused(send, event)

    async def echoer(self, room_id: str) -> str | None:
        """The room's echo puppet: from the cache, else from the homeserver."""
        if room_id in self._echoers:
            self._echoers.move_to_end(room_id)
            return self._echoers[room_id]
        try:
            data = await self.app.client.request("GET", self._account_data_path(room_id))
        except NotFound:
            data = {}
        puppet = data.get("puppet")
        self._remember(room_id, puppet if isinstance(puppet, str) else None)
        return self._echoers[room_id]

    async def _set_echoer(self, room_id: str, puppet: str | None) -> None:
        await self.app.client.request(
            "PUT", self._account_data_path(room_id), body={"puppet": puppet}
        )
        self._remember(room_id, puppet)

    def _remember(self, room_id: str, puppet: str | None) -> None:
        self._echoers[room_id] = puppet
        self._echoers.move_to_end(room_id)
        if len(self._echoers) > CACHE_SIZE:
            self._echoers.popitem(last=False)

    def _account_data_path(self, room_id: str) -> str:
        bot, room = quote(self.app.bot.user_id, safe=""), quote(room_id, safe="")
        return f"/_matrix/client/v3/user/{bot}/rooms/{room}/account_data/{ECHOER_TYPE}"

    @staticmethod
    async def _refused(request: Awaitable[object], event: Event) -> bool:
        """Await ``request``; True (and a log line) if the homeserver refused it for good.

        A 4xx other than 429 will be refused again however often it is sent, so
        the event is done with. Everything else raises: the inbox retries it.
        """
        try:
            await request
        except MatrixRequestError as exc:
            if isinstance(exc, LimitExceeded) or not 400 <= exc.status < 500:
                raise
            log.warning("could not act on %s in %s: %s", event.event_id, event.room_id, exc)
            return True
        return False


def echo_content(content: dict[str, Any]) -> dict[str, Any] | None:
    """The echo of a message's content (formatting kept), or None for what is not echoed."""
    msgtype, body = content.get("msgtype"), content.get("body")
    if msgtype not in ECHOED or not isinstance(body, str):
        return None
    relation = content.get("m.relates_to")
    if isinstance(relation, dict) and relation.get("rel_type") == "m.replace":
        return None  # an edit: its original was echoed already
    echo: dict[str, Any] = {"msgtype": msgtype, "body": f"echo: {body}"}
    html = content.get("formatted_body")
    if content.get("format") == HTML and isinstance(html, str):
        echo |= {"format": HTML, "formatted_body": f"echo: {html}"}
    return echo


def build(config: Config) -> AppService:
    """The app with the echo bridge's handlers registered."""
    app = AppService(config)
    bridge = EchoBridge(app)
    app.on_event("m.room.member")(bridge.on_member)
    app.on_event("m.room.message")(bridge.on_message)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    try:
        config = Config.load(parser.parse_args().config)
        configure_logging(config.logging.level, config.logging.format)
        return run_app(build(config))
    except BridgeKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
