"""``m.room_key.withheld``: a client saying it will not share a Megolm session's key.

The to-device content (spec, "Reporting that decryption keys are withheld") has
``algorithm``, ``room_id``, ``session_id``, ``sender_key``, ``code`` (``m.unverified``,
``m.blacklisted``, ``m.unauthorised``, ``m.unavailable``, ``m.no_olm``) and an
optional human-readable ``reason``. Older clients send it as
``org.matrix.room_key.withheld``. ``m.no_olm`` names no session (it is about the
Olm channel), so it ends no event's wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from bridge_kit.crypto.account import MEGOLM_ALGORITHM

__all__ = ["WITHHELD_TYPES", "WithheldNotice"]

#: The stable type and the one older clients (and Synapse's tests) still send.
WITHHELD_TYPES: Final = ("m.room_key.withheld", "org.matrix.room_key.withheld")
#: Enough of a sender's reason for a dead letter; the rest is cut.
_REASON_CHARS: Final = 300
_CODE_CHARS: Final = 100


@attrs.frozen
class WithheldNotice:
    """A withheld notice about one room's Megolm session."""

    room_id: str
    session_id: str
    sender_key: str
    code: str
    reason: str | None = None

    @classmethod
    def from_content(cls, content: Mapping[str, Any]) -> WithheldNotice | None:
        """The notice in a to-device content; None if it names no Megolm session of a
        room (``m.no_olm``, another algorithm) or a field has the wrong type."""
        if content.get("algorithm") != MEGOLM_ALGORITHM:
            return None
        fields = [content.get(name) for name in ("room_id", "session_id", "sender_key", "code")]
        texts = [value for value in fields if isinstance(value, str) and value]
        if len(texts) != len(fields):
            return None
        room_id, session_id, sender_key, code = texts
        reason = content.get("reason")
        return cls(
            room_id,
            session_id,
            sender_key,
            code[:_CODE_CHARS],
            reason[:_REASON_CHARS] if isinstance(reason, str) and reason else None,
        )

    def describe(self) -> str:
        """The dead letter's error: the code, and the sender's reason if it gave one."""
        said = f": {self.reason}" if self.reason else ""
        return f"the room key was withheld ({self.code}){said}"
