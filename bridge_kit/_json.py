"""JSON with finite numbers only, for what bridge_kit reads from the homeserver and
what it sends anyone.

Python's :mod:`json` reads ``NaN``, ``Infinity`` and ``-Infinity``, turns a number
too large for a float (``1e999``) into infinity, and writes all of them back as
``NaN``/``Infinity``, which no other JSON parser accepts and no Matrix body holds.
:func:`decode_json` refuses them on the way in, and the encoders here refuse to
write them (``allow_nan=False``), so a bad number fails where it is made instead of
travelling on.

With orjson installed (the ``fast`` extra), :func:`decode_request` and
:func:`item_text` use it, for the bodies and values where it gives exactly what
the standard library gives, and fall back to :mod:`json` for the rest: that is
what makes a transaction cheap to accept (see ``bench/bench_transactions.py``).
"""

from __future__ import annotations

import json
import math
from types import ModuleType
from typing import Any, Final, NoReturn

__all__ = [
    "decode_item",
    "decode_json",
    "decode_request",
    "encode_json",
    "item_text",
    "json_text",
]

orjson: ModuleType | None
try:
    import orjson
except ImportError:  # optional: the standard library does everything, only slower
    orjson = None


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:20]} is too large for a float")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
# One encoder each: json.dumps with options builds a new one per call. ASCII output
# escapes lone surrogates too, which a UTF-8 body could not hold.
_BODY_ENCODER: Final = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_TEXT_ENCODER: Final = json.JSONEncoder(allow_nan=False)


def decode_json(text: str) -> Any:
    """Parse JSON text; :class:`ValueError` for NaN, Infinity and numbers that overflow."""
    return _DECODER.decode(text)


def encode_json(data: Any) -> bytes:
    """Compact JSON bytes for a request body; :class:`ValueError` for NaN or infinity."""
    return _BODY_ENCODER.encode(data).encode()


def json_text(data: Any) -> str:
    """JSON text for a response (``web.json_response(dumps=json_text)``), finite numbers only."""
    return _TEXT_ENCODER.encode(data)


# -- request bodies and the items stored from them ---------------------------------

# NaN and Infinity are not JSON: the body is refused. A number too large for a float
# (1e999) is JSON, and is read as infinity here; in a transaction, the event holding
# it is then refused on its own, as a dead letter (see bridge_kit.inbox.transactions), so
# one bad number does not make the homeserver resend everything behind it forever.
_REQUEST_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)

# orjson reads an integer outside 64 bits as a float (json keeps it exact), so a body
# with 19 digits in a row anywhere (even in a string: then it is merely slower) is
# left to json. Mapping every digit to "0" and finding the run is one pass in C.
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_NUMBER: Final = b"0" * 19


def decode_request(body: bytes) -> Any:
    """Parse a request body (any JSON encoding); :class:`ValueError` for what is not
    JSON, including NaN and Infinity, and :class:`RecursionError` for deep nesting.

    orjson refuses everything json treats specially (lone surrogates, UTF-16,
    a BOM, 1e999, nesting past its limit): those bodies, and bodies with long
    numbers, are parsed by json, so both paths give the same values.
    """
    if orjson is not None and _LONG_NUMBER not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # json decides, and says what is wrong
    # What json.loads(body, parse_constant=...) does, without a new decoder per call.
    return _REQUEST_DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


# For the items stored from a transaction. allow_nan=False: a number too large for a
# float (1e999) must not become "Infinity", which is not JSON, on its way to a handler.
# ensure_ascii: a lone surrogate (valid in JSON text, not in UTF-8) then travels as
# \udXXX, which every store can hold. check_circular=False: decoded JSON has no cycles.
_ITEM_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
).encode
# Anything that is not plain JSON data (a datetime, a str subclass...) raises, so
# json gets it and refuses it as before.
_ORJSON_STRICT: Final = (
    0
    if orjson is None
    else orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def decode_item(text: str) -> Any:
    """Parse an item's stored JSON text (see :func:`item_text`): :func:`decode_json`'s
    values and errors, through orjson where it gives the same (as in
    :func:`decode_request`: not for long numbers; json decides what orjson refuses)."""
    raw = text.encode("utf-8", "surrogatepass")
    if orjson is not None and _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return _DECODER.decode(text)


def item_text(value: Any) -> str:
    """Compact JSON text of decoded JSON, as stored in the inbox: :class:`ValueError`
    for NaN or infinity, :class:`TypeError` for what is not JSON data.

    orjson writes what it cannot hold differently (NaN and infinity as ``null``)
    or not at all (lone surrogates, integers past 64 bits): json writes a value
    whose orjson text has a ``null`` in it, or that orjson refused.
    """
    if orjson is not None:
        try:
            text: bytes = orjson.dumps(value, option=_ORJSON_STRICT)
        except TypeError:  # orjson.JSONEncodeError is one
            pass
        else:
            if b"null" not in text:
                return text.decode()
    return _ITEM_ENCODER(value)
