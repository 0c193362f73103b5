"""Lints: findings about registrations that Synapse loads but that are probably not what was meant.

Mostly warnings. Two kinds of finding are errors although Synapse accepts
them: public or placeholder tokens (whoever reads them is the bridge, or its
homeserver). Notes are for what is legal and usual, but worth knowing
(an uppercase ``sender_localpart``).

:func:`lint` is the full check of a :class:`~bridge_kit.registration.Registration`:
the validation errors (for one built invalid in code) and every lint finding,
placed at their YAML lines when given the loader's :class:`SourceMap`.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, Protocol
from urllib.parse import urlsplit

from bridge_kit._yaml import KeyPath
from bridge_kit.ids import localpart_problem
from bridge_kit.registration.findings import Finding, Report, SourceMap, sorted_findings
from bridge_kit.registration.namespaces import Namespaces
from bridge_kit.registration.regex import nested_quantifier
from bridge_kit.registration.validate import NAMESPACE_KINDS, validate

__all__ = ["EXAMPLE_TOKENS", "MIN_TOKEN_LENGTH", "is_http_url", "lint", "token_placeholder"]

MIN_TOKEN_LENGTH = 32


class Lintable(Protocol):
    """What the lints read of a :class:`~bridge_kit.registration.Registration`.

    A protocol, because the model runs the lints when it loads a file."""

    @property
    def url(self) -> str | None: ...
    @property
    def as_token(self) -> str: ...
    @property
    def hs_token(self) -> str: ...
    @property
    def sender_localpart(self) -> str: ...
    @property
    def rate_limited(self) -> bool | None: ...
    @property
    def receive_ephemeral(self) -> bool | None: ...
    @property
    def push_ephemeral(self) -> bool | None: ...
    @property
    def msc3202(self) -> bool | None: ...
    @property
    def msc4190(self) -> bool | None: ...
    @property
    def namespaces(self) -> Namespaces: ...

    def to_dict(self) -> dict[str, Any]: ...


EXAMPLE_TOKENS = {
    "as_token": "REPLACE_ME_as_token_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "hs_token": "REPLACE_ME_hs_token_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH",
}
"""The tokens of ``registration.yaml.example``: public, so never acceptable (a test keeps them
equal to the file's). The file is not installed with the package, hence the copy."""

# Words people leave in a token they meant to replace, without case or separators. All
# are 8+ letters: the chance that a random 64-character token contains one is negligible.
_PLACEHOLDERS = {
    "replaceme": "REPLACE_ME",
    "changeme": "CHANGE_ME",
    "changethis": "CHANGE_THIS",
    "placeholder": "placeholder",
    "yourtoken": "YOUR_TOKEN",
    "tokenhere": "TOKEN_HERE",
}

_UNESCAPED_SERVER_DOT = re.compile(r"(?<=[A-Za-z0-9-])(?<!\\)\.(?=[A-Za-z0-9])")
_LITERAL_SERVER = re.compile(r"(?:[A-Za-z0-9-]|\\[.-])+(?:\\?:[0-9]+)?")
_REGEX_META = set(".^$*+?{}[]()|")
_QUANTIFIERS = ("*", "?", "{")


def lint(
    registration: Lintable,
    domain: str | None = None,
    *,
    source_map: SourceMap | None = None,
) -> list[Finding]:
    """Every finding about ``registration``: errors (if built invalid in code) and warnings.

    ``domain`` is the homeserver's server name; without it, it is guessed
    from the user namespaces (for the sender-in-namespace check).
    ``source_map`` is where each key was in the YAML the registration was
    loaded from; without it the findings have no line.
    """
    source_map = source_map or SourceMap()
    findings = validate(registration.to_dict(), source_map)
    findings += _warnings(registration, source_map, domain)
    return sorted_findings(findings)


def is_http_url(url: str) -> bool:
    """Is ``url`` an ``http://`` or ``https://`` URL with a host?"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _warnings(reg: Lintable, source_map: SourceMap, domain: str | None) -> list[Finding]:
    report = Report(source_map)
    if not reg.namespaces.users:
        report.warn(
            ("namespaces", "users"),
            "no user namespace: this appservice cannot register puppets (fine for a plain bot)",
        )
    for kind, sigil in NAMESPACE_KINDS.items():
        for index, namespace in enumerate(getattr(reg.namespaces, kind)):
            _lint_regex(report, ("namespaces", kind, index, "regex"), namespace.regex, kind, sigil)
    for kind in reg.namespaces.extra:
        report.warn(
            ("namespaces", kind), "unknown namespace kind (Synapse knows users, aliases, rooms)"
        )
    _lint_tokens(report, reg)
    _lint_sender(report, reg, domain)
    _lint_url(report, reg.url)
    _lint_devices(report, reg)
    if reg.rate_limited is None:
        report.warn(
            ("rate_limited",),
            "missing: Synapse then defaults it to true and rate-limits every puppet; "
            "set it to false for a bridge",
        )
    return report.findings


#: The ':' of a regex's own syntax (``(?:``, ``(?i:``), not a server name's.
_GROUP_SYNTAX = re.compile(r"\(\?[aiLmsux-]*:")


def _lint_regex(report: Report, path: KeyPath, regex: str, kind: str, sigil: str) -> None:
    noun = {"users": "user", "aliases": "alias", "rooms": "room"}[kind]
    if not _can_start_with(regex, sigil):
        report.warn(
            path,
            f"can never match: {noun} IDs start with '{sigil}' and Synapse matches from "
            f"the start of the ID; write e.g. '^{sigil}_prefix_.*:example\\.org$'",
        )
        return
    if nested_quantifier(regex):
        report.warn(
            path,
            "has a nested quantifier (a repeated group that contains a repeat, like (a+)+): "
            "matching an ID that almost fits can take exponential time (catastrophic "
            "backtracking), and the homeserver and the bridge match IDs against it on every "
            f"event; repeat once, e.g. '^{sigil}_prefix_.*:example\\.org$'",
        )
    if kind == "rooms":
        if ":" in _GROUP_SYNTAX.sub("", regex):
            report.warn(
                path,
                "names a server (':'), but rooms of version 12 and later have IDs without "
                "one (MSC4291, e.g. '!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM'): it "
                "never matches them",
            )
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


def token_placeholder(key: str, token: str) -> str | None:
    """Why ``token`` (the value of ``key``) is public or a placeholder, or ``None``."""
    for example in EXAMPLE_TOKENS.values():
        if hmac.compare_digest(token.encode(), example.encode()):
            return (
                "is the public example token of registration.yaml.example: anyone can "
                "read it and impersonate "
                + ("the appservice" if key == "as_token" else "the homeserver")
                + "; generate fresh tokens (bridge-kit generate-registration)"
            )
    squashed = re.sub(r"[^a-z]", "", token.lower())
    for word, shown in _PLACEHOLDERS.items():
        if word in squashed:
            return (
                f"contains the placeholder {shown!r}: replace it with a long random token "
                "(bridge-kit generate-registration makes them)"
            )
    return None


def _lint_tokens(report: Report, reg: Lintable) -> None:
    for key in ("as_token", "hs_token"):
        problem = token_placeholder(key, getattr(reg, key))
        if problem:
            report.error((key,), problem)
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


def _lint_sender(report: Report, reg: Lintable, domain: str | None) -> None:
    known = [domain] if domain else _guess_domains(reg)
    domains = known or ["example.org"]
    problem = localpart_problem(reg.sender_localpart)
    if problem and localpart_problem(reg.sender_localpart.lower()) is None:
        # Every mautrix-generated registration has one: legal for a bot that exists.
        server = known[0] if known else "<server>"
        report.note(
            ("sender_localpart",),
            f"has uppercase letters, so the bot's user ID (@{reg.sender_localpart}:"
            f"{server}) has them too: the spec allows that for users that already "
            "exist, not for new ones; fine for an existing bridge, but a new registration "
            "should use lowercase",
        )
    elif problem:
        report.warn(("sender_localpart",), f"is outside the user-ID grammar: it {problem}")
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


def _lint_devices(report: Report, reg: Lintable) -> None:
    if reg.msc4190 is True:
        report.note(
            ("io.element.msc4190",),
            "is on: the homeserver then requires inhibit_login: true on every puppet "
            "registration (bridge_kit always sends it) and refuses "
            "m.login.application_service logins; the bridge creates devices itself",
        )
    if reg.msc3202 is True and not (reg.receive_ephemeral or reg.push_ephemeral):
        report.warn(
            ("org.matrix.msc3202",),
            "is on without receive_ephemeral: to-device messages (which encryption needs) "
            "only come in transactions with the ephemeral keys on",
        )


def _lint_url(report: Report, url: str | None) -> None:
    if url is None:
        report.warn(
            ("url",), "is null: the homeserver will send no events or queries to the appservice"
        )
        return
    if not is_http_url(url):
        report.warn(("url",), f"is not an http(s) URL ({url!r}); the homeserver cannot reach it")


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


def _guess_domains(reg: Lintable) -> list[str]:
    """Server names spelled out literally at the end of user namespace regexes."""
    domains = []
    for namespace in reg.namespaces.users:
        server = namespace.regex.rpartition(":")[2].removesuffix("$")
        if ":" in namespace.regex and _LITERAL_SERVER.fullmatch(server):
            domains.append(re.sub(r"\\(.)", r"\1", server))
    return domains
