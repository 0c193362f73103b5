"""The registration model: namespaces, the registration itself, and checking a file into one.

:class:`Registration` is an attrs value, structured and unstructured by the
cattrs hooks :func:`configure_converter` registers (unknown keys are kept;
the unstable keys get Python names). :func:`check_text` and
:func:`check_file` parse, validate and lint a file, collecting every
:class:`Finding` with its YAML line; :meth:`Registration.load` raises them
instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
import yaml
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from bridge_kit.errors import NotInNamespace, RegistrationError
from bridge_kit.ids import validate_localpart
from bridge_kit.registration import files
from bridge_kit.registration.findings import Finding, SourceMap, sorted_findings
from bridge_kit.registration.lint import lint
from bridge_kit.registration.namespaces import Namespace, Namespaces, in_namespaces, keys_only
from bridge_kit.registration.validate import parse, salvage, validate
from bridge_kit.types.converter import converter, describe_error

__all__ = [
    "CheckResult",
    "Namespace",
    "Namespaces",
    "Registration",
    "check_file",
    "check_text",
    "configure_converter",
]

T = TypeVar("T")


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
    extra: dict[str, Any] = attrs.field(factory=dict, repr=keys_only)

    # -- devices and encryption ---------------------------------------------

    @property
    def device_management(self) -> bool:
        """``io.element.msc4190: true``: the appservice creates and deletes its users'
        devices (``PUT``/``DELETE /devices/{deviceId}``), and may not log them in."""
        return self.msc4190 is True

    @property
    def transaction_extensions(self) -> bool:
        """``org.matrix.msc3202: true``: transactions carry device-list changes and
        one-time-key counts (with the homeserver's experimental option on)."""
        return self.msc3202 is True

    @property
    def ephemeral(self) -> bool:
        """Either ephemeral key is true: typing, receipts, presence and, where the
        homeserver pushes them, to-device messages come in transactions."""
        return self.receive_ephemeral is True or self.push_ephemeral is True

    def missing_encryption_flags(self) -> list[str]:
        """The keys ``generate-registration --encryption`` writes that are not on:
        end-to-end encryption needs devices (MSC4190), device lists and one-time-key
        counts (MSC3202) and to-device events (ephemeral) in transactions."""
        wanted = {
            "io.element.msc4190": self.device_management,
            "org.matrix.msc3202": self.transaction_extensions,
            "receive_ephemeral": self.ephemeral,
        }
        return [key for key, on in wanted.items() if not on]

    # -- loading and saving -------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registration:
        """Read and validate a registration file.

        Raises :class:`~bridge_kit.errors.RegistrationError` naming every
        problem, or why the file cannot be read.
        """
        source = os.fspath(path)
        return cls.loads(files.read_text(source), source=source)

    @classmethod
    def loads(cls, text: str, source: str | None = None) -> Registration:
        """Parse and validate registration YAML; ``source`` names it in messages."""
        result = check_text(text, source)
        if result.registration is None or result.errors:
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
        source = os.fspath(path)
        try:
            files.write_private(Path(path), self.dump(), replace=force)
        except IsADirectoryError:
            raise RegistrationError(["is a directory; give a file name to write"], source) from None
        except FileExistsError:
            raise RegistrationError(
                ["already exists; refusing to overwrite it (pass force=True / --force)"], source
            ) from None
        except OSError as exc:
            problem = f"cannot write the file: {files.os_reason(exc)}"
            raise RegistrationError([problem], source) from None

    # -- validation ---------------------------------------------------------

    def lint(self, domain: str | None = None) -> list[Finding]:
        """Every finding about this registration: errors (if built invalid in code) and warnings.

        ``domain`` is the homeserver's server name; without it, it is guessed
        from the user namespaces (for the sender-in-namespace check).
        The findings have no line: the model does not remember the file it
        came from. :func:`check_text` and :func:`check_file` give lines (and
        warn about the text itself, such as duplicate keys).
        """
        return lint(self, domain)

    # -- namespaces ---------------------------------------------------------

    def is_user_in_namespace(self, user_id: str, exclusive_only: bool = False) -> bool:
        """Does ``user_id`` fall in a user namespace (an exclusive one, if ``exclusive_only``)?

        Synapse semantics: the first namespace whose regex ``re.match``-es the
        full ID decides, including whether it is exclusive.
        """
        return in_namespaces(self.namespaces.users, user_id, exclusive_only)

    def is_alias_in_namespace(self, alias: str, exclusive_only: bool = False) -> bool:
        """Like :meth:`is_user_in_namespace`, for a ``#alias:server``."""
        return in_namespaces(self.namespaces.aliases, alias, exclusive_only)

    def is_room_in_namespace(self, room_id: str, exclusive_only: bool = False) -> bool:
        """Like :meth:`is_user_in_namespace`, for a ``!room:server``."""
        return in_namespaces(self.namespaces.rooms, room_id, exclusive_only)

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
        """The findings that still let the file load, but are probably a mistake."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def notes(self) -> list[Finding]:
        """The findings about what is legal, and usual, but has a consequence worth knowing."""
        return [f for f in self.findings if f.severity == "note"]

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
    result = check_text(files.read_text(source), source)
    exposure = files.permission_problem(source)
    if exposure is not None:
        result.findings.append(Finding("warning", None, None, exposure))
    return result


def check_text(text: str, source: str | None = None) -> CheckResult:
    """Validate and lint registration YAML, collecting every finding; never raises for content."""
    parsed = parse(text)
    if isinstance(parsed, Finding):
        return CheckResult(source, [parsed], None)
    errors = validate(parsed.data, parsed.source_map)
    if errors:
        others = _lint_despite_errors(parsed.data, errors, parsed.source_map)
        return CheckResult(source, sorted_findings(errors + others + parsed.warnings), None)
    try:
        registration = converter.structure(parsed.data, Registration)
    except Exception as exc:  # validation above should make this unreachable
        problem = Finding(
            "error", None, None, f"cannot build the registration: {describe_error(exc)}"
        )
        return CheckResult(source, [problem], None)
    findings = lint(registration, source_map=parsed.source_map) + parsed.warnings
    return CheckResult(source, sorted_findings(findings), registration)


def _lint_despite_errors(
    data: Mapping[Any, Any], errors: list[Finding], source_map: SourceMap
) -> list[Finding]:
    """The lint findings about the valid parts of a registration that has ``errors``.

    An operator fixing the errors should not meet a second round of findings
    afterwards. The invalid values are replaced by stand-ins, and whatever is
    found at the key of an error is dropped (it is about a stand-in, or repeats it).
    """
    try:
        stand_in = converter.structure(salvage(data), Registration)
    except Exception:  # salvage makes the data valid; if not, lint nothing rather than fail
        return []
    failed = [f.field for f in errors if f.field]
    return [
        finding
        for finding in lint(stand_in, source_map=source_map)
        if not (finding.field and any(_same_key(finding.field, bad) for bad in failed))
    ]


def _same_key(a: str, b: str) -> bool:
    """Is one of the dotted key names ``a``, ``b`` the other, or inside it?"""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((f"{short}.", f"{short}["))


# -- wire format ---------------------------------------------------------------

_RENAMES = {
    "push_ephemeral": "de.sorunome.msc2409.push_ephemeral",
    "msc3202": "org.matrix.msc3202",
    "msc4190": "io.element.msc4190",
}
_OMITTED_WHEN_NONE = (
    "rate_limited",
    "receive_ephemeral",
    "push_ephemeral",
    "msc3202",
    "msc4190",
    "protocols",
)


def configure_converter(converter: cattrs.Converter) -> None:
    """Teach ``converter`` the registration's wire format.

    Unknown keys are kept in ``extra`` and written back last; the unstable
    keys are renamed; optional keys absent from a file stay absent.
    """
    _register_hooks(converter, Namespace)
    _register_hooks(converter, Namespaces)
    _register_hooks(converter, Registration, omit_when_none=_OMITTED_WHEN_NONE)


def _register_hooks(
    converter: cattrs.Converter, cls: type[T], omit_when_none: Iterable[str] = ()
) -> None:
    """Structure/unstructure ``cls`` with ``converter``, keeping unknown keys.

    Unlike ``keep_unknown_keys`` this leaves ``init=False`` fields (compiled
    patterns) off the wire and puts unknown keys last.
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
