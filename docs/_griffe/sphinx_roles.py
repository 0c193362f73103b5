"""A griffe extension: the Sphinx roles in bridge_kit's docstrings become links.

The docstrings name other objects the Sphinx way (``:class:`~bridge_kit.errors.X```,
``:meth:`Intent.send_text```). This rewrites each role, before mkdocstrings renders
the docstring, into an *optional* autorefs reference: a link when the target is on
a page of the site, plain code when it is not (a private module, the inbox).
A role naming something of bridge_kit's that does not exist (a typo, a name that
was renamed or moved) is a warning, which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import builtins
import html
import re
import sys
from typing import Any

import griffe

logger = griffe.get_logger("bridge_kit.docs")
ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
# "lives here::" introduces an indented literal block in reStructuredText; in
# Markdown the indentation alone makes it one, and the "::" would show.
LITERAL_BLOCK_MARK = re.compile(r"(?<=\S)::$", re.M)
PACKAGE = "bridge_kit"


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring in the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name == PACKAGE:
            _rewrite_tree(pkg, pkg)


def _rewrite_tree(obj: griffe.Object, pkg: griffe.Module) -> None:
    if obj.docstring is not None:
        text = LITERAL_BLOCK_MARK.sub(":", obj.docstring.value)
        obj.docstring.value = ROLE.sub(lambda match: _reference(obj, pkg, match["target"]), text)
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            _rewrite_tree(member, pkg)


def _reference(scope: griffe.Object, pkg: griffe.Module, target: str) -> str:
    """The autorefs tag for one role's target, as seen from *scope*."""
    shown, path = _shown_and_path(target.strip())
    identifier = _resolve(scope, path)
    if not _known(pkg, identifier):
        logger.warning("the docstring of %s names %s, which does not exist", scope.path, target)
    code = f"<code>{html.escape(shown)}</code>"
    return f'<autoref identifier="{html.escape(identifier or path)}" optional>{code}</autoref>'


def _shown_and_path(target: str) -> tuple[str, str]:
    """What the text shows and what it names: ``~a.b.C`` shows ``C``, ``a.b.C`` all of it."""
    if target.startswith("~"):
        path = target[1:].lstrip(".")
        return path.rsplit(".", 1)[-1], path
    return target.lstrip("."), target.lstrip(".")


def _resolve(scope: griffe.Object, path: str) -> str | None:
    """The full path of a name written relative to *scope* (its module's imports and
    members); ``None`` when nothing in scope has its first part."""
    if path.startswith(PACKAGE + ".") or path == PACKAGE:
        return path
    head, _, rest = path.partition(".")
    try:
        resolved = scope.resolve(head)
    except (griffe.NameResolutionError, KeyError, AttributeError):
        return path if _is_builtin(path) else None
    return f"{resolved}.{rest}" if rest else resolved


def _is_builtin(path: str) -> bool:
    """``ValueError``, ``bytes``, or a standard module such as ``json``."""
    return hasattr(builtins, path) or path in sys.stdlib_module_names


def _known(pkg: griffe.Module, identifier: str | None) -> bool:
    """Whether the role names something: of bridge_kit's, one that exists."""
    if identifier is None:
        return False
    return not identifier.startswith(PACKAGE + ".") or _exists(pkg, identifier)


def _exists(pkg: griffe.Module, identifier: str) -> bool:
    """Whether *identifier* names a module, class, function or attribute of the package."""
    obj: griffe.Object | griffe.Alias = pkg
    for part in identifier.split(".")[1:]:
        try:
            obj = obj.members[part]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return False
    return True
