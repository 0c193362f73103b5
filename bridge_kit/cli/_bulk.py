"""What the bulk commands (``register``, ``join``, ``sync-profiles``) share.

The options that say where to work (``-c``, ``-r``, ``--homeserver``,
``--store``, ``--concurrency``, ``--report``, ``--no-progress``), the set-up
(registration, store, client, the homeserver's domain, the registrar with its
bot), the progress bar, Ctrl-C (finish the requests in flight, save, exit
130/143), the ``--report`` file, the list of problems and the exit status:
0 when nothing failed, 1 when something did (or the run was aborted), 2 for a
usage or set-up error.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bridge_kit import defaults
from bridge_kit.app.runner import ExitCode, StopSignals
from bridge_kit.checks.homeserver import homeserver_domain
from bridge_kit.cli.report import ReportWriter
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.config import Config
from bridge_kit.errors import UsageError
from bridge_kit.intent import Intent
from bridge_kit.intent.state_store import RoomStateStore
from bridge_kit.puppets import BulkResult, PuppetRegistrar
from bridge_kit.puppets.progress import ProgressReporter
from bridge_kit.puppets.results import RunResult
from bridge_kit.registration import Registration
from bridge_kit.registration.files import os_reason
from bridge_kit.store import Store, open_store, parse_store_url, redact_store_url

#: Invalid items and failures listed on the terminal; --report has them all.
LISTED = 50

Result = BulkResult | RunResult
#: ``await run(registrar, items, reporter, report)``: the command's bulk call.
BulkCall = Callable[
    [PuppetRegistrar, Iterable[Any], ProgressReporter, ReportWriter | None], Awaitable[Result]
]


def add_where_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c``, ``-r`` and ``--homeserver``: which appservice, on which homeserver."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="take the homeserver, registration, store and concurrency from the daemon config",
    )
    parser.add_argument(
        "-r",
        "--registration",
        help=f"the appservice registration file (default: {defaults.REGISTRATION_FILE})",
    )
    parser.add_argument(
        "--homeserver",
        help="the homeserver's client-server URL, e.g. http://localhost:8008",
    )


def add_run_arguments(parser: argparse.ArgumentParser, requests: str) -> None:
    """``--concurrency``, ``--store``, ``--report`` and ``--no-progress``."""
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help=f"{requests} in flight at most (default {defaults.CONCURRENCY}; 429s lower it)",
    )
    parser.add_argument("--store", metavar="URL", help=f"the store (default {defaults.STORE_URL})")
    parser.add_argument(
        "--report", metavar="FILE.json", help="write the counts and every failure as JSON"
    )
    parser.add_argument("--no-progress", action="store_true", help="print no progress lines")


def apply_config(args: argparse.Namespace) -> None:
    """Fill what the flags left unset from ``--config``, else from the defaults."""
    if args.config is None:
        args.registration = args.registration or defaults.REGISTRATION_FILE
        args.store = parse_store_url(args.store or defaults.STORE_URL).url
        if args.concurrency is None:
            args.concurrency = defaults.CONCURRENCY
        return
    config = Config.load(args.config)
    args.registration = args.registration or str(config.registration_path)
    args.homeserver = args.homeserver or config.homeserver.url
    args.store = parse_store_url(args.store).url if args.store else config.appservice.store
    if args.concurrency is None:
        args.concurrency = config.puppets.concurrency


def check_arguments(args: argparse.Namespace) -> None:
    """The checks every bulk command makes before anything is opened."""
    if not args.homeserver:
        raise UsageError("no homeserver: give --homeserver URL, or -c config.yaml")
    if not 1 <= args.concurrency <= defaults.MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be between 1 and {defaults.MAX_CONCURRENCY}")
    if args.from_file and args.from_file != "-" and not Path(args.from_file).is_file():
        problem = "is a directory" if Path(args.from_file).is_dir() else "no such file"
        raise UsageError(f"--from-file {args.from_file}: {problem}")
    if args.report and not Path(args.report).absolute().parent.is_dir():
        raise UsageError(f"--report {args.report}: its directory does not exist")


async def execute(
    args: argparse.Namespace,
    stop: StopSignals,
    registration: Registration,
    *,
    items: Callable[[], contextlib.AbstractContextManager[Iterable[Any]]],
    total: int | None,
    call: BulkCall,
) -> int:
    """Set up, run ``call`` over ``items()`` with a progress bar, report; the exit status."""
    store = open_store(args.store)
    # join and sync-profiles run two stages (registrations, then their own requests),
    # each with up to --concurrency in flight: one must not wait for the other's connections.
    client = HomeserverClient(
        args.homeserver, registration.as_token, max_connections=max(100, 2 * args.concurrency)
    )
    async with client, store:
        domain = await homeserver_domain(client, registration)
        registrar = PuppetRegistrar(
            client,
            store,
            registration,
            domain,
            room_state=_room_state(client, store, registration, domain),
        )
        reporter = ProgressReporter(total=total, enabled=not args.no_progress)
        stop.on_stop(lambda: _cancel(registrar, stop.received))
        if stop.received is not None:
            # Stopped while setting up: there was no run to cancel, so none starts.
            return 128 + stop.received
        with items() as inputs, _report_writer(args) as report:
            result = await call(registrar, inputs, reporter, report)
            reporter.finish(result)
            _list_problems(result, sys.stdout)
            if report is not None:
                _write_report(report, _report(args, registration, result))
    if result.cancelled and stop.received is not None:
        return 128 + stop.received
    return ExitCode.OK if result.ok else ExitCode.FAILED


def _room_state(
    client: HomeserverClient, store: Store, registration: Registration, domain: str
) -> RoomStateStore[Intent]:
    """The store's room state, with the appservice's bot (which resolves aliases and
    invites puppets a join refused) as a daemon has it."""
    bot = Intent(client, registration.sender_user_id(domain), None)
    state = RoomStateStore(store, lambda: bot)
    bot.room_state = state
    return state


def _cancel(registrar: PuppetRegistrar, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "stop"
    print(
        f"\n{name}: finishing the requests in flight and saving progress "
        "(signal again to quit at once)",
        file=sys.stderr,
    )
    registrar.cancel()


@contextlib.contextmanager
def open_input(path: str) -> Iterator[TextIO]:
    """``--from-file``: the file, or standard input for ``-``; a clear error if unreadable."""
    if path == "-":
        yield sys.stdin
        return
    try:
        file = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as error:
        raise UsageError(f"--from-file {path}: {error.strerror}") from error
    with file:
        try:
            yield file
        except UnicodeDecodeError as error:
            raise UsageError(f"--from-file {path} is not UTF-8 text: {error}") from error


def _list_problems(result: Result, out: TextIO) -> None:
    for title, problems, count in (
        (_invalid_title(result), result.invalid_reasons, result.invalid),
        ("refused by the homeserver", result.failures, result.failed),
    ):
        if not problems:
            continue
        out.write(f"{title}:\n")
        for item, reason in itertools.islice(problems.items(), LISTED):
            out.write(f"  {item!r}: {reason}\n")
        # The result keeps only the first ones: the count is the whole story.
        if count > LISTED:
            out.write(f"  ... and {count - LISTED:,} more (see --report)\n")


def _invalid_title(result: Result) -> str:
    what = "localparts" if isinstance(result, BulkResult) else "lines"
    return f"invalid {what} (never sent)"


def _report(args: argparse.Namespace, registration: Registration, result: Result) -> dict[str, Any]:
    return {
        "registration": registration.id,
        "homeserver": args.homeserver,
        "store": redact_store_url(args.store),
        **result.to_json(),
    }


@contextlib.contextmanager
def _report_writer(args: argparse.Namespace) -> Iterator[ReportWriter | None]:
    """The report's writer, spooling every problem as the run finds it (or None)."""
    if not args.report:
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            writer = stack.enter_context(ReportWriter(Path(args.report)))
        except OSError as error:
            raise UsageError(f"--report {args.report}: {os_reason(error)}") from error
        yield writer


def _write_report(writer: ReportWriter, report: dict[str, Any]) -> None:
    """Write atomically and privately (see :meth:`ReportWriter.write`)."""
    if writer.path.is_dir():
        raise UsageError(f"--report {writer.path}: is a directory")
    try:
        writer.write(report)
    except OSError as error:
        raise UsageError(f"--report {writer.path}: {os_reason(error)}") from error
