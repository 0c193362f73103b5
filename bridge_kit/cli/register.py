"""``bridge-kit register``: register puppets in bulk, resumably.

Exit status (:class:`~bridge_kit.app.runner.ExitCode`): 0 when every localpart is
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
from collections.abc import Iterable, Iterator

from bridge_kit import defaults
from bridge_kit.app.runner import StopSignals, run_app
from bridge_kit.cli import _bulk
from bridge_kit.cli.report import ReportWriter
from bridge_kit.errors import UsageError
from bridge_kit.puppets import BulkResult, PuppetRegistrar, localparts_from_lines
from bridge_kit.puppets.progress import ProgressReporter
from bridge_kit.registration import Registration

#: Invalid localparts and failures listed on the terminal; --report has them all.
LISTED = _bulk.LISTED

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
    _bulk.add_where_arguments(parser)
    parser.add_argument("localparts", nargs="*", metavar="LOCALPART", help="puppets to register")
    parser.add_argument(
        "--from-file",
        metavar="FILE",
        help="read localparts from FILE, one per line ('-' for standard input)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check and look up everything, send nothing"
    )
    _bulk.add_run_arguments(parser, "register requests")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    """Run ``bridge-kit register``; returns the exit status."""
    _bulk.apply_config(args)
    _check_arguments(args)
    return run_app(lambda stop: _register(args, stop))


def _check_arguments(args: argparse.Namespace) -> None:
    if args.homeserver and not args.localparts and not args.from_file:
        raise UsageError(
            "nothing to register: give localparts as arguments or --from-file FILE ('-' for stdin)"
        )
    _bulk.check_arguments(args)


async def _register(args: argparse.Namespace, stop: StopSignals) -> int:
    registration = Registration.load(args.registration)
    # Counting reads the whole file once, so a bad file fails before anything is sent.
    total = _count(args)

    async def call(
        registrar: PuppetRegistrar,
        localparts: Iterable[str],
        reporter: ProgressReporter,
        report: ReportWriter | None,
    ) -> BulkResult:
        return await registrar.register_many(
            localparts,
            concurrency=args.concurrency,
            progress=reporter,
            dry_run=args.dry_run,
            on_problem=report,
        )

    return await _bulk.execute(
        args, stop, registration, items=lambda: _localparts(args), total=total, call=call
    )


@contextlib.contextmanager
def _localparts(args: argparse.Namespace) -> Iterator[Iterable[str]]:
    if not args.from_file:
        yield args.localparts
        return
    with _bulk.open_input(args.from_file) as lines:
        yield itertools.chain(args.localparts, localparts_from_lines(lines))


def _count(args: argparse.Namespace) -> int | None:
    """How many localparts the input holds, for the ETA; unknown for stdin."""
    if args.from_file == "-":
        return None
    count = len(args.localparts)
    if args.from_file:
        with _bulk.open_input(args.from_file) as lines:
            count += sum(1 for _ in localparts_from_lines(lines))
    return count
