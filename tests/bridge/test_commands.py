"""The command framework without a homeserver: parsing, permissions, help and errors.

Replies go to a recorder (the ``reply`` callable); test_commands_synapse.py runs
``help`` through a real Synapse and the app service.
"""

from __future__ import annotations

import logging

import attrs
import pytest

from bridge_kit.bridge.commands import (
    DEFAULT_PREFIX,
    Command,
    CommandContext,
    CommandRegistry,
    parse_command,
)
from bridge_kit.bridge.permissions import Level, Permissions
from bridge_kit.errors import CommandError, NotFound

ADMIN = "@boss:example.org"
USER = "@user:example.org"
RELAY = "@visitor:elsewhere.net"
NOBODY = "@spam:blocked.example"

PERMISSIONS = Permissions.from_mapping(
    {"*": "relay", "example.org": "user", ADMIN: "admin", "blocked.example": "none"}
)


@attrs.define
class Bridge:
    """Stands for what the layer passes as ``state``."""

    logins: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class Replies:
    sent: list[tuple[str, str | None]] = attrs.field(factory=list)

    async def __call__(self, text: str, html: str | None) -> None:
        self.sent.append((text, html))

    @property
    def texts(self) -> list[str]:
        return [text for text, _ in self.sent]


@pytest.fixture
def registry() -> CommandRegistry[Bridge]:
    registry: CommandRegistry[Bridge] = CommandRegistry(PERMISSIONS)

    @registry.command("login", help="Log in", usage="<nick> [password]", aliases=["connect"])
    async def login(ctx: CommandContext[Bridge]) -> None:
        ctx.require_args(1, 2)
        ctx.state.logins[ctx.sender] = ctx.args[0]
        await ctx.reply(f"Logged in as **{ctx.args[0]}**")

    @registry.command("say", help="Repeat the text", level=Level.RELAY)
    async def say(ctx: CommandContext[Bridge]) -> None:
        await ctx.reply(ctx.raw_args, markdown=False)

    @registry.command("sync", help="Sync every portal", level=Level.ADMIN)
    async def sync(ctx: CommandContext[Bridge]) -> None:
        raise RuntimeError("the network is down")

    @registry.command("lookup", help="Look a room up", level=Level.RELAY)
    async def lookup(ctx: CommandContext[Bridge]) -> None:
        raise NotFound(404, "M_NOT_FOUND", "no such room")

    return registry


async def run(
    registry: CommandRegistry[Bridge],
    body: str,
    sender: str = USER,
    *,
    management: bool = True,
    state: Bridge | None = None,
) -> tuple[bool, Replies]:
    replies = Replies()
    handled = await registry.handle(
        sender=sender,
        room_id="!room:example.org",
        body=body,
        reply=replies,
        state=state or Bridge(),
        management=management,
        event_id="$event",
    )
    return handled, replies


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "management", "parsed"),
    [
        ("help", True, ("help", "")),
        ("  LOGIN  bob  secret ", True, ("login", "bob  secret")),
        ("!bk login bob", True, ("login", "bob")),  # the prefix may be used here too
        ("!bk login bob", False, ("login", "bob")),
        ("!bk", False, ("help", "")),
        ("login bob", False, None),  # a portal needs the prefix
        ("!bklogin bob", False, None),  # the prefix is a word of its own
        ("!bk\tsay  two\nlines", False, ("say", "two\nlines")),
        ("", True, None),
        ("   ", True, None),
        ("x" * 5000, True, None),
    ],
)
def test_parse_command(body: str, management: bool, parsed: tuple[str, str] | None) -> None:
    assert parse_command(body, prefix=DEFAULT_PREFIX, management=management) == parsed


def test_the_prefix_is_a_parameter() -> None:
    assert parse_command("!irc help", prefix="!irc", management=False) == ("help", "")
    assert parse_command("!bk help", prefix="!irc", management=False) is None


# -- running ------------------------------------------------------------------------


async def test_a_command_runs_with_its_arguments_and_state(
    registry: CommandRegistry[Bridge],
) -> None:
    bridge = Bridge()
    handled, replies = await run(registry, 'connect "bob smith" pw', state=bridge)
    assert handled
    assert bridge.logins == {USER: "bob smith"}
    assert replies.sent == [
        ("Logged in as **bob smith**", "Logged in as <strong>bob smith</strong>")
    ]
    _, replies = await run(registry, "say  keep   the *spaces*")
    assert replies.sent == [("keep   the *spaces*", None)]


async def test_an_ordinary_message_in_a_portal_is_not_a_command(
    registry: CommandRegistry[Bridge],
) -> None:
    handled, replies = await run(registry, "hello everyone", management=False)
    assert not handled
    assert replies.sent == []


async def test_help_lists_only_what_the_sender_may_run(registry: CommandRegistry[Bridge]) -> None:
    _, admin = await run(registry, "help", ADMIN)
    _, user = await run(registry, "help", USER)
    _, relay = await run(registry, "!bk help", RELAY, management=False)

    assert admin.texts[0].count("\n- ") == 5
    assert "`sync`: Sync every portal" in admin.texts[0]
    assert "`login <nick> [password]`: Log in" in user.texts[0]
    assert "sync" not in user.texts[0]
    assert relay.texts == [
        "Commands you may run (in a portal, start with `!bk`):\n\n"
        "- `!bk help [command]`: List the commands you may run, or explain one\n"
        "- `!bk lookup`: Look a room up\n"
        "- `!bk say`: Repeat the text"
    ]
    assert relay.sent[0][1] is not None
    assert "<li><code>!bk say</code>: Repeat the text</li>" in relay.sent[0][1]


async def test_help_on_one_command(registry: CommandRegistry[Bridge]) -> None:
    _, replies = await run(registry, "help connect")
    assert replies.texts == ["`login <nick> [password]` (also: connect): Log in"]
    _, replies = await run(registry, "help sync")  # exists, but not for this sender
    assert replies.texts == ["No command `sync` you may run."]


async def test_an_unknown_command_says_how_to_get_help(registry: CommandRegistry[Bridge]) -> None:
    _, replies = await run(registry, "frobnicate now")
    assert replies.texts == [
        "Unknown command `frobnicate`. Send `help` for the commands you may run."
    ]
    _, replies = await run(registry, "!bk frobnicate", management=False)
    assert replies.texts == [
        "Unknown command `frobnicate`. Send `!bk help` for the commands you may run."
    ]


@pytest.mark.parametrize(
    "typed",
    ["x`[click](https://evil.example)`", "``<a/href='https://evil.example'>x</a>", "`@room`"],
)
async def test_what_a_user_typed_is_quoted_back_as_code_only(
    registry: CommandRegistry[Bridge], typed: str
) -> None:
    """A command name (or help topic) the bot repeats cannot make it post a link."""
    for body in (typed, f"help {typed}"):
        _, replies = await run(registry, body)
        html = replies.sent[0][1]
        assert html is not None and "<a" not in html, html


async def test_a_level_too_low_is_refused_without_running(
    registry: CommandRegistry[Bridge],
) -> None:
    bridge = Bridge()
    _, replies = await run(registry, "login bob", RELAY, state=bridge)
    assert replies.texts == ["`login` needs the user level; you have relay."]
    assert bridge.logins == {}


async def test_a_sender_without_any_level_is_told_once(registry: CommandRegistry[Bridge]) -> None:
    handled, replies = await run(registry, "help", NOBODY)
    assert handled
    assert replies.texts == ["You may not use this bridge."]


async def test_wrong_arguments_reply_with_the_usage(registry: CommandRegistry[Bridge]) -> None:
    _, management = await run(registry, "login")
    _, portal = await run(registry, "!bk login a b c", management=False)
    _, quote = await run(registry, 'login "unclosed')
    assert management.texts == ["Usage: `login <nick> [password]`"]
    assert portal.texts == ["Usage: `!bk login <nick> [password]`"]
    assert quote.texts == ["Could not read the arguments: no closing quotation."]


async def test_errors_in_a_handler_are_replies_and_logged(
    registry: CommandRegistry[Bridge], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "bridge_kit.bridge.commands"):
        _, crash = await run(registry, "sync", ADMIN)
        _, known = await run(registry, "lookup")
    assert crash.sent == [("sync failed: RuntimeError: the network is down", None)]
    assert known.sent == [("lookup failed: 404 M_NOT_FOUND: no such room", None)]
    assert all("Traceback" not in text for text in crash.texts + known.texts)
    crashed = [r for r in caplog.records if "'sync'" in r.getMessage()]
    assert crashed[0].levelno == logging.ERROR
    assert crashed[0].exc_info is not None, "the traceback goes to the log"
    looked_up = [r for r in caplog.records if "'lookup'" in r.getMessage()]
    assert looked_up[0].levelno == logging.WARNING


async def test_a_command_error_is_the_reply(registry: CommandRegistry[Bridge]) -> None:
    @registry.command("fail", level=Level.RELAY)
    async def fail(ctx: CommandContext[Bridge]) -> None:
        raise CommandError("You are not logged in. Send `login <nick>` first.")

    _, replies = await run(registry, "fail")
    assert replies.sent == [
        (
            "You are not logged in. Send `login <nick>` first.",
            "You are not logged in. Send <code>login &lt;nick&gt;</code> first.",
        )
    ]


# -- the registry -------------------------------------------------------------------


async def noop(ctx: CommandContext[Bridge]) -> None:
    return None


def test_names_and_aliases_are_unique(registry: CommandRegistry[Bridge]) -> None:
    with pytest.raises(ValueError, match="'login' is already registered"):
        registry.add(Command("login", noop))
    with pytest.raises(ValueError, match="'connect' already names the command 'login'"):
        registry.add(Command("join", noop, aliases=("connect",)))
    with pytest.raises(ValueError, match="one word"):
        Command("two words", noop)
    assert registry.get("CONNECT") is registry.get("login")


async def test_a_connector_may_replace_and_remove_commands(
    registry: CommandRegistry[Bridge],
) -> None:
    registry.add(Command("login", noop, help="Log in with a token", usage="<token>"), replace=True)
    assert registry.get("connect") is None
    _, replies = await run(registry, "help login")
    assert replies.texts == ["`login <token>`: Log in with a token"]
    registry.remove("say")
    assert [command.name for command in registry.available_to(Level.RELAY)] == ["help", "lookup"]


async def test_permissions_may_be_any_callable() -> None:
    registry: CommandRegistry[None] = CommandRegistry(lambda user_id: Level.ADMIN, prefix="!x")
    replies = Replies()
    handled = await registry.handle(
        sender=NOBODY, room_id="!r", body="!x help", reply=replies, state=None, management=False
    )
    assert handled
    assert replies.texts[0].startswith("Commands you may run (in a portal, start with `!x`)")


async def test_a_reply_without_formatting_has_no_html(registry: CommandRegistry[Bridge]) -> None:
    @registry.command("ping", level=Level.RELAY)
    async def ping(ctx: CommandContext[Bridge]) -> None:
        await ctx.reply("pong & <more>")

    _, replies = await run(registry, "ping")
    assert replies.sent == [("pong & <more>", None)]
    _, replies = await run(registry, "ping", NOBODY)
    assert replies.sent == [("You may not use this bridge.", None)]
