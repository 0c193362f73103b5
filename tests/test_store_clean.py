"""The store's cleaning rules (store/_clean.py) and its query layer's marks (store/_sql.py)."""

from __future__ import annotations

import json

import pytest

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
