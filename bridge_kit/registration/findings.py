"""Findings about a registration, and the source map that gives them their YAML lines.

The lowest layer of the package: validation, lints and the model all
report through :class:`Report`, so none of them has to import another to
say where a problem is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeAlias

import attrs

from bridge_kit._yaml import KeyPath, path_name

__all__ = ["Finding", "Report", "Severity", "SourceMap", "sorted_findings"]

Severity: TypeAlias = Literal["error", "warning", "note"]


@attrs.frozen
class Finding:
    """One finding about a registration: an ``"error"`` (refused), a ``"warning"`` (lint),
    or a ``"note"`` (legal and deliberate in some set-ups, but with a consequence worth knowing).

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
class SourceMap:
    """Where each key path (and list item) sits in the YAML text it was loaded from.

    The empty map, for a registration built in code, knows no lines.
    """

    lines: Mapping[KeyPath, int] = attrs.field(factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """The 1-based line of ``path``, or of its nearest ancestor the map knows."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


class Report:
    """Collects findings, placing each at the line its key path has in ``source_map``."""

    def __init__(self, source_map: SourceMap) -> None:
        self.source_map = source_map
        self.findings: list[Finding] = []

    def error(self, path: KeyPath, message: str) -> None:
        self._add("error", path, message)

    def warn(self, path: KeyPath, message: str) -> None:
        self._add("warning", path, message)

    def note(self, path: KeyPath, message: str) -> None:
        self._add("note", path, message)

    def _add(self, severity: Severity, path: KeyPath, message: str) -> None:
        line = self.source_map.line_of(path)
        self.findings.append(Finding(severity, path_name(path) or None, line, message))


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    """In file order; findings without a line last, each group in the order found."""
    return sorted(findings, key=lambda f: (f.line is None, f.line or 0))
