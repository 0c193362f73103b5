"""``bridge-kit check``: validate and lint a registration, and compare it with its surroundings.

Exit status (:class:`~bridge_kit.app.runner.ExitCode`): 0 when nothing is wrong
(warnings and notes allowed); 1 when the registration (or, with ``-c``, the
config) is invalid or unreadable, or the doctor found an error such as an
exclusive namespace overlap or a shared id, token or url; 2 when the check
could not run (a homeserver config that cannot be read, or a failed
``--homeserver`` check).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from bridge_kit import defaults
from bridge_kit.app.runner import ExitCode
from bridge_kit.checks.doctor import (
    Located,
    daemon_findings,
    homeserver_checked,
    homeserver_findings,
)
from bridge_kit.checks.homeserver import check_against_homeserver
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError, RegistrationError
from bridge_kit.registration import CheckResult, Registration, check_file
from bridge_kit.registration.files import secret_config_problem
from bridge_kit.registration.findings import Finding

__all__ = ["add_parser", "check"]

_EPILOG = """\
Exit status: 0 if nothing is wrong (warnings and notes allowed); 1 if the
registration or config is invalid, or the doctor found an overlap or a
duplicate; 2 if the check could not run.
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` to the ``bridge-kit`` sub-commands."""
    parser = subparsers.add_parser(
        "check",
        help="validate and lint a registration file (and compare it with its surroundings)",
        description=(
            "Print one line per finding (error, warning or note). With --homeserver-config, "
            "compare the registration with every other one the homeserver loads; with -c, "
            "with the daemon's config."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument(
        "-r",
        "--registration",
        metavar="FILE",
        help=f"registration file (default: the config's, else {defaults.REGISTRATION_FILE})",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="the daemon's config: check it, and that it agrees with the registration",
    )
    parser.add_argument(
        "--homeserver-config",
        metavar="FILE",
        help="the homeserver's homeserver.yaml: compare with the registrations it lists",
    )
    parser.add_argument(
        "--homeserver",
        metavar="URL",
        help="also ask this homeserver whoami and have it ping us (we serve /ping meanwhile); "
        "with device flags, try MSC4190 with a test device",
    )
    parser.set_defaults(command=check)


def check(args: argparse.Namespace) -> int:
    """Run ``bridge-kit check``; return the exit status."""
    config = None
    if args.config is not None:
        try:
            config = Config.load(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)  # the config is what is being checked: found, not failed
            return ExitCode.FAILED
    config_failed = config is not None and _print_config_exposure(config)
    path = args.registration or (
        str(config.registration_path) if config else defaults.REGISTRATION_FILE
    )
    try:
        result = check_file(path)
    except RegistrationError as exc:
        # An unreadable file is what check is there to find, like an invalid one.
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return ExitCode.FAILED
    _print_findings(path, result.findings)
    print(f"{path}: {_verdict(result)}")
    failed = not result.ok or config_failed
    if result.registration is not None:
        located = _doctor(args, config, path, result.registration)
        failed = _print_located(located) or failed
        if not located:
            _print_nothing_found(args, config, path)
    if failed:
        return ExitCode.FAILED
    if args.homeserver and result.registration is not None:
        lines = asyncio.run(
            check_against_homeserver(result.registration, args.homeserver, args.homeserver_config)
        )
        print("\n".join(lines))
    return ExitCode.OK


def _print_config_exposure(config: Config) -> bool:
    """Say whether the config file is too open for the secrets it holds; True if every
    user may read it (the daemon refuses to start then)."""
    if config.source is None:
        return False
    refused = False
    for key in config.secrets_in_file:
        problem = secret_config_problem(str(config.source), key)
        if problem is not None:
            world, message = problem
            print(f"{config.source}: {'error' if world else 'warning'}: {message}")
            refused = refused or world
    return refused


def _doctor(
    args: argparse.Namespace, config: Config | None, path: str, registration: Registration
) -> list[Located]:
    located: list[Located] = []
    if args.homeserver_config is not None:
        located += homeserver_findings(path, registration, args.homeserver_config)
    if config is not None:
        located += daemon_findings(config, path, registration)
    return located


def _print_nothing_found(args: argparse.Namespace, config: Config | None, path: str) -> None:
    """Say that the doctor ran, and what it compared, when it found nothing."""
    checked = []
    if args.homeserver_config is not None:
        checked.append(homeserver_checked(path, args.homeserver_config))
    if config is not None:
        checked.append(f"agrees with {config.source or 'the config'}")
    if checked:
        print(f"doctor: no problems: {'; '.join(checked)}")


def _print_findings(source: str, findings: Sequence[Finding]) -> None:
    for finding in findings:
        print(finding.format(source))


def _print_located(located: list[Located]) -> bool:
    """Print the doctor's findings and a summary of them; True if one is an error."""
    if not located:
        return False
    for source, finding in located:
        print(finding.format(source))
    findings = [finding for _, finding in located]
    print(f"doctor: {_counts(findings)}")
    return any(f.severity == "error" for f in findings)


def _verdict(result: CheckResult) -> str:
    counts = _counts(result.findings)
    word = "valid" if result.ok else "invalid"
    return f"{word} ({counts})" if counts else word


def _counts(findings: Sequence[Finding]) -> str:
    parts = []
    for severity, noun in (("error", "error"), ("warning", "warning"), ("note", "note")):
        number = sum(1 for f in findings if f.severity == severity)
        if number:
            parts.append(f"{number} {noun}{'' if number == 1 else 's'}")
    return ", ".join(parts)
