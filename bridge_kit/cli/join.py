"""``bridge-kit join`` and ``bridge-kit sync-profiles``: puppets into rooms, and their
profiles, in bulk and resumably, from tab-separated files.

Both work as ``register`` does (options, progress bar, ``--report``, Ctrl-C,
exit status: see :mod:`bridge_kit.cli._bulk`). A line of the input that is
not in the expected shape stops the command before anything is sent (exit 2),
naming the line; a line in the right shape with an invalid localpart or room
is listed as invalid and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bridge_kit import defaults
from bridge_kit.app.runner import StopSignals, run_app
from bridge_kit.cli import _bulk
from bridge_kit.cli.report import ReportWriter
from bridge_kit.errors import UsageError
from bridge_kit.puppets import PuppetRegistrar
from bridge_kit.puppets.progress import ProgressReporter
from bridge_kit.puppets.results import RunResult
from bridge_kit.registration import Registration

#: pairs_from_lines or profiles_from_lines: numbered-line parsers of an input file.
_Parser = Callable[[Iterable[str], str], Iterator[Any]]

_COMMON = f"""\
Blank lines and lines starting with # are skipped; '-' reads standard input.
What the store knows as done is skipped without a request, so running the
same command again resumes an interrupted run (Ctrl-C finishes the requests
in flight and saves; a crash loses at most the last half second of records,
whose requests are sent again and change nothing). Puppets the store does
not know are registered first. Registrations and {{family}} each slow down
on their own 429s.

With -c CONFIG the homeserver, registration, store and concurrency come from
the daemon's config file (flags override them). Without it the store defaults
to {defaults.STORE_URL}.

Exit status: 0 if nothing failed or was invalid; 1 otherwise (or aborted);
2 for a usage or set-up error (a malformed line included); 130/143 when
cancelled by SIGINT/SIGTERM.
"""

_JOIN_EPILOG = """\
PAIRS_TSV holds one pair a line: localpart<TAB>room_id_or_alias. Aliases are
resolved once each. A join the room refuses is retried after the appservice's
bot invites the puppet, when it has no membership in a room entered by invite
(the bot must be in the room and allowed to invite). A banned puppet fails and
stays banned: moderators decide who is in a room. --unban overrides them: the bot
lifts each such ban (it needs the power to) and the puppet joins.
""" + _COMMON.format(family="joins")

_PROFILES_EPILOG = """\
PROFILES_TSV holds one puppet a line: localpart<TAB>displayname<TAB>avatar_mxc. An
empty field (or a missing last one) leaves that value alone. Values the store
says this bridge set already are not sent again.
""" + _COMMON.format(family="profile updates")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``join`` and ``sync-profiles`` to the ``bridge-kit`` sub-commands."""
    join = subparsers.add_parser(
        "join",
        help="join puppets to rooms in bulk (resumable)",
        description="Join many puppets to many rooms, streaming, resumably.",
        epilog=_JOIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(join, "pairs.tsv", "join requests")
    join.add_argument(
        "--unban",
        action="store_true",
        help="lift the ban of a banned puppet and join it (off: a ban stands)",
    )
    join.set_defaults(command=run_join)
    profiles = subparsers.add_parser(
        "sync-profiles",
        help="set puppets' display names and avatars in bulk (resumable)",
        description="Set many puppets' profiles, streaming, resumably.",
        epilog=_PROFILES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(profiles, "profiles.tsv", "profile updates")
    profiles.set_defaults(command=run_sync_profiles)


def _add_arguments(parser: argparse.ArgumentParser, example: str, requests: str) -> None:
    _bulk.add_where_arguments(parser)
    parser.add_argument(
        "--from-file",
        required=True,
        metavar=example.upper().replace(".", "_"),
        help=f"the input ({example}, see below; '-' for standard input)",
    )
    _bulk.add_run_arguments(parser, requests)


def run_join(args: argparse.Namespace) -> int:
    """Run ``bridge-kit join``; returns the exit status."""
    _bulk.apply_config(args)
    _bulk.check_arguments(args)
    return run_app(lambda stop: _run(args, stop, pairs_from_lines, _join))


def run_sync_profiles(args: argparse.Namespace) -> int:
    """Run ``bridge-kit sync-profiles``; returns the exit status."""
    _bulk.apply_config(args)
    _bulk.check_arguments(args)
    return run_app(lambda stop: _run(args, stop, profiles_from_lines, _sync))


async def _run(args: argparse.Namespace, stop: StopSignals, parse: _Parser, call: Any) -> int:
    registration = Registration.load(args.registration)
    # Reading the whole file once checks every line before anything is sent.
    total = None if args.from_file == "-" else _count(args.from_file, parse)

    @contextlib.contextmanager
    def items() -> Iterator[Iterable[Any]]:
        with _bulk.open_input(args.from_file) as lines:
            yield parse(lines, _source(args.from_file))

    async def bulk(
        registrar: PuppetRegistrar,
        inputs: Iterable[Any],
        reporter: ProgressReporter,
        report: ReportWriter | None,
    ) -> RunResult:
        result: RunResult = await call(registrar, inputs, args, reporter, report)
        return result

    return await _bulk.execute(args, stop, registration, items=items, total=total, call=bulk)


async def _join(
    registrar: PuppetRegistrar,
    pairs: Iterable[tuple[str, str]],
    args: argparse.Namespace,
    reporter: ProgressReporter,
    report: ReportWriter | None,
) -> RunResult:
    return await registrar.join_many(
        pairs,
        concurrency=args.concurrency,
        progress=reporter,
        on_problem=report,
        unban=args.unban,
    )


async def _sync(
    registrar: PuppetRegistrar,
    items: Iterable[tuple[str, str | None, str | None]],
    args: argparse.Namespace,
    reporter: ProgressReporter,
    report: ReportWriter | None,
) -> RunResult:
    return await registrar.sync_profiles(
        items, concurrency=args.concurrency, progress=reporter, on_problem=report
    )


def _count(path: str, parse: _Parser) -> int:
    with _bulk.open_input(path) as lines:
        return sum(1 for _ in parse(lines, _source(path)))


def _source(path: str) -> str:
    return "standard input" if path == "-" else path


def _fields(lines: Iterable[str], source: str) -> Iterator[tuple[int, list[str]]]:
    """The tab-separated fields of each line that is not blank or a comment, numbered."""
    for number, line in enumerate(lines, 1):
        text = line.rstrip("\r\n")
        if not text.strip() or text.startswith("#"):
            continue
        yield number, text.split("\t")


def pairs_from_lines(lines: Iterable[str], source: str = "input") -> Iterator[tuple[str, str]]:
    """``(localpart, room)`` pairs from ``localpart<TAB>room_id_or_alias`` lines;
    :class:`UsageError` naming the line for one in another shape."""
    for number, fields in _fields(lines, source):
        if len(fields) != 2:
            raise UsageError(
                f"{source} line {number}: expected localpart<TAB>room_id_or_alias, "
                f"found {len(fields)} tab-separated field{'s' if len(fields) != 1 else ''}"
            )
        localpart, room = (field.strip() for field in fields)
        if not localpart or not room:
            missing = "localpart" if not localpart else "room"
            raise UsageError(f"{source} line {number}: the {missing} is empty")
        yield localpart, room


def profiles_from_lines(
    lines: Iterable[str], source: str = "input"
) -> Iterator[tuple[str, str | None, str | None]]:
    """``(localpart, displayname, avatar)`` items from
    ``localpart<TAB>displayname<TAB>avatar_mxc`` lines (an empty or missing last field
    is ``None``); :class:`UsageError` naming the line for one in another shape."""
    for number, fields in _fields(lines, source):
        if not 2 <= len(fields) <= 3:
            raise UsageError(
                f"{source} line {number}: expected localpart<TAB>displayname<TAB>avatar_mxc, "
                f"found {len(fields)} tab-separated field{'s' if len(fields) != 1 else ''}"
            )
        localpart = fields[0].strip()
        if not localpart:
            raise UsageError(f"{source} line {number}: the localpart is empty")
        displayname = fields[1] or None
        avatar = (fields[2].strip() if len(fields) == 3 else "") or None
        yield localpart, displayname, avatar
