"""Bridge commands: ``help``, ``login <nick>``..., sent to the bridge bot.

In the management room (a DM with the bot) a message is a command as it is;
in a portal only with the prefix (``!bk help``). A connector adds its own
commands to the :class:`CommandRegistry` that the layer fills with the built-in
ones::

    @registry.command("ping", help="Check that the bridge answers", level=Level.RELAY)
    async def ping(ctx: CommandContext[Bridge]) -> None:
        await ctx.reply("pong")

Every reply goes through the ``reply`` callable given to :meth:`CommandRegistry.handle`
(the layer sends it as an ``m.notice`` from the bot: :func:`notice_reply`). A
handler's error becomes a reply with its message, never a traceback.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

import attrs

from bridge_kit.bridge.formatting import markdown_html_or_none
from bridge_kit.bridge.permissions import Level, Permissions
from bridge_kit.errors import BridgeKitError, CommandError

__all__ = [
    "DEFAULT_PREFIX",
    "Command",
    "CommandContext",
    "CommandRegistry",
    "Reply",
    "code",
    "notice_reply",
    "parse_command",
]

log = logging.getLogger("bridge_kit.bridge.commands")

DEFAULT_PREFIX = "!bk"

#: Longest command message read (a command is one line; anything longer is not one).
MAX_COMMAND_LENGTH = 4096

T = TypeVar("T")

#: Sends a reply: its plain text and its HTML (``None``: plain only).
Reply = Callable[[str, str | None], Awaitable[object]]


@attrs.frozen
class CommandContext(Generic[T]):
    """What a handler gets: who ran which command where, its arguments, and
    :meth:`reply`. ``state`` is what the caller of :meth:`CommandRegistry.handle`
    passed (the layer passes its bridge)."""

    command: Command[T]
    sender: str
    room_id: str
    #: The text after the command's name, as typed (for arguments with spaces).
    raw_args: str
    #: The arguments, split like a shell would (quotes group words).
    args: tuple[str, ...]
    level: Level
    #: Whether the room is the management room (no prefix needed).
    management: bool
    #: The prefix that commands in a portal need (``!bk``).
    prefix: str
    registry: CommandRegistry[T]
    state: T
    event_id: str | None
    _reply: Reply

    async def reply(self, text: str, *, markdown: bool = True) -> None:
        """Reply in the room; ``text`` is markdown unless ``markdown=False`` (HTML
        is sent only when the markdown formats something)."""
        html = markdown_html_or_none(text) if markdown else None
        await self._reply(text, html)

    def usage(self) -> str:
        """How the command is typed here (with the prefix in a portal)."""
        return self.registry.usage_of(self.command, prefix="" if self.management else self.prefix)

    def usage_error(self, problem: str | None = None) -> CommandError:
        """The error to raise for wrong arguments: says how the command is typed."""
        start = f"{problem}. " if problem else ""
        return CommandError(f"{start}Usage: `{self.usage()}`")

    def require_args(self, least: int, most: int | None = None) -> None:
        """Raise :meth:`usage_error` unless there are ``least`` to ``most`` arguments."""
        count = len(self.args)
        if count < least or (most is not None and count > most):
            raise self.usage_error()


class Handler(Protocol[T]):
    def __call__(self, ctx: CommandContext[T], /) -> Awaitable[None]: ...


def _lower(name: str) -> str:
    return name.lower()


def _lowered(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(name.lower() for name in names)


@attrs.frozen
class Command(Generic[T]):
    """A command: its ``name`` (and ``aliases``), what it does (``help``), how its
    arguments are typed (``usage``: ``"<nick> [password]"``), the :class:`Level`
    needed to run it, and its async ``handler``."""

    name: str = attrs.field(converter=_lower)
    handler: Handler[T]
    help: str = ""
    usage: str = ""
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_lowered)
    level: Level = Level.USER

    @name.validator
    def _check_name(self, _: object, name: str) -> None:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a command name is one word: {name!r}")


def parse_command(body: str, *, prefix: str, management: bool) -> tuple[str, str] | None:
    """``(name, raw_args)`` of the command in a message ``body``, or ``None``.

    In a portal the body must start with ``prefix`` and a space (``!bk help``);
    in the management room the prefix may be left out.
    """
    text = body.strip()
    if not text or len(text) > MAX_COMMAND_LENGTH:
        return None
    if (
        prefix
        and text.startswith(prefix)
        and (len(text) == len(prefix) or text[len(prefix)].isspace())
    ):
        text = text[len(prefix) :].strip()
    elif not management:
        return None
    if not text:
        return "help", ""
    name, *rest = text.split(maxsplit=1)
    raw_args = rest[0] if rest else ""
    return name.lower(), raw_args


class CommandRegistry(Generic[T]):
    """The commands a bridge knows, and running them for a message.

    ``permissions`` says each sender's :class:`Level` (a :class:`Permissions`,
    or any callable from a user ID to a level). ``help`` is built in.
    """

    def __init__(
        self,
        permissions: Permissions | Callable[[str], Level],
        *,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.prefix = prefix
        self._level_of = (
            permissions.level_of if isinstance(permissions, Permissions) else permissions
        )
        self._commands: dict[str, Command[T]] = {}
        self._names: dict[str, Command[T]] = {}
        self.add(
            Command(
                "help",
                self._help,
                help="List the commands you may run, or explain one",
                usage="[command]",
                level=Level.RELAY,
            )
        )

    # -- the commands ----------------------------------------------------------------

    def add(self, command: Command[T], *, replace: bool = False) -> None:
        """Add ``command``; ``replace`` lets it take the place of one with its name.

        A name or alias already taken by another command is a ``ValueError``.
        """
        old = self._commands.get(command.name)
        if old is not None:
            if not replace:
                raise ValueError(f"a command {command.name!r} is already registered")
            self.remove(old.name)
        for name in (command.name, *command.aliases):
            if name in self._names:
                raise ValueError(f"{name!r} already names the command {self._names[name].name!r}")
        self._commands[command.name] = command
        for name in (command.name, *command.aliases):
            self._names[name] = command

    def remove(self, name: str) -> None:
        """Remove the command ``name`` (and its aliases); ``KeyError`` if unknown."""
        command = self._commands.pop(name.lower())
        for key in (command.name, *command.aliases):
            self._names.pop(key, None)

    def command(
        self,
        name: str,
        *,
        help: str = "",
        usage: str = "",
        aliases: Iterable[str] = (),
        level: Level = Level.USER,
        replace: bool = False,
    ) -> Callable[[Handler[T]], Handler[T]]:
        """Decorator: add the decorated async function as the command ``name``."""

        def register(handler: Handler[T]) -> Handler[T]:
            command = Command(name, handler, help, usage, tuple(aliases), level)
            self.add(command, replace=replace)
            return handler

        return register

    def get(self, name: str) -> Command[T] | None:
        """The command called ``name`` (or with that alias)."""
        return self._names.get(name.lower())

    def __iter__(self) -> Iterator[Command[T]]:
        return iter(sorted(self._commands.values(), key=lambda command: command.name))

    def available_to(self, level: Level) -> list[Command[T]]:
        """The commands a sender with ``level`` may run, by name."""
        return [command for command in self if level >= command.level]

    def usage_of(self, command: Command[T], *, prefix: str = "") -> str:
        start = f"{prefix} " if prefix else ""
        return f"{start}{command.name} {command.usage}".rstrip()

    # -- running ---------------------------------------------------------------------

    async def handle(
        self,
        *,
        sender: str,
        room_id: str,
        body: str,
        reply: Reply,
        state: T,
        management: bool,
        event_id: str | None = None,
    ) -> bool:
        """Run the command in ``body``, if it is one; whether it was.

        Every outcome is answered through ``reply``: the handler's own replies, an
        unknown command, a sender without the level, wrong arguments, or an error
        in the handler (its message, logged with its traceback).
        """
        parsed = parse_command(body, prefix=self.prefix, management=management)
        if parsed is None:
            return False
        name, raw_args = parsed
        level = self._level_of(sender)
        prefix = "" if management else f"{self.prefix} "
        if level <= Level.NONE:
            await reply("You may not use this bridge.", None)
            return True
        command = self.get(name)
        if command is None:
            text = (
                f"Unknown command {code(name)}. Send `{prefix}help` for the commands you may run."
            )
            await _reply_markdown(reply, text)
            return True
        if level < command.level:
            text = f"`{command.name}` needs the {command.level} level; you have {level}."
            await _reply_markdown(reply, text)
            return True
        ctx = CommandContext(
            command, sender, room_id, raw_args, (), level, management, self.prefix, self,
            state, event_id, reply,
        )  # fmt: skip
        await self._run(ctx)
        return True

    async def _run(self, ctx: CommandContext[T]) -> None:
        name = ctx.command.name
        try:
            ctx = attrs.evolve(ctx, args=_split_args(ctx.raw_args))
            await ctx.command.handler(ctx)
        except CommandError as exc:
            await ctx.reply(str(exc))
        except BridgeKitError as exc:
            log.warning("command %r of %s failed: %s", name, ctx.sender, exc)
            await ctx.reply(f"{name} failed: {exc}", markdown=False)
        except Exception as exc:
            log.exception("command %r of %s failed", name, ctx.sender)
            await ctx.reply(f"{name} failed: {_describe(exc)}", markdown=False)

    async def _help(self, ctx: CommandContext[T]) -> None:
        prefix = "" if ctx.management else f"{self.prefix} "
        if ctx.args:
            command = self.get(ctx.args[0])
            if command is None or ctx.level < command.level:
                raise CommandError(f"No command {code(ctx.args[0])} you may run.")
            aliases = f" (also: {', '.join(command.aliases)})" if command.aliases else ""
            usage = self.usage_of(command, prefix=prefix.strip())
            await ctx.reply(f"`{usage}`{aliases}: {command.help or 'no description'}")
            return
        lines = [
            f"- `{self.usage_of(command, prefix=prefix.strip())}`"
            + (f": {command.help}" if command.help else "")
            for command in self.available_to(ctx.level)
        ]
        where = "" if ctx.management else f" (in a portal, start with `{self.prefix}`)"
        await ctx.reply(f"Commands you may run{where}:\n\n" + "\n".join(lines))


def code(text: str) -> str:
    """``text`` as a markdown code span, whatever backticks it holds: what a user typed,
    repeated in a reply, renders as typed (never as a link or a pill)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _split_args(raw_args: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw_args))
    except ValueError as exc:
        # shlex says "No closing quotation"; the user needs to know which.
        raise CommandError(f"Could not read the arguments: {str(exc).lower()}.") from None


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _reply_markdown(reply: Reply, text: str) -> None:
    await reply(text, markdown_html_or_none(text))


class _NoticeSender(Protocol):
    async def send_notice(
        self, room_id: str, text: str, *, html: str | None = ..., reply_to: str | None = ...
    ) -> str: ...


def notice_reply(bot: _NoticeSender, room_id: str, *, reply_to: str | None = None) -> Reply:
    """A :data:`Reply` that sends an ``m.notice`` from ``bot`` (the bridge bot's
    :class:`~bridge_kit.intent.Intent`) to ``room_id``, as a reply to ``reply_to``."""

    async def send(text: str, html: str | None) -> str:
        return await bot.send_notice(room_id, text, html=html, reply_to=reply_to)

    return send
