"""What can be decided about namespace regexes: nested quantifiers, and overlaps.

Both work on the parse tree of CPython's own regex parser (``re._parser``,
formerly ``sre_parse``), so they see exactly what :func:`re.compile` sees:
escapes, classes, groups and flags, with no guessing from the text.

**Nested quantifiers.** :func:`nested_quantifier` finds a repeat that can run
more than once around a repeat of variable length, e.g. ``(a+)+`` or
``(.*x){20}``: on an ID that almost matches, the engine tries every way of
splitting it between the two, which is exponential (or a high power) in the
ID's length. It is a syntactic test: it also flags some safe regexes such as
``(ab+)+``, where the ``a`` leaves one way to split, and it misses the rarer
ambiguity between overlapping alternatives, ``(a|ab)+``.

**Overlaps.** :func:`overlap` decides whether some identifier could match two
regexes (with :func:`re.match`, as Synapse does), and says how it knows:

- *same*: the two regexes are the same text;
- *disjoint*: proved impossible, because every match of one must start with a
  literal text that no match of the other can start with (for instance
  ``@_irc_`` and ``@_xmpp_``), or, for regexes ending in ``$``/``\\Z``, end
  with literal texts of which neither ends the other (``:a\\.org`` and
  ``:b\\.org``);
- *witness*: an identifier generated from one regex also matches the other
  (shown as proof);
- *unknown*: neither proof nor witness, e.g. for ``^@[a-m]{8}`` and
  ``^@[m-z]{8}``, whose only common ID ``@mmmmmmmm`` sampling is unlikely to
  hit. Deciding every case would mean intersecting automata, which Python's
  regexes (backreferences, lookarounds) do not allow.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, NamedTuple

__all__ = [
    "Overlap",
    "literal_prefix",
    "literal_suffix",
    "nested_quantifier",
    "overlap",
    "samples",
]

try:
    # CPython's regex parser; private, but the very one re.compile uses (3.11+).
    _parser: Any = importlib.import_module("re._parser")
    _c: Any = importlib.import_module("re._constants")
except ImportError:  # another Python: these analyses then decide nothing
    _parser = _c = None

_SAMPLES_PER_REGEX: Final = 64
_MAX_EXTRA_REPEATS: Final = 2
# Characters tried for ., classes and negated literals, most ID-like first.
_ALPHABET: Final = "ax0_" + "bcdefghijklmnopqrstuvwyz123456789" + "-.=/+:!#@A \n"

Node = tuple[Any, Any]


class Overlap(NamedTuple):
    """The answer of :func:`overlap`: ``kind``, and an identifier matching both for a witness."""

    kind: Literal["same", "disjoint", "witness", "unknown"]
    example: str | None = None

    @property
    def certain(self) -> bool:
        """Is it proved that some identifier matches both?"""
        return self.kind in ("same", "witness")


def _tree(regex: str) -> tuple[list[Node], int] | None:
    """The top-level nodes and the global flags, or ``None`` when unparsable."""
    if _parser is None:
        return None
    try:
        tree = _parser.parse(regex)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None
    return list(tree), tree.state.flags


def _literal_nodes(regex: str) -> list[Node] | None:
    """The nodes, with plain groups inlined, if literal texts in them mean what they say.

    Case-insensitive matching makes ``a`` match ``A``, and multi-line mode makes
    ``^``/``$`` match at every newline: with either, nothing is concluded.
    """
    parsed = _tree(regex)
    if parsed is None or parsed[1] & (re.IGNORECASE | re.MULTILINE):
        return None
    return _flatten(parsed[0])


def _children(op: Any, av: Any) -> list[Sequence[Node]]:
    """The sub-sequences a node contains, for walking the tree."""
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        return [av[2]]
    if op is _c.SUBPATTERN:
        return [av[-1]]
    if op is _c.BRANCH:
        return list(av[1])
    if op is _c.ATOMIC_GROUP:
        return [av]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op is _c.GROUPREF_EXISTS:
        return [branch for branch in av[1:] if branch is not None]
    return []


# -- nested quantifiers -----------------------------------------------------------


def nested_quantifier(regex: str) -> bool:
    """Does ``regex`` repeat (more than once) something that contains a variable repeat?"""
    parsed = _tree(regex)
    return parsed is not None and _has_nested(parsed[0], inside_repeat=False)


def _has_nested(nodes: Sequence[Node], *, inside_repeat: bool) -> bool:
    for op, av in nodes:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high = av[0], av[1]
            if inside_repeat and low != high:
                return True
            # A possessive repeat never gives back what it took, so it cannot
            # try the splits; what is nested inside it still can.
            repeats = high > 1 and op is not _c.POSSESSIVE_REPEAT
            if _has_nested(av[2], inside_repeat=inside_repeat or repeats):
                return True
            continue
        if any(_has_nested(child, inside_repeat=inside_repeat) for child in _children(op, av)):
            return True
    return False


# -- literal prefixes and suffixes ----------------------------------------------


def _flatten(nodes: Sequence[Node]) -> list[Node]:
    """Inline plain groups, so ``(@_irc_)`` reads like ``@_irc_`` for literal texts."""
    flat: list[Node] = []
    for op, av in nodes:
        if op is _c.SUBPATTERN and not av[1] and not av[2]:
            flat.extend(_flatten(av[-1]))
        else:
            flat.append((op, av))
    return flat


def literal_prefix(regex: str) -> str | None:
    """The text every :func:`re.match` of ``regex`` starts with (``None``: cannot tell)."""
    nodes = _literal_nodes(regex)
    if nodes is None:
        return None
    prefix: list[str] = []
    for index, (op, av) in enumerate(nodes):
        if op is _c.LITERAL:
            prefix.append(chr(av))
        elif op is _c.AT and av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING) and index == 0:
            continue  # re.match starts at position 0, where these hold anyway
        else:
            break
    return "".join(prefix)


def literal_suffix(regex: str) -> str | None:
    """The text every match ends with, before an optional final newline.

    Only for a regex ending in ``$`` or ``\\Z`` (otherwise ``None``); a suffix
    holding a newline is cut before it, since ``$`` also matches before one.
    """
    flat = _literal_nodes(regex)
    if flat is None:
        return None
    if not flat or flat[-1] not in ((_c.AT, _c.AT_END), (_c.AT, _c.AT_END_STRING)):
        return None
    suffix: list[str] = []
    for op, av in reversed(flat[:-1]):
        if op is not _c.LITERAL or chr(av) == "\n":
            break
        suffix.append(chr(av))
    return "".join(reversed(suffix))


# -- overlap -------------------------------------------------------------------------


def overlap(a: str, b: str) -> Overlap:
    """Could one identifier match both ``a`` and ``b``? See the module docstring for how."""
    if a == b:
        return Overlap("same", None)
    if _provably_disjoint(a, b):
        return Overlap("disjoint")
    try:
        pattern_a, pattern_b = re.compile(a), re.compile(b)
    except (re.error, RecursionError, OverflowError, ValueError):
        return Overlap("unknown")
    for own, other, regex in ((pattern_a, pattern_b, a), (pattern_b, pattern_a, b)):
        for sample in samples(regex):
            if own.match(sample) and other.match(sample):
                return Overlap("witness", sample)
    return Overlap("unknown")


def _provably_disjoint(a: str, b: str) -> bool:
    prefix_a, prefix_b = literal_prefix(a), literal_prefix(b)
    if (
        prefix_a is not None
        and prefix_b is not None
        and not (prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a))
    ):
        return True
    suffix_a, suffix_b = literal_suffix(a), literal_suffix(b)
    if suffix_a is not None and suffix_b is not None:
        return not (suffix_a.endswith(suffix_b) or suffix_b.endswith(suffix_a))
    return False


def samples(regex: str, count: int = _SAMPLES_PER_REGEX) -> list[str]:
    """Up to ``count`` distinct short strings that match ``regex`` (deterministic).

    Generated from the parse tree, shortest choices first, then seeded random
    ones; each is checked against the regex itself, so a sample is always a
    real match (constructs the generator only approximates are simply dropped).
    """
    parsed = _tree(regex)
    if parsed is None:
        return []
    nodes, pattern = parsed[0], re.compile(regex)
    chooser = random.Random(regex)  # seeded by the regex: the same samples every run
    found: dict[str, None] = {}
    for attempt in range(count * 2):
        text = "".join(_generate(nodes, chooser, shortest=attempt == 0))
        if pattern.match(text):
            found.setdefault(text)
            if len(found) >= count:
                break
    return list(found)


def _generate(nodes: Sequence[Node], chooser: random.Random, *, shortest: bool) -> Iterator[str]:
    for op, av in nodes:
        yield from _generate_node(op, av, chooser, shortest=shortest)


def _generate_node(op: Any, av: Any, chooser: random.Random, *, shortest: bool) -> Iterator[str]:
    if op is _c.LITERAL:
        yield chr(av)
    elif op in (_c.NOT_LITERAL, _c.ANY, _c.IN):
        yield _pick_char(op, av, chooser, shortest=shortest)
    elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        low, high = av[0], av[1]
        times = low if shortest else chooser.randint(low, min(high, low + _MAX_EXTRA_REPEATS))
        for _ in range(times):
            yield from _generate(av[2], chooser, shortest=shortest)
    elif op is _c.BRANCH:
        branches = av[1]
        branch = branches[0] if shortest else chooser.choice(branches)
        yield from _generate(branch, chooser, shortest=shortest)
    elif op is _c.SUBPATTERN:
        yield from _generate(av[-1], chooser, shortest=shortest)
    elif op is _c.ATOMIC_GROUP:
        yield from _generate(av, chooser, shortest=shortest)
    # AT, assertions, backreferences: nothing; the self-check drops wrong guesses.


def _pick_char(op: Any, av: Any, chooser: random.Random, *, shortest: bool) -> str:
    if op is _c.ANY:
        allowed = [c for c in _ALPHABET if c != "\n"]
    elif op is _c.NOT_LITERAL:
        allowed = [c for c in _ALPHABET if ord(c) != av]
    else:
        allowed = [c for c in _ALPHABET if _in_class(av, c)] or _class_examples(av)
    if not allowed:
        return ""
    return allowed[0] if shortest else chooser.choice(allowed)


def _in_class(items: Sequence[Node], char: str) -> bool:
    negate = bool(items) and items[0][0] is _c.NEGATE
    code = ord(char)
    hit = False
    for op, av in items:
        if op is _c.LITERAL:
            hit = hit or code == av
        elif op is _c.RANGE:
            hit = hit or av[0] <= code <= av[1]
        elif op is _c.CATEGORY:
            hit = hit or _in_category(av, char)
    return hit != negate


def _in_category(category: Any, char: str) -> bool:
    positive = {
        _c.CATEGORY_DIGIT: char.isdigit(),
        _c.CATEGORY_WORD: char.isalnum() or char == "_",
        _c.CATEGORY_SPACE: char.isspace(),
    }
    negative = {
        _c.CATEGORY_NOT_DIGIT: _c.CATEGORY_DIGIT,
        _c.CATEGORY_NOT_WORD: _c.CATEGORY_WORD,
        _c.CATEGORY_NOT_SPACE: _c.CATEGORY_SPACE,
    }
    if category in negative:
        return not positive[negative[category]]
    return positive.get(category, False)


def _class_examples(items: Sequence[Node]) -> list[str]:
    """Members of a class the alphabet missed, e.g. ``[é]``: its literals and range starts."""
    if items and items[0][0] is _c.NEGATE:
        return []
    found = [chr(av) for op, av in items if op is _c.LITERAL]
    return found + [chr(av[0]) for op, av in items if op is _c.RANGE]
