"""User-ID grammar: what bridge_kit lets a bridge create (facts §2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_kit.errors import InvalidLocalpart
from bridge_kit.ids import (
    MAX_USER_ID_BYTES,
    localpart_problem,
    server_name_problem,
    split_user_id,
    user_id,
    validate_localpart,
)

GRAMMAR = "abcdefghijklmnopqrstuvwxyz0123456789._=-/+"
valid_localparts = st.text(alphabet=GRAMMAR, min_size=1, max_size=200)


@pytest.mark.parametrize("localpart", ["a", "alice", "_bk_42", "a.b_c=d-e/f+g", "0", "x" * 200])
def test_valid_localparts_have_no_problem(localpart: str) -> None:
    assert localpart_problem(localpart) is None
    assert localpart_problem(localpart, "example.org") is None
    validate_localpart(localpart, "example.org")


@pytest.mark.parametrize(
    ("localpart", "reason"),
    [
        ("", "must not be empty"),
        ("Alice", "uppercase"),
        ("UPPER", "uppercase"),
        ("a b", "' '"),
        ("bang!", "'!'"),
        ("a:b", "':'"),
        ("café", "'é'"),
        ("tab\there", "'\\t'"),
        ("nul\x00", "'\\x00'"),
        ("A b", "lowercase"),
    ],
)
def test_invalid_localparts_say_why(localpart: str, reason: str) -> None:
    problem = localpart_problem(localpart)
    assert problem is not None
    assert reason in problem
    with pytest.raises(InvalidLocalpart) as caught:
        validate_localpart(localpart)
    assert caught.value.localpart == localpart
    assert caught.value.reason == problem
    assert repr(localpart) in str(caught.value)


def test_full_user_id_is_limited_to_255_bytes() -> None:
    domain = "example.org"
    longest = "a" * (MAX_USER_ID_BYTES - len(domain) - 2)
    assert len(f"@{longest}:{domain}".encode()) == MAX_USER_ID_BYTES
    assert localpart_problem(longest, domain) is None
    problem = localpart_problem(longest + "a", domain)
    assert problem is not None
    assert "256 bytes" in problem
    assert "255" in problem


def test_length_counts_bytes_of_a_non_ascii_domain() -> None:
    domain = "exämple.org"  # 12 bytes in UTF-8, 11 characters
    fits = "a" * (MAX_USER_ID_BYTES - 12 - 2)
    assert localpart_problem(fits, domain) is None
    assert localpart_problem(fits + "a", domain) is not None


def test_300_character_localpart_is_refused_without_a_domain() -> None:
    # Synapse accepted a 300-character localpart from an appservice (facts §2).
    problem = localpart_problem("a" * 300)
    assert problem is not None
    assert "300 characters" in problem


@given(valid_localparts)
def test_every_grammar_string_is_accepted(localpart: str) -> None:
    assert localpart_problem(localpart, "example.org") is None
    assert user_id(localpart, "example.org") == f"@{localpart}:example.org"


@given(st.text(min_size=1, max_size=40).filter(lambda s: any(c not in GRAMMAR for c in s)))
def test_any_character_outside_the_grammar_is_refused(localpart: str) -> None:
    problem = localpart_problem(localpart)
    assert problem is not None
    with pytest.raises(InvalidLocalpart):
        user_id(localpart, "example.org")


@given(valid_localparts, st.sampled_from(["example.org", "a.b.c.example.com:8448", "[::1]:8008"]))
def test_split_user_id_inverts_user_id(localpart: str, domain: str) -> None:
    assert split_user_id(user_id(localpart, domain)) == (localpart, domain)


def test_split_user_id_accepts_historical_ids() -> None:
    assert split_user_id("@Old Style!:example.org") == ("Old Style!", "example.org")
    assert split_user_id("@a:example.org:8448") == ("a", "example.org:8448")


@pytest.mark.parametrize(
    "bad", ["alice:example.org", "@alice", "@:example.org", "@alice:", "", "#a:b"]
)
def test_split_user_id_refuses_non_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a user ID"):
        split_user_id(bad)


@pytest.mark.parametrize(
    "name", ["example.org", "localhost", "test.local:8448", "127.0.0.1", "[::1]:8008"]
)
def test_valid_server_names(name: str) -> None:
    assert server_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "bad domain", "example.org/path", "@example.org", "a:b:c"])
def test_invalid_server_names(name: str) -> None:
    assert server_name_problem(name) is not None
