"""JSON with finite numbers only, for what bridge_kit reads from the homeserver and
what it sends anyone.

Python's :mod:`json` reads ``NaN``, ``Infinity`` and ``-Infinity``, turns a number
too large for a float (``1e999``) into infinity, and writes all of them back as
``NaN``/``Infinity``, which no other JSON parser accepts and no Matrix body holds.
:func:`decode_json` refuses them on the way in, and the encoders here refuse to
write them (``allow_nan=False``), so a bad number fails where it is made instead of
travelling on.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, NoReturn

__all__ = ["decode_json", "encode_json", "json_text"]


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
