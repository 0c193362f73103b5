"""The appservice registration file: model, loading, validation, lints and generation.

A registration is the YAML file the homeserver reads at start-up to learn
about an appservice. :meth:`Registration.load` refuses everything Synapse
refuses (and a little more that would break puppet registration), reporting
*all* problems at once as one :class:`~bridge_kit.errors.RegistrationError`
whose lines name the field and the YAML line. :meth:`Registration.lint`
adds warnings for files that load but are probably not what was meant.

>>> reg = generate_registration("bk", "http://localhost:9000", "example.org", "_bk_")
>>> reg.is_user_in_namespace("@_bk_alice:example.org")
True
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import quote, urlsplit

import attrs
import yaml
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from bridge_kit._yaml import Duplicate, KeyPath, YamlError, describe, path_name
from bridge_kit._yaml import load as load_yaml
from bridge_kit.errors import NotInNamespace, RegistrationError
from bridge_kit.ids import localpart_problem, server_name_problem, validate_localpart
from bridge_kit.types.converter import converter, describe_error

__all__ = [
    "CheckResult",
    "Finding",
    "Namespace",
    "Namespaces",
    "Registration",
    "check_file",
    "check_text",
    "generate_registration",
]

T = TypeVar("T")
Severity: TypeAlias = Literal["error", "warning"]

MAX_FILE_BYTES = 1024 * 1024
"""Registration files are a few hundred bytes; anything over this is refused unread."""

MIN_TOKEN_LENGTH = 32
GENERATED_TOKEN_BYTES = 48  # token_urlsafe(48) is 64 characters


@attrs.frozen
class Finding:
    """One problem in a registration: an ``"error"`` (refused) or a ``"warning"`` (lint).

    ``field`` is the dotted key path (``namespaces.users[0].regex``) and
    ``line`` the 1-based YAML line, each ``None`` when unknown.
    """

    severity: Severity
    field: str | None
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"

    def format(self, source: str | None = None) -> str:
        """Compiler-style ``source:line: severity: field: message``."""
        location = source or "<registration>"
        if self.line is not None:
            location += f":{self.line}"
        field = f"{self.field}: " if self.field else ""
        return f"{location}: {self.severity}: {field}{self.message}"


@attrs.frozen
class Namespace:
    """One namespace entry: a ``regex`` matched with :func:`re.match` against full IDs.

    The regex is compiled once, on construction (``re.error`` if it is invalid).
    """

    regex: str
    exclusive: bool
    extra: dict[str, Any] = attrs.field(factory=dict)
    pattern: re.Pattern[str] = attrs.field(init=False, eq=False, repr=False)

    @pattern.default
    def _compile(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    def matches(self, identifier: str) -> bool:
        """True if ``identifier`` (``@user:server``, ``#alias:server``, ``!room:server``) matches.

        Synapse semantics: anchored at the start of the ID, not at the end.
        """
        return self.pattern.match(identifier) is not None


@attrs.frozen
class Namespaces:
    """The ``users``, ``aliases`` and ``rooms`` lists; unknown kinds are kept in ``extra``."""

    users: list[Namespace] = attrs.field(factory=list)
    aliases: list[Namespace] = attrs.field(factory=list)
    rooms: list[Namespace] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Registration:
    """An appservice registration, as Synapse reads it.

    The unstable keys have Python names: ``push_ephemeral`` is
    ``de.sorunome.msc2409.push_ephemeral``, ``msc3202`` is
    ``org.matrix.msc3202`` and ``msc4190`` is ``io.element.msc4190``.
    ``None`` means "absent from the file". Keys bridge_kit does not know are
    kept in ``extra`` and written back by :meth:`dump`.
    """

    id: str
    url: str | None
    as_token: str = attrs.field(repr=False)
    hs_token: str = attrs.field(repr=False)
    sender_localpart: str
    rate_limited: bool | None = None
    receive_ephemeral: bool | None = None
    push_ephemeral: bool | None = None
    msc3202: bool | None = None
    msc4190: bool | None = None
    protocols: list[str] | None = None
    namespaces: Namespaces = attrs.field(factory=Namespaces)
    extra: dict[str, Any] = attrs.field(factory=dict)
    # Where each key was in the YAML it was loaded from (None when built in code).
    _origin: _Origin | None = attrs.field(init=False, default=None, eq=False, repr=False)

    # -- loading and saving -------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registration:
        """Read and validate a registration file.

        Raises :class:`~bridge_kit.errors.RegistrationError` naming every
        problem, or why the file cannot be read.
        """
        source = os.fspath(path)
        return cls.loads(_read_text(source), source=source)

    @classmethod
    def loads(cls, text: str, source: str | None = None) -> Registration:
        """Parse and validate registration YAML; ``source`` names it in messages."""
        result = check_text(text, source)
        if result.registration is None:
            raise RegistrationError([str(f) for f in result.errors], source)
        return result.registration

    def to_dict(self) -> dict[str, Any]:
        """The registration as plain data, keys in Synapse's documented order."""
        data: dict[str, Any] = converter.unstructure(self)
        return data

    def dump(self) -> str:
        """The registration as YAML text (unknown keys included)."""
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        if not text.isascii() and yaml.safe_load(text) != data:
            # PyYAML writes some characters (e.g. U+0085) raw that do not read back: escape all.
            text = yaml.safe_dump(data, sort_keys=False)
        return text

    def write(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Write :meth:`dump` to ``path`` with mode 0600 (it holds secrets).

        An existing file is only replaced (atomically) with ``force=True``;
        otherwise :class:`~bridge_kit.errors.RegistrationError` is raised.
        """
        _write_private(Path(path), self.dump(), replace=force)

    # -- validation ---------------------------------------------------------

    def lint(self, domain: str | None = None) -> list[Finding]:
        """Every finding about this registration: errors (if built invalid in code) and warnings.

        ``domain`` is the homeserver's server name; without it, it is guessed
        from the user namespaces (for the sender-in-namespace check).
        """
        lines = self._origin.lines if self._origin else {}
        findings = _validate(self.to_dict(), lines)
        findings += _lint(self, lines, domain)
        if self._origin:
            findings += self._origin.notes
        return _sorted(findings)

    # -- namespaces ---------------------------------------------------------

    def is_user_in_namespace(self, user_id: str, exclusive_only: bool = False) -> bool:
        """Does ``user_id`` fall in a user namespace (an exclusive one, if ``exclusive_only``)?

        Synapse semantics: the first namespace whose regex ``re.match``-es the
        full ID decides, including whether it is exclusive.
        """
        return _in_namespaces(self.namespaces.users, user_id, exclusive_only)

    def is_alias_in_namespace(self, alias: str, exclusive_only: bool = False) -> bool:
        """Like :meth:`is_user_in_namespace`, for a ``#alias:server``."""
        return _in_namespaces(self.namespaces.aliases, alias, exclusive_only)

    def is_room_in_namespace(self, room_id: str, exclusive_only: bool = False) -> bool:
        """Like :meth:`is_user_in_namespace`, for a ``!room:server``."""
        return _in_namespaces(self.namespaces.rooms, room_id, exclusive_only)

    def user_id(self, localpart: str, domain: str) -> str:
        """The puppet ID ``@localpart:domain``, checked against the grammar and our namespaces.

        Raises :class:`~bridge_kit.errors.InvalidLocalpart` or
        :class:`~bridge_kit.errors.NotInNamespace`.
        """
        validate_localpart(localpart, domain)
        user_id = f"@{localpart}:{domain}"
        if not self.is_user_in_namespace(user_id):
            raise NotInNamespace(user_id)
        return user_id

    def sender_user_id(self, domain: str) -> str:
        """The appservice's own user, ``@sender_localpart:domain``."""
        return f"@{self.sender_localpart}:{domain}"


@attrs.frozen
class _Origin:
    source: str | None
    lines: Mapping[KeyPath, int]
    notes: list[Finding]


@attrs.frozen
class CheckResult:
    """The outcome of checking a registration file: every finding, and the model if valid."""

    source: str | None
    findings: list[Finding]
    registration: Registration | None

    @property
    def errors(self) -> list[Finding]:
        """The findings that make the file invalid."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """The findings that still let the file load."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when the file is valid (warnings allowed)."""
        return self.registration is not None and not self.errors


def check_file(path: str | os.PathLike[str]) -> CheckResult:
    """Validate and lint a registration file, collecting findings instead of raising.

    Raises :class:`~bridge_kit.errors.RegistrationError` only when the file
    cannot be read at all (missing, a directory, not UTF-8, too large).
    """
    source = os.fspath(path)
    return check_text(_read_text(source), source)


def check_text(text: str, source: str | None = None) -> CheckResult:
    """Validate and lint registration YAML, collecting every finding; never raises for content."""
    try:
        document = load_yaml(text)
    except YamlError as exc:
        return CheckResult(source, [_unparsable(exc)], None)
    if document is None:
        return CheckResult(source, [Finding("error", None, None, "the file is empty")], None)
    data, lines, notes = document.data, document.lines, _duplicate_notes(document.duplicates)
    if not isinstance(data, dict):
        return CheckResult(source, [_not_a_mapping(data)], None)
    errors = _validate(data, lines)
    if errors:
        return CheckResult(source, _sorted(errors + notes), None)
    try:
        registration = converter.structure(data, Registration)
    except Exception as exc:  # validation above should make this unreachable
        problem = Finding(
            "error", None, None, f"cannot build the registration: {describe_error(exc)}"
        )
        return CheckResult(source, [problem], None)
    # The origin is load-time metadata, not part of the value; frozen attrs needs this bypass.
    object.__setattr__(registration, "_origin", _Origin(source, lines, notes))
    return CheckResult(source, registration.lint(), registration)


def generate_registration(
    id: str | None,
    url: str | None,
    domain: str,
    user_prefix: str,
    alias_prefix: str | None = None,
    sender_localpart: str | None = None,
    receive_ephemeral: bool = False,
    protocols: Iterable[str] = (),
    keep_from: Registration | None = None,
) -> Registration:
    """A new registration with fresh 64-character tokens and exclusive, anchored namespaces.

    Users get ``^@PREFIX.*:DOMAIN$`` (and aliases ``^#PREFIX.*:DOMAIN$``),
    escaped. ``rate_limited`` is explicitly false. With ``keep_from`` the
    ``id`` and both tokens are taken from that registration, so a homeserver
    that loaded the old file keeps working; ``id`` may then be ``None``.
    """
    problems = _generation_problems(id, domain, user_prefix, alias_prefix, keep_from)
    if url is not None and not _is_http_url(url):
        problems.append(f"url {url!r}: must be an http:// or https:// URL (or None)")
    if keep_from is not None:
        id, as_token, hs_token = keep_from.id, keep_from.as_token, keep_from.hs_token
    else:
        as_token = secrets.token_urlsafe(GENERATED_TOKEN_BYTES)
        hs_token = secrets.token_urlsafe(GENERATED_TOKEN_BYTES)
    if sender_localpart is None and id:
        sender_localpart = _default_sender(id)
    if sender_localpart is not None and (reason := _sender_problem(sender_localpart)):
        problems.append(f"sender localpart {sender_localpart!r}: {reason}")
    if problems or not id or sender_localpart is None:  # the last two imply a problem
        raise RegistrationError(problems)
    server = re.escape(domain)
    registration = Registration(
        id=id,
        url=url,
        as_token=as_token,
        hs_token=hs_token,
        sender_localpart=sender_localpart,
        rate_limited=False,
        receive_ephemeral=receive_ephemeral or None,
        protocols=list(protocols) or None,
        namespaces=Namespaces(
            users=[Namespace(f"^@{re.escape(user_prefix)}.*:{server}$", exclusive=True)],
            aliases=(
                [Namespace(f"^#{re.escape(alias_prefix)}.*:{server}$", exclusive=True)]
                if alias_prefix
                else []
            ),
        ),
    )
    errors = [f for f in registration.lint(domain) if f.severity == "error"]
    if errors:
        raise RegistrationError([str(f) for f in errors])
    return registration


# -- wire format ---------------------------------------------------------------

_RENAMES = {
    "push_ephemeral": "de.sorunome.msc2409.push_ephemeral",
    "msc3202": "org.matrix.msc3202",
    "msc4190": "io.element.msc4190",
}


def _register_hooks(cls: type[T], omit_when_none: Iterable[str] = ()) -> None:
    """Structure/unstructure ``cls`` with the project converter, keeping unknown keys.

    Unlike ``keep_unknown_keys`` this leaves ``init=False`` fields (compiled
    patterns, load origin) off the wire and puts unknown keys last.
    """
    omit = set(omit_when_none)
    overrides: dict[str, Any] = {}
    known: set[str] = set()
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        if not field.init or field.name == "extra":
            overrides[field.name] = override(omit=True)
            continue
        wire = _RENAMES.get(field.name, field.name)
        known.add(wire)
        overrides[field.name] = override(rename=wire, omit_if_default=field.name in omit)
    struct = make_dict_structure_fn(cls, converter, **overrides)
    unstruct = make_dict_unstructure_fn(cls, converter, **overrides)

    def structure(value: Mapping[str, Any], _: Any) -> T:
        obj = struct(value, cls)
        extra = {k: v for k, v in value.items() if k not in known}
        return attrs.evolve(obj, extra=extra) if extra else obj  # type: ignore[misc]

    def unstructure(obj: T) -> dict[str, Any]:
        out: dict[str, Any] = unstruct(obj)
        for key, value in getattr(obj, "extra").items():  # noqa: B009
            out.setdefault(key, value)
        return out

    converter.register_structure_hook(cls, structure)
    converter.register_unstructure_hook(cls, unstructure)


_register_hooks(Namespace)
_register_hooks(Namespaces)
_register_hooks(
    Registration,
    omit_when_none=(
        "rate_limited",
        "receive_ephemeral",
        "push_ephemeral",
        "msc3202",
        "msc4190",
        "protocols",
    ),
)


# -- reading and writing files -------------------------------------------------


def _read_text(source: str) -> str:
    def refuse(problem: str) -> RegistrationError:
        return RegistrationError([problem], source)

    try:
        info = os.stat(source)
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory, not a registration file")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file")
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read the file: {_os_reason(exc)}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES} bytes; a registration file is tiny YAML")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise refuse(
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "a registration file is YAML"
        ) from None


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    source = os.fspath(path)
    if path.is_dir():
        raise RegistrationError(["is a directory; give a file name to write"], source)
    try:
        if replace:
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        else:
            fd, temporary = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), None
    except FileExistsError:
        raise RegistrationError(
            ["already exists; refusing to overwrite it (pass force=True / --force)"], source
        ) from None
    except OSError as exc:
        raise RegistrationError([f"cannot write the file: {_os_reason(exc)}"], source) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: the file holds both tokens
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if temporary is not None:
            os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise RegistrationError([f"cannot write the file: {_os_reason(exc)}"], source) from None


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


# -- findings about the YAML itself ---------------------------------------------------


def _unparsable(exc: YamlError) -> Finding:
    column = "" if exc.column is None else f" (column {exc.column})"
    return Finding("error", None, exc.line, f"cannot parse YAML{column}: {exc.reason}")


def _duplicate_notes(duplicates: list[Duplicate]) -> list[Finding]:
    return [
        Finding(
            "warning",
            path_name(duplicate.path),
            duplicate.line,
            f"duplicate key (also on line {duplicate.previous_line}); the last one wins",
        )
        for duplicate in duplicates
    ]


def _not_a_mapping(data: Any) -> Finding:
    return Finding(
        "error",
        None,
        1,
        f"the top level must be a mapping of keys (id, url, as_token, ...), not {describe(data)}",
    )


# -- validation (errors) -------------------------------------------------------------

_REQUIRED_STRINGS = {
    "id": "a unique name for this appservice",
    "as_token": "the token the appservice sends to the homeserver",
    "hs_token": "the token the homeserver sends to the appservice",
    "sender_localpart": "the localpart of the appservice's own user",
}
_NAMESPACE_KINDS = {"users": "@", "aliases": "#", "rooms": "!"}
_OPTIONAL_BOOLS = ("rate_limited", "receive_ephemeral", "de.sorunome.msc2409.push_ephemeral")
_STRICT_BOOLS = ("org.matrix.msc3202", "io.element.msc4190")  # Synapse refuses even null
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class _Report:
    """Collects findings, resolving each key path to its nearest known YAML line."""

    def __init__(self, lines: Mapping[KeyPath, int]) -> None:
        self.lines = lines
        self.findings: list[Finding] = []

    def error(self, path: KeyPath, message: str) -> None:
        self.findings.append(Finding("error", path_name(path) or None, self._line(path), message))

    def warn(self, path: KeyPath, message: str) -> None:
        self.findings.append(Finding("warning", path_name(path) or None, self._line(path), message))

    def _line(self, path: KeyPath) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


def _validate(data: Mapping[Any, Any], lines: Mapping[KeyPath, int]) -> list[Finding]:
    """Everything Synapse refuses at start-up, plus what would break puppet registration."""
    report = _Report(lines)
    for key, meaning in _REQUIRED_STRINGS.items():
        _check_required_string(report, data, key, meaning)
    _check_url(report, data)
    _check_namespaces(report, data)
    for key in _OPTIONAL_BOOLS:
        if data.get(key) is not None and not isinstance(data[key], bool):
            report.error((key,), f"must be true or false, not {describe(data[key])}")
    for key in _STRICT_BOOLS:
        if key in data and not isinstance(data[key], bool):
            report.error((key,), f"must be true or false if present, not {describe(data[key])}")
    _check_string_list(report, data, "protocols", allow_null=True)
    _check_string_list(report, data, "io.element.msc4502.scopes", allow_null=False)
    _check_proxy(report, data)
    _check_ip_ranges(report, data)
    return report.findings


def _check_required_string(
    report: _Report, data: Mapping[Any, Any], key: str, meaning: str
) -> None:
    if key not in data:
        report.error((key,), f"missing: required, a string ({meaning})")
        return
    value = data[key]
    if not isinstance(value, str):
        report.error((key,), f"must be a string, not {describe(value)}")
    elif not value:
        report.error((key,), "must not be empty")
    elif key == "id" and "|" in value:
        report.error((key,), "must not contain '|' (Synapse refuses it)")
    elif key in ("as_token", "hs_token") and not _HEADER_SAFE.fullmatch(value):
        report.error(
            (key,),
            "contains spaces, control or non-ASCII characters, which cannot be sent "
            "in an Authorization header",
        )
    elif key == "sender_localpart" and quote(value) != value:
        changed = ", ".join(repr(c) for c in sorted({c for c in value if quote(c) != c}))
        report.error((key,), f"contains {changed}, changed by URL quoting; Synapse refuses it")


def _check_url(report: _Report, data: Mapping[Any, Any]) -> None:
    if "url" not in data:
        report.error(("url",), "missing: required, the appservice's URL (or null for no traffic)")
    elif data["url"] is not None and not isinstance(data["url"], str):
        report.error(("url",), f"must be a URL string or null, not {describe(data['url'])}")


def _check_namespaces(report: _Report, data: Mapping[Any, Any]) -> None:
    namespaces = data.get("namespaces")
    if "namespaces" not in data:
        report.error(("namespaces",), "missing: required, a mapping of users/aliases/rooms lists")
        return
    if not isinstance(namespaces, dict):
        report.error(
            ("namespaces",),
            f"must be a mapping of users/aliases/rooms lists, not {describe(namespaces)}",
        )
        return
    for kind in _NAMESPACE_KINDS:
        if kind not in namespaces:
            continue
        entries = namespaces[kind]
        path: KeyPath = ("namespaces", kind)
        if not isinstance(entries, list):
            report.error(
                path, f"must be a list of {{regex, exclusive}} entries, not {describe(entries)}"
            )
            continue
        for index, entry in enumerate(entries):
            _check_namespace_entry(report, (*path, index), entry)


def _check_namespace_entry(report: _Report, path: KeyPath, entry: Any) -> None:
    if not isinstance(entry, dict):
        report.error(path, f"must be a mapping with regex and exclusive, not {describe(entry)}")
        return
    regex = entry.get("regex")
    if "regex" not in entry:
        report.error((*path, "regex"), "missing: required, a regular expression string")
    elif not isinstance(regex, str):
        report.error((*path, "regex"), f"must be a string, not {describe(regex)}")
    else:
        try:
            re.compile(regex)
        except re.error as exc:
            report.error((*path, "regex"), f"is not a valid regular expression: {exc}")
        except (RecursionError, OverflowError, ValueError) as exc:
            report.error((*path, "regex"), f"is not a usable regular expression: {exc}")
    if "exclusive" not in entry:
        report.error((*path, "exclusive"), "missing: required, true or false")
    elif not isinstance(entry["exclusive"], bool):
        report.error(
            (*path, "exclusive"), f"must be true or false, not {describe(entry['exclusive'])}"
        )


def _check_string_list(
    report: _Report, data: Mapping[Any, Any], key: str, *, allow_null: bool
) -> None:
    if key not in data or (allow_null and data[key] is None):
        return
    values = data[key]
    if not isinstance(values, list):
        report.error((key,), f"must be a list of strings, not {describe(values)}")
        return
    for index, value in enumerate(values):
        if not isinstance(value, str):
            report.error((key, index), f"must be a string, not {describe(value)}")


def _check_proxy(report: _Report, data: Mapping[Any, Any]) -> None:
    keys = ("io.element.msc4512.proxy_prefix", "io.element.msc4512.proxy_url")
    present = [key for key in keys if data.get(key) is not None]
    for key in present:
        if not isinstance(data[key], str) or not data[key]:
            report.error((key,), f"must be a non-empty string, not {describe(data[key])}")
    if len(present) == 1:
        missing = next(key for key in keys if key not in present)
        report.error((present[0],), f"must be set together with {missing}")


def _check_ip_ranges(report: _Report, data: Mapping[Any, Any]) -> None:
    ranges = data.get("ip_range_whitelist")
    if not ranges:
        return
    if not isinstance(ranges, list):
        report.error(
            ("ip_range_whitelist",), f"must be a list of IP ranges, not {describe(ranges)}"
        )
        return
    for index, value in enumerate(ranges):
        try:
            ipaddress.ip_network(value, strict=False)
        except (ValueError, TypeError):
            report.error(("ip_range_whitelist", index), f"is not an IP range: {describe(value)}")


# -- lints (warnings) -------------------------------------------------------------------

_UNESCAPED_SERVER_DOT = re.compile(r"(?<=[A-Za-z0-9-])(?<!\\)\.(?=[A-Za-z0-9])")
_LITERAL_SERVER = re.compile(r"(?:[A-Za-z0-9-]|\\[.-])+(?:\\?:[0-9]+)?")
_REGEX_META = set(".^$*+?{}[]()|")
_QUANTIFIERS = ("*", "?", "{")


def _lint(reg: Registration, lines: Mapping[KeyPath, int], domain: str | None) -> list[Finding]:
    report = _Report(lines)
    if not reg.namespaces.users:
        report.warn(
            ("namespaces", "users"),
            "no user namespace: this appservice cannot register puppets (fine for a plain bot)",
        )
    for kind, sigil in _NAMESPACE_KINDS.items():
        for index, namespace in enumerate(getattr(reg.namespaces, kind)):
            _lint_regex(report, ("namespaces", kind, index, "regex"), namespace.regex, kind, sigil)
    for kind in reg.namespaces.extra:
        report.warn(
            ("namespaces", kind), "unknown namespace kind (Synapse knows users, aliases, rooms)"
        )
    _lint_tokens(report, reg)
    _lint_sender(report, reg, domain)
    _lint_url(report, reg.url)
    if reg.rate_limited is None:
        report.warn(
            ("rate_limited",),
            "missing: Synapse then defaults it to true and rate-limits every puppet; "
            "set it to false for a bridge",
        )
    return report.findings


def _lint_regex(report: _Report, path: KeyPath, regex: str, kind: str, sigil: str) -> None:
    noun = {"users": "user", "aliases": "alias", "rooms": "room"}[kind]
    if not _can_start_with(regex, sigil):
        report.warn(
            path,
            f"can never match: {noun} IDs start with '{sigil}' and Synapse matches from "
            f"the start of the ID; write e.g. '^{sigil}_prefix_.*:example\\.org$'",
        )
        return
    if kind == "rooms":
        return
    if not regex.endswith("$") or regex.endswith("\\$"):
        report.warn(
            path,
            "is not anchored at the end ('$'): it also matches IDs on other servers "
            "whose name merely starts with yours",
        )
    server = regex.rpartition(":")[2]
    if ":" in regex and _UNESCAPED_SERVER_DOT.search(server):
        report.warn(
            path, "has an unescaped '.' in the server name; write '\\.' to match a dot only"
        )
    if kind == "users":
        prefix = _literal_prefix(regex, sigil).partition(":")[0]
        problem = localpart_problem(prefix) if prefix else None
        if problem and problem != "must not be empty":
            report.warn(
                path,
                f"every localpart it matches starts with {prefix!r}, which {problem}; "
                "bridge_kit will refuse to register such puppets",
            )


def _lint_tokens(report: _Report, reg: Registration) -> None:
    if hmac.compare_digest(reg.as_token.encode(), reg.hs_token.encode()):
        report.warn(
            ("hs_token",),
            "is the same as as_token; anyone who learns one can impersonate both sides",
        )
    for key in ("as_token", "hs_token"):
        token: str = getattr(reg, key)
        if len(token) < MIN_TOKEN_LENGTH:
            report.warn(
                (key,),
                f"is only {len(token)} characters; use at least {MIN_TOKEN_LENGTH} random "
                "characters (bridge-kit generate-registration makes 64)",
            )


def _lint_sender(report: _Report, reg: Registration, domain: str | None) -> None:
    problem = localpart_problem(reg.sender_localpart)
    if problem:
        report.warn(("sender_localpart",), f"is outside the user-ID grammar: it {problem}")
    domains = [domain] if domain else _guess_domains(reg) or ["example.org"]
    for server in domains:
        sender = f"@{reg.sender_localpart}:{server}"
        for namespace in reg.namespaces.users:
            if namespace.exclusive and namespace.matches(sender):
                report.warn(
                    ("sender_localpart",),
                    f"is inside this appservice's own exclusive user namespace "
                    f"{namespace.regex!r}; harmless, but it is not a puppet",
                )
                return


def _lint_url(report: _Report, url: str | None) -> None:
    if url is None:
        report.warn(
            ("url",), "is null: the homeserver will send no events or queries to the appservice"
        )
        return
    if not _is_http_url(url):
        report.warn(("url",), f"is not an http(s) URL ({url!r}); the homeserver cannot reach it")


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _can_start_with(regex: str, sigil: str) -> bool:
    """False only when the regex surely needs a first character other than ``sigil``."""
    if "|" in regex:
        return True  # alternatives: each branch could start differently
    rest = regex
    while rest.startswith(("^", "\\A")):
        rest = rest[1:] if rest.startswith("^") else rest[2:]
    if not rest or rest[1:2] in _QUANTIFIERS:
        return True
    first = rest[0]
    if first == "\\":
        escaped = rest[1:2]
        return escaped.isalnum() or escaped == sigil or not escaped
    return first in _REGEX_META or first == sigil


def _literal_prefix(regex: str, sigil: str) -> str:
    """The literal text every match must start with after the sigil ('' when unsure)."""
    rest = regex.removeprefix("^")
    if not rest.startswith(sigil) or "|" in rest:
        return ""
    rest = rest[1:]
    prefix: list[str] = []
    index = 0
    while index < len(rest):
        char = rest[index]
        if char == "\\":
            literal = rest[index + 1 : index + 2]
            if not literal or literal.isalnum():
                break
            step = 2
        elif char in _REGEX_META:
            break
        else:
            literal, step = char, 1
        if rest[index + step : index + step + 1] in _QUANTIFIERS:
            break
        prefix.append(literal)
        index += step
    return "".join(prefix)


def _guess_domains(reg: Registration) -> list[str]:
    """Server names spelled out literally at the end of user namespace regexes."""
    domains = []
    for namespace in reg.namespaces.users:
        server = namespace.regex.rpartition(":")[2].removesuffix("$")
        if ":" in namespace.regex and _LITERAL_SERVER.fullmatch(server):
            domains.append(re.sub(r"\\(.)", r"\1", server))
    return domains


# -- generation ------------------------------------------------------------------------


def _generation_problems(
    id: str | None,
    domain: str,
    user_prefix: str,
    alias_prefix: str | None,
    keep_from: Registration | None,
) -> list[str]:
    problems = []
    if keep_from is not None:
        if id is not None and id != keep_from.id:
            problems.append(
                f"id {id!r} differs from the kept registration's id {keep_from.id!r}; "
                "keeping the tokens keeps the id too"
            )
    elif not id:
        problems.append("id: required (a unique name for this appservice)")
    elif "|" in id:
        problems.append(f"id {id!r}: must not contain '|'")
    domain_problem = server_name_problem(domain)
    if domain_problem:
        problems.append(f"domain {domain!r}: {domain_problem}")
    if not user_prefix:
        problems.append("user prefix: must not be empty (it would claim every user of the server)")
    else:
        prefix_problem = localpart_problem(user_prefix)
        if prefix_problem:
            problems.append(f"user prefix {user_prefix!r}: {prefix_problem}")
    if alias_prefix is not None and (not alias_prefix or re.search(r"[:\s]", alias_prefix)):
        problems.append(f"alias prefix {alias_prefix!r}: must be non-empty, without ':' or spaces")
    return problems


def _default_sender(id: str) -> str:
    return re.sub(r"[^a-z0-9._\-/]", "_", id.lower()) + "bot"


def _sender_problem(localpart: str) -> str | None:
    if quote(localpart) != localpart:
        return "must not change under URL quoting (no '=', '+', spaces or non-ASCII)"
    return localpart_problem(localpart)


# -- helpers ------------------------------------------------------------------------------------


def _in_namespaces(namespaces: list[Namespace], identifier: str, exclusive_only: bool) -> bool:
    for namespace in namespaces:
        if namespace.pattern.match(identifier):
            return namespace.exclusive or not exclusive_only
    return False


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.line is None, f.line or 0))
