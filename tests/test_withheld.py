"""Reading ``m.room_key.withheld`` contents (bridge_kit.crypto.withheld): what a
sender may put in one, well-formed or not, never raises."""

from __future__ import annotations

from typing import Any

import pytest

from bridge_kit.crypto.withheld import WithheldNotice

GOOD = {
    "algorithm": "m.megolm.v1.aes-sha2",
    "room_id": "!room:test.local",
    "session_id": "SESSION",
    "sender_key": "CURVE",
    "code": "m.unverified",
    "reason": "Device not verified",
}


def test_a_notice_about_a_session_is_read_and_described() -> None:
    notice = WithheldNotice.from_content(GOOD)
    assert notice == WithheldNotice("!room:test.local", "SESSION", "CURVE", "m.unverified",
                                    "Device not verified")  # fmt: skip
    assert notice.describe() == "the room key was withheld (m.unverified): Device not verified"
    bare = WithheldNotice.from_content({**GOOD, "reason": None})
    assert bare is not None and bare.describe() == "the room key was withheld (m.unverified)"


@pytest.mark.parametrize(
    "change",
    [
        {"algorithm": "m.olm.v1.curve25519-aes-sha2"},  # m.no_olm: about Olm, no session
        {"room_id": None},
        {"session_id": 7},
        {"sender_key": ""},
        {"code": ["m.unverified"]},
    ],
)
def test_a_notice_that_names_no_session_is_none(change: dict[str, Any]) -> None:
    content = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    assert WithheldNotice.from_content(content) is None


def test_a_long_reason_or_code_is_cut_and_an_odd_reason_dropped() -> None:
    notice = WithheldNotice.from_content({**GOOD, "reason": "x" * 10_000, "code": "c" * 500})
    assert notice is not None
    assert len(notice.describe()) < 500
    odd = WithheldNotice.from_content({**GOOD, "reason": {"not": "text"}})
    assert odd is not None and odd.reason is None
