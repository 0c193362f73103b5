"""``bridge-kit register``: register puppets in bulk, resumably.

Exit status (:class:`~bridge_kit.runner.ExitCode`): 0 when every localpart is
registered (or already was); 1 when some were invalid or refused, or the run
was aborted; 2 for a usage or set-up error (bad registration file, config,
store, homeserver); 128 + the signal number (130, 143) when SIGINT or SIGTERM
cancelled the run.

With ``-c config.yaml`` the homeserver, registration, store and concurrency
come from the daemon's config (a relative store path is relative to the
config file, as for the daemon); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bridge_kit import defaults
from bridge_kit.client import HomeserverClient
from bridge_kit.commands.report import ReportWriter
from bridge_kit.config import Config
from bridge_kit.diagnose import homeserver_domain
from bridge_kit.errors import UsageError
from bridge_kit.progress import ProgressReporter
from bridge_kit.puppets import BulkResult, PuppetRegistrar, localparts_from_lines
from bridge_kit.registration import Registration
from bridge_kit.registration.files import os_reason
from bridge_kit.runner import ExitCode, StopSignals, run_app
from bridge_kit.store import open_store, parse_store_url, redact_store_url

#: Invalid localparts and failures listed on the terminal; --report has them all.
LISTED = 50

_EPILOG = f"""\
Localparts come from the arguments and/or --from-file (one per line; blank
lines and # comments are skipped). Each is checked locally first (spec
grammar, 255-byte user IDs, the registration's user namespaces); invalid ones
are listed and never sent. Puppets the store knows are skipped without a
request, so running the same command again resumes an interrupted run.

With -c CONFIG the homeserver, registration, store and concurrency come from
the daemon's config file (flags override them), so both use the same store.
Without it the store defaults to {defaults.STORE_URL}, i.e. the file
bridge_kit.db in the current directory.

Exit status: 0 if nothing failed or was invalid; 1 otherwise (or aborted);
2 for a usage or set-up error; 130/143 when cancelled by SIGINT/SIGTERM.
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``register`` to the ``bridge-kit`` sub-commands."""
    parser = subparsers.add_parser(
        "register",
        help="register puppets in bulk (resumable)",
        description="Register many puppets on the homeserver, streaming, resumably.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``register``, on any parser."""
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
    parser.add_argument("localparts", nargs="*", metavar="LOCALPART", help="puppets to register")
    parser.add_argument(
        "--from-file",
        metavar="FILE",
        help="read localparts from FILE, one per line ('-' for standard input)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help=f"register requests in flight at most (default {defaults.CONCURRENCY}; 429s lower it)",
    )
    parser.add_argument("--store", metavar="URL", help=f"the store (default {defaults.STORE_URL})")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and look up everything, send nothing"
    )
    parser.add_argument(
        "--report", metavar="FILE.json", help="write the counts and every failure as JSON"
    )
    parser.add_argument("--no-progress", action="store_true", help="print no progress lines")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    """Run ``bridge-kit register``; returns the exit status."""
    _apply_config(args)
    _check_arguments(args)
    return run_app(lambda stop: _register(args, stop))


def _apply_config(args: argparse.Namespace) -> None:
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


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.homeserver:
        raise UsageError("no homeserver: give --homeserver URL, or -c config.yaml")
    if not args.localparts and not args.from_file:
        raise UsageError(
            "nothing to register: give localparts as arguments or --from-file FILE ('-' for stdin)"
        )
    if not 1 <= args.concurrency <= defaults.MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be between 1 and {defaults.MAX_CONCURRENCY}")
    if args.from_file and args.from_file != "-" and not Path(args.from_file).is_file():
        problem = "is a directory" if Path(args.from_file).is_dir() else "no such file"
        raise UsageError(f"--from-file {args.from_file}: {problem}")
    if args.report and not Path(args.report).absolute().parent.is_dir():
        raise UsageError(f"--report {args.report}: its directory does not exist")


async def _register(args: argparse.Namespace, stop: StopSignals) -> int:
    registration = Registration.load(args.registration)
    # Counting reads the whole file once, so a bad file fails before anything is sent.
    total = _count(args)
    store = open_store(args.store)
    client = HomeserverClient(
        args.homeserver, registration.as_token, max_connections=max(100, args.concurrency)
    )
    async with client, store:
        domain = await homeserver_domain(client, registration)
        registrar = PuppetRegistrar(client, store, registration, domain)
        reporter = ProgressReporter(total=total, enabled=not args.no_progress)
        stop.on_stop(lambda: _cancel(registrar, stop.received))
        with _localparts(args) as localparts, _report_writer(args) as report:
            result = await registrar.register_many(
                localparts,
                concurrency=args.concurrency,
                progress=reporter,
                dry_run=args.dry_run,
                on_problem=report,
            )
            reporter.finish(result)
            _list_problems(result, sys.stdout)
            if report is not None:
                _write_report(report, _report(args, registration, result))
    if result.cancelled and stop.received is not None:
        return 128 + stop.received
    return ExitCode.OK if result.ok else ExitCode.FAILED


def _cancel(registrar: PuppetRegistrar, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "stop"
    print(
        f"\n{name}: finishing the requests in flight and saving progress "
        "(signal again to quit at once)",
        file=sys.stderr,
    )
    registrar.cancel()


@contextlib.contextmanager
def _localparts(args: argparse.Namespace) -> Iterator[Iterable[str]]:
    if not args.from_file:
        yield args.localparts
        return
    with _open_input(args.from_file) as lines:
        yield itertools.chain(args.localparts, localparts_from_lines(lines))


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[TextIO]:
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


def _count(args: argparse.Namespace) -> int | None:
    """How many localparts the input holds, for the ETA; unknown for stdin."""
    if args.from_file == "-":
        return None
    count = len(args.localparts)
    if args.from_file:
        with _open_input(args.from_file) as lines:
            count += sum(1 for _ in localparts_from_lines(lines))
    return count


def _list_problems(result: BulkResult, out: TextIO) -> None:
    for title, problems, count in (
        ("invalid localparts (never sent)", result.invalid_reasons, result.invalid),
        ("refused by the homeserver", result.failures, result.failed),
    ):
        if not problems:
            continue
        out.write(f"{title}:\n")
        for localpart, reason in itertools.islice(problems.items(), LISTED):
            out.write(f"  {localpart!r}: {reason}\n")
        # The result keeps only the first ones: the count is the whole story.
        if count > LISTED:
            out.write(f"  ... and {count - LISTED:,} more (see --report)\n")


def _report(
    args: argparse.Namespace, registration: Registration, result: BulkResult
) -> dict[str, Any]:
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
