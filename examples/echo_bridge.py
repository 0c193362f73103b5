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
import sys

from bridge_kit import AppService, BridgeKitError, Config, Event, configure_logging, run_app


def build(config: Config) -> AppService:
    app = AppService(config)
    # room -> the puppet that echoes there; a real bridge keeps this mapping in its database.
    echoers: dict[str, str] = {}

    def our_localpart(user_id: str | None) -> str | None:
        if user_id is None or not app.registration.is_user_in_namespace(user_id):
            return None
        return user_id[1:].split(":", 1)[0]

    @app.on_event("m.room.member")
    async def join_when_invited(event: Event) -> None:
        localpart = our_localpart(event.state_key)
        if localpart and event.room_id and event.content.get("membership") == "invite":
            await app.intent(localpart).join_room(event.room_id)
            echoers[event.room_id] = localpart

    @app.on_event("m.room.message")
    async def echo(event: Event) -> None:
        localpart = echoers.get(event.room_id or "")
        if localpart is None or our_localpart(event.sender):
            return  # never answer a puppet, or two echo puppets would talk forever
        body = event.content.get("body", "")
        await app.intent(localpart).send_text(event.room_id or "", f"echo: {body}")

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
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
