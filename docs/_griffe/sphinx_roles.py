"""A griffe extension: the Sphinx roles in bridge_kit's docstrings become links.

The docstrings name other objects the Sphinx way (``:class:`~bridge_kit.errors.X```,
``:meth:`Intent.send_text```). This rewrites each role, before mkdocstrings renders
the docstring, into an *optional* autorefs reference: a link when the target is on
a page of the site, plain code when it is not (a private module, the inbox), so
``mkdocs build --strict`` never fails on a name the reference does not show.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
PACKAGE = "bridge_kit"


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name == PACKAGE:
            _rewrite_tree(pkg)


def _rewrite_tree(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = ROLE.sub(lambda match: _reference(obj, match["target"]), obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            _rewrite_tree(member)


def _reference(scope: griffe.Object, target: str) -> str:
    """The autorefs tag for one role's target, as seen from *scope*."""
    shown, path = _shown_and_path(target.strip())
    identifier = _resolve(scope, path)
    return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(shown)}</code></autoref>'


def _shown_and_path(target: str) -> tuple[str, str]:
    """What the text shows and what it names: ``~a.b.C`` shows ``C``, ``a.b.C`` all of it."""
    if target.startswith("~"):
        path = target[1:].lstrip(".")
        return path.rsplit(".", 1)[-1], path
    return target.lstrip("."), target.lstrip(".")


def _resolve(scope: griffe.Object, path: str) -> str:
    """The full path of a name written relative to *scope* (its module's imports and members)."""
    if path.startswith(PACKAGE + ".") or path == PACKAGE:
        return path
    head, _, rest = path.partition(".")
    try:
        resolved = scope.resolve(head)
    except (griffe.NameResolutionError, KeyError, AttributeError):
        return path
    return f"{resolved}.{rest}" if rest else resolved
