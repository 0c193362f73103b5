"""The ``bridge-kit`` command line.

Each subcommand is a small ``_cmd_<name>(args) -> int`` function registered in
:func:`_build_parser`; :func:`main` turns every
:class:`~bridge_kit.errors.BridgeKitError` into a short message on stderr and
exit status 2, so a user never sees a traceback. Every command uses the one
table of exit codes, :class:`~bridge_kit.app.runner.ExitCode`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from bridge_kit import defaults
from bridge_kit._version import __version__
from bridge_kit.app.runner import ExitCode, report_error
from bridge_kit.cli import check, dead_letters, demo, encryption, join, register, run
from bridge_kit.errors import BridgeKitError, UsageError
from bridge_kit.registration import Registration, generate_registration

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit where it cannot be caught
    except BrokenPipeError:
        # The reader went away (``bridge-kit ... | head -1``): it has all it wanted.
        _silence_stdout()
        return ExitCode.SIGPIPE
    return code


def _run(argv: list[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except BridgeKitError as exc:
        report_error(exc)
        return ExitCode.SETUP
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.SIGINT


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again
    (what Python's documentation of SIGPIPE recommends)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridge-kit",
        description="Tools for Matrix application services (bridges).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_generate_registration(subcommands)
    check.add_parser(subcommands)
    register.add_parser(subcommands)
    join.add_parsers(subcommands)
    run.add_parser(subcommands)
    dead_letters.add_parser(subcommands)
    encryption.add_parser(subcommands)
    demo.add_parser(subcommands)
    return parser


# -- generate-registration -------------------------------------------------------


def _add_generate_registration(
    subcommands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subcommands.add_parser(
        "generate-registration",
        help="write a new registration file with fresh tokens",
        description=(
            "Write a registration with 64-character random tokens and exclusive, anchored "
            "namespaces (^@PREFIX.*:DOMAIN$). The file gets mode 0600."
        ),
    )
    parser.add_argument("--id", help="unique appservice ID (not needed with --keep-tokens)")
    parser.add_argument("--url", required=True, help="where the homeserver reaches the appservice")
    parser.add_argument("--domain", required=True, help="the homeserver's server name")
    parser.add_argument(
        "--user-prefix", required=True, metavar="PREFIX", help="puppet localpart prefix, e.g. _irc_"
    )
    parser.add_argument(
        "--alias-prefix", metavar="PREFIX", help="room alias prefix (no alias namespace without it)"
    )
    parser.add_argument(
        "--sender-localpart", metavar="NAME", help="the bridge bot's localpart (default: <id>bot)"
    )
    parser.add_argument(
        "--receive-ephemeral", action="store_true", help="ask for typing, receipts and presence"
    )
    parser.add_argument(
        "--device-management",
        action="store_true",
        help="let the bridge create its users' devices (io.element.msc4190: true)",
    )
    parser.add_argument(
        "--encryption",
        action="store_true",
        help="devices plus to-device messages, device lists and one-time-key counts "
        "(io.element.msc4190, org.matrix.msc3202 and the ephemeral keys)",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        default=[],
        metavar="NAME",
        dest="protocols",
        help="third-party protocol the bridge serves (repeatable)",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=defaults.REGISTRATION_FILE,
        metavar="FILE",
        help="output file, '-' for stdout (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument(
        "--keep-tokens",
        action="store_true",
        help="regenerate FILE in place, keeping its id, as_token and hs_token",
    )
    parser.set_defaults(command=_cmd_generate_registration)


def _cmd_generate_registration(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    keep_from = None
    if args.keep_tokens:
        if to_stdout:
            raise UsageError("--keep-tokens needs -o FILE naming the existing registration")
        keep_from = Registration.load(args.output)
    elif args.id is None:
        raise UsageError("--id is required (unless --keep-tokens reuses an existing file's id)")
    elif not to_stdout and Path(args.output).exists() and not args.force:
        raise UsageError(
            f"{args.output}: already exists; use --force to overwrite it, "
            "or --keep-tokens to regenerate it with the same id and tokens"
        )
    registration = generate_registration(
        args.id,
        args.url,
        args.domain,
        args.user_prefix,
        alias_prefix=args.alias_prefix,
        sender_localpart=args.sender_localpart,
        receive_ephemeral=args.receive_ephemeral,
        protocols=args.protocols,
        keep_from=keep_from,
        device_management=args.device_management,
        encryption=args.encryption,
    )
    # A new bridge with encryption gets its pickle key here; a regenerated one keeps
    # the key its config has (another would leave the stored state unreadable).
    advice = _pickle_key_advice() if args.encryption and keep_from is None else ""
    if to_stdout:
        sys.stdout.write(registration.dump())
        sys.stderr.write(advice)  # stdout is the registration file
        return ExitCode.OK
    # --keep-tokens exists to rewrite that very file, so it implies replacing it.
    registration.write(args.output, force=args.force or args.keep_tokens)
    kept = " (id and tokens kept)" if keep_from else ""
    print(
        f"wrote {args.output}{kept}; add its absolute path to app_service_config_files "
        "in homeserver.yaml and restart the homeserver"
    )
    sys.stdout.write(advice)
    return ExitCode.OK


def _pickle_key_advice() -> str:
    """A fresh ``encryption.pickle_key``, as the lines to put in the daemon's config."""
    return (
        "put these lines in the daemon's config (config.yaml), which then holds a secret: "
        "keep it mode 0600 (the daemon refuses one every user can read). Set the key "
        "before the first start and never change it: the stored crypto state and "
        "double-puppet tokens are sealed with it.\n"
        "encryption:\n"
        "  enabled: true\n"
        f"  pickle_key: {secrets.token_hex(32)}\n"
    )
