"""The shared YAML loader: key lines, repeated keys, problem messages and value descriptions."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_kit._yaml import Document, Duplicate, YamlError, describe, load, path_name


def loaded(text: str) -> Document:
    document = load(text)
    assert document is not None
    return document


def problem(text: str) -> YamlError:
    with pytest.raises(YamlError) as caught:
        load(text)
    return caught.value


# -- data and lines -----------------------------------------------------------------------


def test_data_is_what_the_safe_loader_builds() -> None:
    text = "a: 1\nb: [x, {c: 2024-01-31}]\nd: !!binary aGk=\n"
    assert loaded(text).data == {"a": 1, "b": ["x", {"c": datetime.date(2024, 1, 31)}], "d": b"hi"}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "  \n# a\n  # b\n"])
def test_no_document_is_none(text: str) -> None:
    assert load(text) is None


@pytest.mark.parametrize("text", ["null\n", "~\n", "---\n...\n"])
def test_an_explicit_null_is_a_document(text: str) -> None:
    assert loaded(text).data is None


def test_each_key_path_has_its_line() -> None:
    text = (
        "id: bk\n"  # 1
        "namespaces:\n"  # 2
        "  users:\n"  # 3
        "    - regex: '@a_.*'\n"  # 4
        "      exclusive: true\n"  # 5
        "\n"
        "    - regex: '@b_.*'\n"  # 7
        "protocols: [irc,\n"  # 8
        "  matrix]\n"  # 9
    )
    lines = loaded(text).lines
    assert lines[()] == 1
    assert lines[("id",)] == 1
    assert lines[("namespaces", "users")] == 3
    assert lines[("namespaces", "users", 0)] == 4
    assert lines[("namespaces", "users", 0, "regex")] == 4
    assert lines[("namespaces", "users", 0, "exclusive")] == 5
    assert lines[("namespaces", "users", 1, "regex")] == 7
    assert lines[("protocols", 1)] == 9


def test_lines_inside_an_alias_are_those_of_the_anchor() -> None:
    text = "base: &b\n  regex: x\nusers:\n  - *b\n"
    assert loaded(text).lines[("users", 0, "regex")] == 2


def test_merge_keys_are_not_paths_but_their_values_are_merged() -> None:
    document = loaded(
        "base: &b {regex: x, exclusive: true}\nentry:\n  <<: *b\n  exclusive: false\n"
    )
    assert document.data["entry"] == {"regex": "x", "exclusive": False}
    assert ("entry", "<<") not in document.lines
    assert document.lines[("entry", "exclusive")] == 4
    assert document.duplicates == []


def test_a_cyclic_alias_terminates() -> None:
    document = loaded("a: &a\n  - *a\n  - *a\n")
    assert document.data["a"][0] is document.data["a"]
    assert max(len(path) for path in document.lines) <= 16


def test_an_alias_bomb_is_refused_cheaply() -> None:
    # 43 million values once expanded: whatever walks the data (a repr, a dump) would.
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    text += "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    started = time.monotonic()
    with pytest.raises(YamlError, match="expands to more than 100,000 values"):
        load(text)
    assert time.monotonic() - started < 2


# -- repeated keys ------------------------------------------------------------------------


def test_a_repeated_key_is_reported_and_the_last_one_wins() -> None:
    document = loaded("id: first\nurl: x\nid: second\nid: third\n")
    assert document.data["id"] == "third"
    assert document.lines[("id",)] == 4
    assert document.duplicates == [Duplicate(("id",), 3, 1), Duplicate(("id",), 4, 3)]


def test_repeated_keys_are_found_in_nested_lists() -> None:
    text = "namespaces:\n  users:\n    - regex: a\n      regex: b\n      exclusive: true\n"
    duplicate = Duplicate(("namespaces", "users", 0, "regex"), 4, 3)
    assert loaded(text).duplicates == [duplicate]


def test_only_the_winning_value_of_a_repeated_key_is_looked_into() -> None:
    text = "ns:\n  users: [a]\n  users: [b]\nns:\n  users: [c]\n"
    document = loaded(text)
    assert document.duplicates == [Duplicate(("ns",), 4, 1)]  # the first ns is dropped whole
    assert document.lines[("ns",)] == 4
    assert document.lines[("ns", "users")] == 5
    assert document.data == {"ns": {"users": ["c"]}}


def test_a_repeated_key_reached_through_aliases_is_reported_once() -> None:
    document = loaded("a: &x {k: 1, k: 2}\nb: *x\nc: *x\n")
    assert document.duplicates == [Duplicate(("a", "k"), 1, 1)]


def test_keys_in_different_mappings_are_not_repeats() -> None:
    assert loaded("a: {k: 1}\nb: {k: 2}\nc: [{k: 3}, {k: 4}]\n").duplicates == []


# -- problems -------------------------------------------------------------------------------


def test_a_syntax_error_names_line_column_and_context() -> None:
    error = problem("id: bk\nurl: http://x\nas_token: [unclosed\nhs_token: h\n")
    assert (error.line, error.column) == (4, 9)
    assert error.reason == "expected ',' or ']', but got ':' (while parsing a flow sequence)"
    assert str(error) == f"line 4, column 9: {error.reason}"


def test_a_but_problem_is_joined_to_its_context() -> None:
    error = problem("id: a\n---\nid: b\n")
    assert error.reason == "expected a single document in the stream, but found another document"
    assert error.line == 2


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a:\n\tb: 1\n", 2, "YAML does not allow tabs for indentation"),
        ("a: b\n  c: d\n", 2, "mapping values are not allowed here"),
        ("a: *nothing\n", 1, "found undefined alias 'nothing'"),
        ("a: !secret x\n", 1, "could not determine a constructor for the tag '!secret'"),
        ("a: !!python/name:os.system x\n", 1, "could not determine a constructor"),
        ("? [a, b]\n: c\n", 1, "found unhashable key (while constructing a mapping)"),
        ("a: 'open\n", 2, "found unexpected end of file (while scanning a quoted scalar)"),
        ("a: 1\nb: 2024-13-45\n", 2, "'2024-13-45' is invalid: month must be in 1..12"),
    ],
)
def test_every_yaml_problem_has_a_line_and_column(text: str, line: int, words: str) -> None:
    error = problem(text)
    assert error.line == line
    assert error.column is not None
    assert words in error.reason
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("text", "line", "column", "code"),
    [
        ("a: b\x01c\n", 1, 5, "U+0001"),
        ("a: 1\n\x89PNG\r\n\x1a\n\x00\x00", 2, 1, "U+0089"),  # a binary file read as Latin-1
        ("a: 1\nb: x\x00y\n", 2, 5, "U+0000"),
        ("a: \udcff\n", 1, 4, "U+DCFF"),  # an undecodable byte kept by errors="surrogateescape"
    ],
)
def test_binary_or_undecodable_text_names_the_character_and_where(
    text: str, line: int, column: int, code: str
) -> None:
    error = problem(text)
    assert (error.line, error.column) == (line, column)
    assert error.reason == f"unacceptable character {code} (special characters are not allowed)"


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    assert problem("a: " + "[" * 1000 + "]" * 1000 + "\n").reason == "nested too deeply"


def test_a_problem_without_a_place_is_just_its_reason() -> None:
    assert str(YamlError("nested too deeply")) == "nested too deeply"
    assert str(YamlError("bad", 3)) == "line 3: bad"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_any_text_loads_or_raises_yaml_error(text: str) -> None:
    try:
        load(text)
    except YamlError as error:
        assert error.reason
        assert error.line is None or error.line >= 1


# -- describing values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "plain", "typed"),
    [
        (None, "null", "null"),
        (True, "true", "true"),
        (False, "false", "false"),
        ("8080", "'8080'", "the string '8080'"),
        ("it's", '"it\'s"', 'the string "it\'s"'),
        (8080, "8080", "the number 8080"),
        (80.5, "80.5", "the number 80.5"),
        ([1], "a list", "a list"),
        ({"a": 1}, "a mapping", "a mapping"),
        (b"\x00", "binary data", "binary data"),
        (datetime.date(2024, 1, 31), "a date (2024-01-31)", "a date (2024-01-31)"),
        (datetime.datetime(2024, 1, 31, 9, 30), "a date (2024-01-31T09:30:00)", None),
        ({1, 2}, "a set", "a set"),
    ],
)
def test_describe_each_kind(value: Any, plain: str, typed: str | None) -> None:
    assert describe(value) == plain
    assert describe(value, typed=True) == (typed or plain)


def test_describe_shortens_long_strings_keeping_the_quote() -> None:
    assert describe("x" * 100) == "'" + "x" * 35 + "...'"
    assert describe("'" + "x" * 100) == '"' + "'" + "x" * 34 + '..."'
    assert describe("x" * 38) == repr("x" * 38)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ((), ""),
        (("id",), "id"),
        (("namespaces", "users", 0, "regex"), "namespaces.users[0].regex"),
        (("protocols", 2), "protocols[2]"),
    ],
)
def test_path_name(path: tuple[str | int, ...], name: str) -> None:
    assert path_name(path) == name


@pytest.mark.parametrize("text", ["a:\n\tb: 1\n", "a: 1\n\tb: 2\n", "a:\n  - 1\n\t- 2\n"])
def test_a_tab_in_the_indentation_is_named_as_such(text: str) -> None:
    error = problem(text)
    assert error.reason == "YAML does not allow tabs for indentation; indent with spaces"
    assert error.line is not None and error.line > 1
