"""The store's cleaning rules (store/_clean.py) and its query layer's marks (store/_sql.py)."""

from __future__ import annotations

import json

import pytest

from bridge_kit.bridge.records import LoginRecord, LoginState, PortalKey
from bridge_kit.inbox.records import ItemKind, NewDeadLetter, NewInboxItem
from bridge_kit.store import _clean
from bridge_kit.store._sql import sqlite_marks

HOSTILE = "a\x00b\ud800c"


def test_storable_text_replaces_what_no_database_takes_and_keeps_plain_text() -> None:
    assert _clean.storable_text(HOSTILE) == "a\ufffdb\ufffdc"
    plain = "!room:example.org"
    assert _clean.storable_text(plain) is plain
    assert _clean.optional_storable_text(None) is None


def test_escaped_json_is_lossless() -> None:
    text = json.dumps({"body": HOSTILE}, ensure_ascii=False)
    escaped = _clean.escaped_json(text)
    assert "\x00" not in escaped and "\ud800" not in escaped
    assert json.loads(escaped) == {"body": HOSTILE}


@pytest.mark.parametrize("bad", ["a\x00", "\udfff"])
def test_checked_key_refuses_rather_than_merging_two_keys(bad: str) -> None:
    with pytest.raises(ValueError, match="device ID holds NUL or a lone surrogate"):
        _clean.checked_key(bad, "device ID")
    assert _clean.checked_key("DEVICE", "device ID") == "DEVICE"


def test_checked_count_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="keep must be >= 0, not -1"):
        _clean.checked_count(-1, "keep")


def test_checked_bytes_takes_bytes_like_values_only() -> None:
    assert _clean.checked_bytes(bytearray(b"v")) == b"v"
    with pytest.raises(TypeError, match="not str"):
        _clean.checked_bytes("v")  # type: ignore[arg-type]


def test_records_are_cleaned_field_by_field_and_kept_when_clean() -> None:
    item = NewInboxItem("!r:x", ItemKind.EVENT, "{}")
    assert _clean.storable_item(item) is item
    letter = NewDeadLetter(HOSTILE, ItemKind.EVENT, "{}", HOSTILE, handler=HOSTILE)
    cleaned = _clean.storable_letter(letter)
    assert (cleaned.lane, cleaned.error, cleaned.handler) == ("a\ufffdb\ufffdc",) * 3
    assert cleaned.event_id is None


def test_sqlite_marks_numbers_sqlite_parameters_as_postgresql_does() -> None:
    sql = "SELECT a FROM t WHERE b = $1 AND c = $2 OR d = $12"
    assert sqlite_marks(sql) == "SELECT a FROM t WHERE b = ?1 AND c = ?2 OR d = ?12"


def test_a_portal_key_is_checked_in_both_parts() -> None:
    key = PortalKey("#chan", receiver="login")
    assert _clean.checked_portal_key(key) is key
    with pytest.raises(ValueError, match="portal receiver holds NUL"):
        _clean.checked_portal_key(PortalKey("#chan", receiver=HOSTILE))


def test_metadata_is_json_text_with_what_no_database_takes_escaped() -> None:
    text = _clean.metadata_json({"name": HOSTILE, "é": [1, 2.5, None]})
    assert "\x00" not in text and "\ud800" not in text and "é" in text
    assert json.loads(text) == {"name": HOSTILE, "é": [1, 2.5, None]}
    assert _clean.checked_metadata({"t": (1, 2), 3: "x"}) == {"t": [1, 2], "3": "x"}
    for bad, why in (({"n": float("nan")}, "not JSON"), ([1], "must be a JSON object")):
        with pytest.raises(ValueError, match=why):
            _clean.metadata_json(bad)  # type: ignore[arg-type]


def test_a_timestamp_is_a_finite_float() -> None:
    assert _clean.checked_timestamp(3) == 3.0
    with pytest.raises(ValueError, match="finite number, not inf"):
        _clean.checked_timestamp(float("inf"))


def test_a_login_is_stored_with_its_state_and_credentials_normalised() -> None:
    login = LoginRecord(
        "l",
        "@a:x",
        state="CONNECTED",
        credentials=bytearray(b"c"),  # type: ignore[arg-type]
    )
    cleaned = _clean.storable_login(login)
    assert cleaned.state is LoginState.CONNECTED and cleaned.credentials == b"c"
    with pytest.raises(TypeError, match="credentials are bytes, not str"):
        _clean.storable_login(LoginRecord("l", "@a:x", credentials="c"))  # type: ignore[arg-type]
