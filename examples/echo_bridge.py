"""A complete, tiny bridge: every message a real user sends in a room with an
echo puppet is answered by that puppet.

Run it with a ``bridge-kit run``-style config::

    python examples/echo_bridge.py -c config.yaml

Invite ``@<prefix>echo:<domain>`` (any localpart in the bridge's namespace
works) to a room: the homeserver asks the bridge whether the user exists, the
bridge registers the puppet, the puppet joins, and it echoes what is said.
"""

from __future__ import annotations

import argparse
import asyncio

from bridge_kit import AppService, Config, Event
from bridge_kit.commands.run import serve
from bridge_kit.logs import configure_logging


def build(config: Config) -> AppService:
    app = AppService.from_config(config)

    def our_localpart(user_id: str | None) -> str | None:
        if user_id is None or not app.registration.is_user_in_namespace(user_id):
            return None
        return user_id[1:].split(":", 1)[0]

    @app.on_event("m.room.member")
    async def join_when_invited(event: Event) -> None:
        localpart = our_localpart(event.state_key)
        if localpart and event.room_id and event.content.get("membership") == "invite":
            await app.intent(localpart).join_room(event.room_id)

    @app.on_event("m.room.message")
    async def echo(event: Event) -> None:
        if our_localpart(event.sender) or event.room_id is None:
            return  # never answer a puppet, or two echo puppets would talk forever
        members = await app.bot.joined_members(event.room_id)
        for user_id in members:
            localpart = our_localpart(user_id)
            if localpart and user_id != app.bot.user_id:
                body = event.content.get("body", "")
                await app.intent(localpart).send_text(event.room_id, f"echo: {body}")

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    config = Config.load(parser.parse_args().config)
    configure_logging(config.logging.level, config.logging.format)
    return asyncio.run(serve(build(config)))


if __name__ == "__main__":
    raise SystemExit(main())
