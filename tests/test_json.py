"""orjson and the standard library give the same values (issue 11, faster ingest).

bridge_kit decodes request bodies and encodes the inbox's items with orjson when
it is installed, and with :mod:`json` otherwise or where the two differ. Every
case here runs both ways (``orjson`` on, and monkeypatched away) and must come
out the same: what a handler sees cannot depend on an optional extra.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_kit import _json
from bridge_kit._json import decode_item, decode_json, decode_request, item_text
from bridge_kit.inbox.transactions import split_transaction

pytest.importorskip("orjson", reason="the fast path needs the 'fast' extra (orjson)")


@pytest.fixture(params=["orjson", "json"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "json":
        monkeypatch.setattr(_json, "orjson", None)
    yield request.param


def typed(value: Any) -> Any:
    """``value`` with every number tagged by its type, so 1 and 1.0 differ."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, float | int) and not isinstance(value, bool):
        return (type(value).__name__, repr(value))
    return value


BODIES = {
    "plain": b'{"events": [{"type": "m.room.message", "content": {"body": "hi"}}]}',
    "non-ascii": '{"a": "é ☃ 😀"}'.encode(),
    "escaped pair": b'{"a": "\\ud83d\\ude00"}',
    "lone surrogate escape": b'{"a": "\\ud800"}',
    "lone surrogate bytes": b'{"a": "\xed\xa0\x80"}',
    "nul": b'{"a": "\\u0000"}',
    "int beyond 64 bits": b'{"a": 18446744073709551616}',
    "negative beyond 64 bits": b'{"a": -9223372036854775809}',
    "int of 30 digits": b'{"a": [123456789012345678901234567890]}',
    "18 digits": b'{"a": 123456789012345678}',
    "number-like string": b'{"a": "1234567890123456789012"}',
    "1e999": b'{"a": 1e999}',
    "-1e999": b'{"a": -1e999}',
    "tiny": b'{"a": 1e-400}',
    "float": b'{"a": [0.1, -0.0, 1e16, 2.5e-308]}',
    "duplicate keys": b'{"a": 1, "a": 2}',
    "bom": b'\xef\xbb\xbf{"a": 1}',
    "utf-16": '{"a": "é"}'.encode("utf-16"),
    "whitespace": b' \r\n\t{"a" : [ ] } \n',
    "null": b'{"a": null}',
}

REFUSED = {
    "nan": b'{"a": NaN}',
    "infinity": b'{"a": Infinity}',
    "not utf-8": b'{"a": "\xc0\xaf"}',
    "truncated": b'{"a": ',
    "trailing comma": b'{"a": 1,}',
    "raw newline in a string": b'{"a": "x\ny"}',
    "empty": b"",
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_body_decodes_to_what_json_reads(path: str, body: bytes) -> None:
    expected = json.loads(body.decode(json.detect_encoding(body), "surrogatepass"))
    assert typed(decode_request(body)) == typed(expected)


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_what_is_not_json_is_refused_either_way(path: str, body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_request(body)


def test_deep_nesting_is_refused_either_way(path: str) -> None:
    with pytest.raises((ValueError, RecursionError)):
        decode_request(b"[" * 100_000 + b"]" * 100_000)


VALUES = {
    "event": {"type": "m.room.message", "content": {"body": "é 😀", "n": 1, "f": 0.5}},
    "null inside": {"a": None, "b": "null"},
    "lone surrogate": {"a": "\ud800"},
    "nul": {"a": "\x00"},
    "big int": {"a": 2**64, "b": -(2**70)},
    "bool": {"a": True, "b": False},
    "nested": {"a": [[[[{"b": []}]]]]},
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_an_item_text_reads_back_as_the_same_value(path: str, value: Any) -> None:
    text = item_text(value)
    assert typed(json.loads(text)) == typed(value)


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_an_item_text_decodes_as_decode_json_reads_it(path: str, value: Any) -> None:
    text = item_text(value)
    assert typed(decode_item(text)) == typed(decode_json(text)) == typed(value)


@pytest.mark.parametrize(
    "text",
    ['{"a": 1e999}', '{"a": NaN}', '{"a": -Infinity}', '{"a": ', '{"a": "\ud800"', "\ud800"],
)
def test_an_item_text_decode_json_refuses_is_refused_either_way(path: str, text: str) -> None:
    with pytest.raises(ValueError):
        decode_json(text)
    with pytest.raises(ValueError):
        decode_item(text)


def test_an_item_text_with_a_lone_surrogate_decodes_either_way(path: str) -> None:
    escaped = '{"a":"\\ud800"}'  # as item_text stores it
    raw = '{"a":"\ud800"}'  # as a store could hand it back, the surrogate itself
    for text in (escaped, raw):
        assert decode_item(text) == decode_json(text) == {"a": "\ud800"}


def test_a_lone_surrogate_is_stored_as_an_escape(path: str) -> None:
    # A str holding one cannot be UTF-8 encoded: the escape is what any store takes.
    assert item_text({"a": "\ud800"}) == '{"a":"\\ud800"}'


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_an_item_with_nan_or_infinity_is_refused_not_nulled(path: str, number: float) -> None:
    # orjson would write null: the value would silently change on its way to a handler.
    with pytest.raises(ValueError, match="Out of range float"):
        item_text({"content": {"n": number}})


class Label(str):
    pass


@pytest.mark.parametrize(
    "value",
    [{"a": datetime.datetime(2026, 1, 1)}, {"a": object()}, {1: "x", "b": Label("y")}],
    ids=["datetime", "object", "mixed keys and a str subclass"],
)
def test_what_json_would_not_write_is_not_written_by_orjson_either(path: str, value: Any) -> None:
    try:
        expected: str | type[Exception] = json.dumps(value, separators=(",", ":"))
    except TypeError:
        expected = TypeError
    if expected is TypeError:
        with pytest.raises(TypeError):
            item_text(value)
    else:
        assert json.loads(item_text(value)) == json.loads(str(expected))


def test_a_transaction_splits_the_same_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    body = (
        b'{"events": ['
        b'{"type": "m.room.message", "room_id": "!a:x",'
        b' "content": {"body": "\\u00e9 \xf0\x9f\x98\x80"}},'
        b'{"type": "m.room.message", "room_id": "!a:x", "content": {"n": 18446744073709551616}},'
        b'{"type": "m.room.message", "room_id": "!a:x", "content": {"n": 1e999}},'
        b'{"type": "m.room.message", "room_id": "!a:x", "content": {"s": "\\udc00", "v": null}},'
        b'{"type": 5, "room_id": "!a:x"}'
        b"]}"
    )

    def split() -> tuple[list[Any], list[tuple[str, str]]]:
        items, rejected = split_transaction(decode_request(body))
        return (
            [(item.lane, typed(json.loads(item.event_json))) for item in items],
            [(letter.lane, letter.error) for letter in rejected],
        )

    fast = split()
    monkeypatch.setattr(_json, "orjson", None)
    assert fast == split()
    assert len(fast[0]) == 3 and len(fast[1]) == 2


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_json_value_decodes_and_encodes_as_json_does(value: Any) -> None:
    body = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert typed(decode_request(body)) == typed(json.loads(body))
    assert typed(json.loads(item_text(value))) == typed(value)
