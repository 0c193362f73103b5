"""YAML loading that remembers the line of every key, and wording for YAML problems.

Shared by :mod:`bridge_kit.registration` and :mod:`bridge_kit.config`, which
both point at the line of each mistake in a file a person wrote.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple, TypeAlias

import yaml

from bridge_kit.errors import YamlError

__all__ = ["Document", "Duplicate", "KeyPath", "YamlError", "describe", "load", "path_name"]

KeyPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits, e.g. ``("namespaces", "users", 0, "regex")``; ``()`` is the top level."""

_MAX_DEPTH = 16  # aliases can make the node graph cyclic; real files are far shallower
_MAX_PATHS = 100_000  # aliases can also multiply paths; stop recording long before that hurts
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TAB_PROBLEM = "found character '\\t' that cannot start any token"
_TAB_INDENTATION = "YAML does not allow tabs for indentation; indent with spaces"
#: Values a document may hold once its aliases are expanded. Aliases share one Python
#: object, but whatever walks the data (repr, a dump, JSON) expands them: nine
#: anchors of nine aliases each ("billion laughs") make 387 million values from 1 kB.
#: Registration and config files hold hundreds.
_MAX_VALUES = 100_000


class Duplicate(NamedTuple):
    """A key given again in the same mapping; this later one, on ``line``, wins."""

    path: KeyPath
    line: int
    previous_line: int


class Document(NamedTuple):
    """Loaded YAML: the data, the line of each key path (and list item), and repeated keys."""

    data: Any
    lines: dict[KeyPath, int]
    duplicates: list[Duplicate]


def load(text: str) -> Document | None:
    """Load one YAML document with the safe loader; ``None`` if there is none (blank, comments).

    The text is composed once: lines and duplicates come from the node tree,
    and the data is constructed from that same tree. Raises :class:`YamlError`
    for anything but a single valid document.
    """
    loader: _SafeLoader | None = None
    try:
        loader = _SafeLoader(text)  # already refuses unprintable characters
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root) > _MAX_VALUES:
            raise YamlError(
                f"the document expands to more than {_MAX_VALUES:,} values through its "
                "aliases (*name); a registration or config file needs far fewer"
            )
        lines, duplicates = _key_lines(root)  # first: construction flattens merge keys in place
        return Document(loader.construct_document(root), lines, duplicates)
    except yaml.MarkedYAMLError as exc:
        raise _marked_error(exc) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text) from None
    except RecursionError:
        raise YamlError("nested too deeply") from None
    except Exception as exc:  # not expected from PyYAML, but a user must still get a message
        raise YamlError(str(exc) or type(exc).__name__) from None
    finally:
        if loader is not None:
            loader.dispose()


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, giving a position to the plain ValueErrors of its constructors."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:  # e.g. the impossible date 2024-13-45
            shown = f"{node.value!r} is invalid: " if isinstance(node, yaml.ScalarNode) else ""
            mark = node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"{shown}{exc}", mark) from None


def describe(value: Any, *, typed: bool = False) -> str:
    """A short, YAML-flavoured description of a value for error messages.

    ``'8080'``, ``80.5``, ``null``, ``true``, ``a list``, ``a date (2024-01-31)``;
    with ``typed``, strings and numbers are named: ``the string '8080'``,
    ``the number 80.5``. Long strings are shortened.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
        text = text if len(text) <= 40 else text[:36] + "..." + text[-1]
        return f"the string {text}" if typed else text
    if isinstance(value, int | float):
        return f"the number {value!r}" if typed else repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    return f"a {type(value).__name__}"


def path_name(path: KeyPath) -> str:
    """The dotted name of a key path, e.g. ``namespaces.users[0].regex``; ``""`` for the top."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name


# PyYAML's scanner calls the end of the input '\x00' (its sentinel; a real NUL is refused
# earlier, by the reader) and its parser '<stream end>'. People call it the end of the file.
_END_OF_INPUT = (
    ("'\\x00'", "end of file"),
    ("'<stream end>'", "end of file"),
    ("end of stream", "end of file"),
)


def _marked_error(exc: yaml.MarkedYAMLError) -> YamlError:
    problem = _plain_words(exc.problem or "invalid YAML")
    if problem.startswith(_TAB_PROBLEM):
        # PyYAML's "found character '\t' that cannot start any token" does not say
        # what to do; a tab where a token could start is always indentation.
        problem, context = _TAB_INDENTATION, None
    else:
        context = exc.context
    if context:
        joined = problem.startswith("but ")  # "expected a single document, but found another"
        problem = f"{context}, {problem}" if joined else f"{problem} ({context})"
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return YamlError(problem)
    return YamlError(problem, mark.line + 1, mark.column + 1)


def _plain_words(problem: str) -> str:
    for jargon, plain in _END_OF_INPUT:
        problem = problem.replace(jargon, plain)
    return problem


def _reader_error(exc: yaml.reader.ReaderError, text: str) -> YamlError:
    # Given a str, PyYAML's reader only refuses characters (as code points), never bytes.
    line_start = text.rfind("\n", 0, exc.position) + 1
    return YamlError(
        f"unacceptable character U+{exc.character:04X} ({exc.reason})",
        text.count("\n", 0, exc.position) + 1,
        exc.position - line_start + 1,
    )


def _key_lines(root: yaml.Node) -> tuple[dict[KeyPath, int], list[Duplicate]]:
    """The 1-based line of each key path and list item, and every key repeated in a mapping."""
    lines: dict[KeyPath, int] = {(): _line(root)}
    duplicates: list[Duplicate] = []
    checked: set[int] = set()  # a mapping reached again through an alias is reported once
    stack: list[tuple[KeyPath, yaml.Node]] = [((), root)]
    while stack and len(lines) < _MAX_PATHS:
        path, node = stack.pop()
        if len(path) >= _MAX_DEPTH:
            continue
        if isinstance(node, yaml.MappingNode) and id(node) not in checked:
            checked.add(id(node))
            duplicates += _duplicates(path, node)
        children = [((*path, key), line, child) for key, line, child in _children(node)]
        lines.update((child_path, line) for child_path, line, _ in children)
        stack.extend((child_path, child) for child_path, _, child in reversed(children))
    return lines, duplicates


def _children(node: yaml.Node) -> list[tuple[str | int, int, yaml.Node]]:
    """Each key with its line and value (the last value of a repeated key: it wins), or item."""
    if isinstance(node, yaml.MappingNode):
        last = {key.value: (_line(key), value) for key, value in node.value if _is_plain(key)}
        return [(name, line, value) for name, (line, value) in last.items()]
    if isinstance(node, yaml.SequenceNode):
        return [(index, _line(item), item) for index, item in enumerate(node.value)]
    return []


def _duplicates(path: KeyPath, node: yaml.MappingNode) -> list[Duplicate]:
    found: list[Duplicate] = []
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if _is_plain(key):
            if key.value in seen:
                found.append(Duplicate((*path, key.value), _line(key), seen[key.value]))
            seen[key.value] = _line(key)
    return found


def _is_plain(key: yaml.Node) -> bool:
    """A scalar key, not ``<<`` (whose merged keys are the anchor's, not this mapping's)."""
    return isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG


def _expanded_size(root: yaml.Node) -> int:
    """How many values ``root`` holds with every alias expanded, counted without
    expanding (each node once, post-order) and capped just past the limit.

    A node met again on its own path (a recursive alias) counts once: Python
    shows such a cycle as ``[...]`` rather than expanding it.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(sizes.get(id(child), 1) for child in _child_nodes(node))
            sizes[key] = min(total, _MAX_VALUES + 1)
        elif key not in sizes and key not in on_path:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _child_nodes(node))
    return sizes[id(root)]


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1
