"""The registration doctor: what only shows when a registration meets the others, or its daemon.

``bridge-kit check --homeserver-config homeserver.yaml`` compares a
registration with every other one the homeserver loads
(:func:`homeserver_findings`); ``bridge-kit check -c config.yaml`` compares
it with the daemon's config (:func:`daemon_findings`). Each finding comes
with the file it is about, for ``file:line: severity: ...`` output.

Namespace overlaps are decided by :func:`bridge_kit.registration.regex.overlap`:
a proof of disjointness (literal prefixes or suffixes), a witness (an ID both
regexes match), or "cannot decide", which is a warning, never an error.
"""

from __future__ import annotations

import hmac
import importlib.util
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import yarl

from bridge_kit._extras import install_extra
from bridge_kit._yaml import KeyPath, YamlError
from bridge_kit._yaml import load as load_yaml
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError, RegistrationError
from bridge_kit.registration import Namespace, Registration, check_file
from bridge_kit.registration.files import read_text
from bridge_kit.registration.findings import Finding, Report, SourceMap
from bridge_kit.registration.regex import literal_suffix, overlap
from bridge_kit.registration.validate import NAMESPACE_KINDS, ParsedText, parse
from bridge_kit.store.url import parse_store_url

__all__ = [
    "Located",
    "daemon_findings",
    "homeserver_checked",
    "homeserver_findings",
    "listed_registrations",
]

Located = tuple[str, Finding]
"""A finding and the file it is about (the name to print before its line)."""

_NOUNS = {"users": "user", "aliases": "alias", "rooms": "room"}
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "*"}  # noqa: S104 - names, not a bind


@attrs.frozen
class _Other:
    """Another registration the homeserver loads: where it is, and what it says."""

    path: str
    registration: Registration

    @property
    def name(self) -> str:
        return f"{self.path} (id {self.registration.id!r})"


# -- the homeserver's other registrations ------------------------------------------


def listed_registrations(homeserver_config: str) -> list[str]:
    """The registration files ``homeserver.yaml`` lists, relative ones made absolute.

    Relative paths are taken from the folder of ``homeserver.yaml``. Raises
    :class:`ConfigError` when the file cannot be read or the list is malformed.
    """
    source = Path(homeserver_config)
    try:
        document = load_yaml(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the homeserver config {source}: {exc}") from None
    except YamlError as exc:
        raise ConfigError(f"{source}: malformed YAML: {exc}") from None
    data = document.data if document is not None else None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: not a homeserver config (the top level is not a mapping)")
    listed = data.get("app_service_config_files") or []
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ConfigError(f"{source}: app_service_config_files must be a list of file names")
    base = source.absolute().parent
    return [os.path.normpath(base / Path(entry).expanduser()) for entry in listed]


def homeserver_findings(
    path: str, registration: Registration, homeserver_config: str
) -> list[Located]:
    """Overlaps and duplicates between ``registration`` and the homeserver's other ones."""
    listed = listed_registrations(homeserver_config)
    report = Report(_source_map(path))
    located: list[Located] = []
    others: list[_Other] = []
    own_listed = False
    for entry in listed:
        if _same_file(entry, path):
            own_listed = True
        else:
            other, problem = _load_other(entry)
            if other is not None:
                others.append(other)
            if problem is not None:
                located.append((homeserver_config, problem))
    if not own_listed:
        message = (
            f"is not listed in app_service_config_files of {homeserver_config}, so the "
            "homeserver does not load it: add its absolute path and restart the homeserver"
        )
        located.append((path, Finding("warning", None, None, message)))
    for other in others:
        _compare(report, registration, other)
    located += [(path, finding) for finding in report.findings]
    located += [(homeserver_config, f) for f in _duplicates_among(others)]
    return located


def homeserver_checked(path: str, homeserver_config: str) -> str:
    """What :func:`homeserver_findings` looked at, for a doctor that found nothing to say."""
    others = [e for e in listed_registrations(homeserver_config) if not _same_file(e, path)]
    compared = (
        f"no overlap or duplicate with the {len(others)} other registration"
        f"{'' if len(others) == 1 else 's'} it lists"
        if others
        else "it lists no other registration"
    )
    return f"listed in app_service_config_files of {homeserver_config}; {compared}"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _load_other(path: str) -> tuple[_Other | None, Finding | None]:
    """The other registration, or why it was not compared (an error if the homeserver fails)."""
    if not os.path.lexists(path):
        return None, Finding(
            "error",
            "app_service_config_files",
            None,
            f"{path} does not exist: the homeserver will not start",
        )
    try:
        result = check_file(path)
    except RegistrationError as exc:
        reason = "; ".join(exc.problems)
        return None, Finding(
            "warning",
            "app_service_config_files",
            None,
            f"{path}: {reason}; it was not compared (run this as a user who can read it)",
        )
    if result.registration is None:
        first = result.errors[0] if result.errors else None
        return None, Finding(
            "error",
            "app_service_config_files",
            None,
            f"{path} is invalid ({first}), so it was not compared; the homeserver refuses "
            f"most such files at start-up: see bridge-kit check -r {path}",
        )
    return _Other(path, result.registration), None


def _compare(report: Report, ours: Registration, other: _Other) -> None:
    theirs = other.registration
    if ours.id == theirs.id:
        report.error(
            ("id",),
            f"is also the id of {other.path}: the homeserver refuses to start with two "
            "registrations of one id",
        )
    for key, consequence in _TOKEN_CONSEQUENCES.items():
        if _same_secret(getattr(ours, key), getattr(theirs, key)):
            report.error((key,), f"is also the {key} of {other.name}: {consequence}")
    if ours.url is not None and theirs.url is not None and _same_url(ours.url, theirs.url):
        report.error(
            ("url",),
            f"is also the url of {other.name}: the homeserver sends both appservices' "
            "transactions and queries to one place, where one of them gets the other's",
        )
    for kind in NAMESPACE_KINDS:
        for index, namespace in enumerate(getattr(ours.namespaces, kind)):
            path: KeyPath = ("namespaces", kind, index, "regex")
            for their_namespace in getattr(theirs.namespaces, kind):
                _compare_namespaces(report, path, kind, namespace, their_namespace, other)


_TOKEN_CONSEQUENCES = {
    "as_token": ("the homeserver refuses to start, as it could not tell the two appservices apart"),
    "hs_token": "either appservice could pose as the homeserver to the other; give each its own",
}


def _compare_namespaces(
    report: Report, path: KeyPath, kind: str, ours: Namespace, theirs: Namespace, other: _Other
) -> None:
    if not (ours.exclusive or theirs.exclusive):
        return  # shared non-exclusive namespaces are allowed, and usual
    verdict = overlap(ours.regex, theirs.regex)
    noun = _NOUNS[kind]
    their = f"{'exclusive ' if theirs.exclusive else ''}{noun} namespace '{theirs.regex}'"
    if verdict.kind == "disjoint":
        return
    if not verdict.certain:
        report.warn(
            path,
            f"may overlap the {their} of {other.name}: the doctor could not decide (it "
            "found no ID matching both, and no proof that there is none); check by hand",
        )
        return
    both = "is the same regex" if verdict.example is None else f"both match {verdict.example}"
    report.error(path, f"overlaps the {their} of {other.name}: {both}; {_who_loses(ours, theirs)}")


def _who_loses(ours: Namespace, theirs: Namespace) -> str:
    if ours.exclusive and theirs.exclusive:
        return (
            "both claim such IDs exclusively, so neither appservice can create them (M_EXCLUSIVE)"
        )
    if theirs.exclusive:
        return "this appservice gets M_EXCLUSIVE when it creates one of those IDs"
    return "the other appservice gets M_EXCLUSIVE when it creates one of those IDs"


def _duplicates_among(others: list[_Other]) -> Iterator[Finding]:
    """Ids and tokens two of the other registrations share: the homeserver will not start."""
    for index, first in enumerate(others):
        for second in others[index + 1 :]:
            a, b = first.registration, second.registration
            shared = [
                key
                for key in ("as_token", "hs_token")
                if _same_secret(getattr(a, key), getattr(b, key))
            ]
            if a.id == b.id:
                shared.insert(0, "id")
            if shared:
                yield Finding(
                    "error",
                    "app_service_config_files",
                    None,
                    f"{first.path} and {second.path} share their {' and '.join(shared)}",
                )


def _same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _same_url(a: str, b: str) -> bool:
    def normal(url: str) -> tuple[Any, ...]:
        try:
            parsed = yarl.URL(url.rstrip("/"))
        except ValueError:
            return (url,)
        return (parsed.scheme.lower(), (parsed.host or "").lower(), parsed.port, parsed.path)

    return normal(a) == normal(b)


def _source_map(path: str) -> SourceMap:
    try:
        parsed = parse(read_text(path))
    except RegistrationError:
        return SourceMap()
    return parsed.source_map if isinstance(parsed, ParsedText) else SourceMap()


# -- the daemon's config -----------------------------------------------------------------


def daemon_findings(config: Config, path: str, registration: Registration) -> list[Located]:
    """What in ``config`` disagrees with the registration at ``path``, or cannot work."""
    source = str(config.source or "<config>")
    report = Report(_source_map(path))
    _check_listener(report, config, registration)
    _check_domain(report, config, registration)
    _check_encryption(report, config, registration)
    located = [(path, finding) for finding in report.findings]
    located += [(source, finding) for finding in _store_findings(config)]
    if not _same_file(str(config.registration_path), path):
        message = f"names the registration {config.registration_path}, not {path}"
        located.append((source, Finding("warning", "appservice.registration", None, message)))
    return located


def _check_encryption(report: Report, config: Config, registration: Registration) -> None:
    if not config.encryption.enabled:
        return
    missing = registration.missing_encryption_flags()
    if missing:
        report.error(
            (missing[0],),
            f"encryption.enabled is on in {config.source}, but the registration lacks "
            f"{', '.join(missing)} (write it with `bridge-kit generate-registration "
            "--encryption`, then restart the homeserver)",
        )
    for module in ("vodozemac", "cryptography"):  # the e2ee extra
        if importlib.util.find_spec(module) is None:
            report.error(
                (),
                f"encryption.enabled is on in {config.source}, but {module} is not installed: "
                f"{install_extra('e2ee')}",
            )


def _check_listener(report: Report, config: Config, registration: Registration) -> None:
    if registration.url is None:
        return  # the registration lint already says what a null url means
    try:
        url = yarl.URL(registration.url)
        url_port = url.port
    except ValueError:
        return  # likewise for an unusable url
    host, port = config.appservice.host, config.appservice.port
    if url_port is not None and url_port != port:
        report.warn(
            ("url",),
            f"points at port {url_port}, but the daemon listens on port {port} "
            f"(appservice.port in {config.source}): fine only behind a proxy that forwards "
            f"{url_port} to {port}",
        )
    problem = _host_problem(host, url.host or "")
    if problem:
        report.warn(("url",), f"{problem} (appservice.host in {config.source})")


def _host_problem(listen: str, target: str) -> str | None:
    if listen in _WILDCARD_HOSTS:
        return None
    if _is_loopback(listen) and not _is_loopback(target):
        return (
            f"points at {target}, but the daemon listens on {listen}, which only this machine "
            "can reach: fine only if a proxy on this machine forwards to it"
        )
    if _is_loopback(target) and not _is_loopback(listen):
        return (
            f"points at {target} (this machine's loopback), but the daemon listens only on "
            f"{listen}, so connections to {target} are refused"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_domain(report: Report, config: Config, registration: Registration) -> None:
    domain = config.homeserver.domain
    if domain is None:
        return  # the daemon asks the homeserver (whoami); nothing to compare offline
    for kind in ("users", "aliases"):
        for index, namespace in enumerate(getattr(registration.namespaces, kind)):
            server = _literal_server(namespace.regex)
            if server is not None and server != domain:
                report.error(
                    ("namespaces", kind, index, "regex"),
                    f"only matches {_NOUNS[kind]} IDs on {server}, but the daemon's domain is "
                    f"{domain} (homeserver.domain in {config.source}): no puppet or alias of "
                    "this bridge could match it",
                )


def _literal_server(regex: str) -> str | None:
    """The server name a ``$``-anchored regex spells out after the ID's first ``:``."""
    suffix = literal_suffix(regex)
    if not suffix or ":" not in suffix:
        return None
    return suffix.partition(":")[2]  # a localpart has no ':', so the first one ends it


def _store_findings(config: Config) -> Iterator[Finding]:
    """What stops the store from opening; the URL itself is never shown (it may hold a password)."""
    try:
        store = parse_store_url(config.appservice.store)
    except Exception as exc:  # Config.load checked it; say so rather than fail if not
        yield Finding("error", "appservice.store", None, f"is not a usable store URL: {exc}")
        return
    if store.kind == "memory":
        yield Finding(
            "warning",
            "appservice.store",
            None,
            "is memory://: registered puppets, processed transactions and the inbox are "
            "forgotten at every restart (fine for tests only)",
        )
    elif store.kind == "sqlite":
        yield from _sqlite_findings(Path(store.target))
    elif importlib.util.find_spec("asyncpg") is None:
        yield Finding(
            "error",
            "appservice.store",
            None,
            f"is a PostgreSQL URL, but asyncpg is not installed: {install_extra('postgres')}",
        )


def _sqlite_findings(path: Path) -> Iterator[Finding]:
    folder = path.parent
    problem = None
    if path.exists() and not path.is_file():
        problem = f"{path} exists but is not a file"
    elif not folder.is_dir():
        problem = f"the SQLite file's folder {folder} does not exist"
    elif not os.access(folder, os.W_OK):
        # SQLite creates its journal files beside the database, so the folder matters too.
        problem = f"the SQLite file's folder {folder} is not writable by this user"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = f"{path} is not writable by this user"
    if problem is not None:
        yield Finding("error", "appservice.store", None, problem)
