"""Validation of raw registration YAML: everything Synapse refuses, found all at once.

:func:`parse` turns the text into data and a :class:`SourceMap` (or the one
error that stops it); :func:`validate` then checks that data as Synapse's
appservice loader would, plus what would break puppet registration, and
reports every problem with its field and line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from bridge_kit._yaml import Duplicate, KeyPath, YamlError, describe, path_name
from bridge_kit._yaml import load as load_yaml
from bridge_kit.registration.findings import Finding, Report, SourceMap

__all__ = ["NAMESPACE_KINDS", "ParsedText", "parse", "salvage", "validate"]

NAMESPACE_KINDS = {"users": "@", "aliases": "#", "rooms": "!"}
"""The namespace kinds Synapse knows, each with the sigil its IDs start with."""

_REQUIRED_STRINGS = {
    "id": "a unique name for this appservice",
    "as_token": "the token the appservice sends to the homeserver",
    "hs_token": "the token the homeserver sends to the appservice",
    "sender_localpart": "the localpart of the appservice's own user",
}
_OPTIONAL_BOOLS = ("rate_limited", "receive_ephemeral", "de.sorunome.msc2409.push_ephemeral")
_STRICT_BOOLS = ("org.matrix.msc3202", "io.element.msc4190")  # Synapse refuses even null
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class ParsedText(NamedTuple):
    """YAML text that is a mapping: its data, where each key is, and warnings about the text."""

    data: Mapping[Any, Any]
    source_map: SourceMap
    warnings: list[Finding]


def parse(text: str) -> ParsedText | Finding:
    """The text as a YAML mapping, or the error finding that says why it is not one."""
    try:
        document = load_yaml(text)
    except YamlError as exc:
        return _unparsable(exc)
    if document is None:
        return Finding("error", None, None, "the file is empty")
    if not isinstance(document.data, dict):
        return _not_a_mapping(document.data)
    warnings = _duplicate_warnings(document.duplicates)
    return ParsedText(document.data, SourceMap(document.lines), warnings)


def validate(data: Mapping[Any, Any], source_map: SourceMap | None = None) -> list[Finding]:
    """Everything Synapse refuses at start-up, plus what would break puppet registration."""
    report = Report(source_map or SourceMap())
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


def salvage(data: Mapping[Any, Any]) -> dict[Any, Any]:
    """``data`` with every invalid value replaced by a valid stand-in, or left out if optional.

    So that a file with errors can still be linted: the lints then report on
    the valid parts, and whatever they say about a stand-in is dropped (it is
    at the same key as the error that replaced it).
    """
    fixed = dict(data)
    for key, meaning in _REQUIRED_STRINGS.items():
        if _refused(_check_required_string, data, key, meaning):
            fixed[key] = f"invalid-{key.replace('_', '-')}"  # each distinct, each valid
    if _refused(_check_url, data):
        fixed["url"] = None
    for key in (*_OPTIONAL_BOOLS, *_STRICT_BOOLS):
        if key in data and not isinstance(data[key], bool):
            del fixed[key]
    if _refused(_check_string_list, data, "protocols", allow_null=True):
        del fixed["protocols"]
    namespaces = data.get("namespaces")
    fixed["namespaces"] = (
        {
            kind: _salvage_entries(value) if kind in NAMESPACE_KINDS else value
            for kind, value in namespaces.items()
        }
        if isinstance(namespaces, dict)
        else {}
    )
    return fixed


_NEVER_MATCHES = "(?!)"  # a stand-in regex that matches no ID, so it changes no other check


def _salvage_entries(entries: Any) -> Any:
    if not isinstance(entries, list):
        return []
    salvaged = []
    for entry in entries:
        if not isinstance(entry, dict):
            salvaged.append({"regex": _NEVER_MATCHES, "exclusive": False})
            continue
        problems = Report(SourceMap())
        _check_namespace_entry(problems, (), entry)
        fields = {finding.field for finding in problems.findings}
        salvaged.append(
            {
                **entry,
                "regex": _NEVER_MATCHES if "regex" in fields else entry["regex"],
                "exclusive": False if "exclusive" in fields else entry["exclusive"],
            }
        )
    return salvaged


def _refused(check: Any, data: Mapping[Any, Any], *args: Any, **kwargs: Any) -> bool:
    """Does ``check`` (one of the ``_check_*`` functions) find an error in ``data``?"""
    scratch = Report(SourceMap())
    check(scratch, data, *args, **kwargs)
    return bool(scratch.findings)


def _check_required_string(report: Report, data: Mapping[Any, Any], key: str, meaning: str) -> None:
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


def _check_url(report: Report, data: Mapping[Any, Any]) -> None:
    if "url" not in data:
        report.error(("url",), "missing: required, the appservice's URL (or null for no traffic)")
    elif data["url"] is not None and not isinstance(data["url"], str):
        report.error(("url",), f"must be a URL string or null, not {describe(data['url'])}")


def _check_namespaces(report: Report, data: Mapping[Any, Any]) -> None:
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
    for kind in NAMESPACE_KINDS:
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


def _check_namespace_entry(report: Report, path: KeyPath, entry: Any) -> None:
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
    report: Report, data: Mapping[Any, Any], key: str, *, allow_null: bool
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


def _check_proxy(report: Report, data: Mapping[Any, Any]) -> None:
    keys = ("io.element.msc4512.proxy_prefix", "io.element.msc4512.proxy_url")
    present = [key for key in keys if data.get(key) is not None]
    for key in present:
        if not isinstance(data[key], str) or not data[key]:
            report.error((key,), f"must be a non-empty string, not {describe(data[key])}")
    if len(present) == 1:
        missing = next(key for key in keys if key not in present)
        report.error((present[0],), f"must be set together with {missing}")


def _check_ip_ranges(report: Report, data: Mapping[Any, Any]) -> None:
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


# -- findings about the YAML itself ---------------------------------------------------


def _unparsable(exc: YamlError) -> Finding:
    column = "" if exc.column is None else f" (column {exc.column})"
    return Finding("error", None, exc.line, f"cannot parse YAML{column}: {exc.reason}")


def _duplicate_warnings(duplicates: list[Duplicate]) -> list[Finding]:
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
