"""The item limit and the one-time-key counts Synapse sends (no homeserver: the bodies
are shaped as Synapse 1.163 shapes them).

Synapse adds to each transaction the key counts of *every device of every appservice
user* in the rooms of its events (``count_bulk_e2e_one_time_keys_for_as``), under both
unstable spellings, with the fallback key types. A portal room with many puppets, each
with a device, makes that large; refusing it (413) would stop delivery for good, since
Synapse resends the same transaction for as long as it fails (facts §9).
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge_kit import defaults
from bridge_kit.inbox.records import ItemKind
from bridge_kit.inbox.signals import ErrorReply
from bridge_kit.inbox.transactions import split_transaction
from tests.test_device_hooks import to_device
from tests.test_inbox import message


def synapse_body(devices: int, *, events: int = 100, to_devices: int = 100) -> dict[str, Any]:
    counts = {
        f"@_bk_p{n}:test.local": {f"BRIDGE{n}": {"signed_curve25519": 50}} for n in range(devices)
    }
    fallback = {
        f"@_bk_p{n}:test.local": {f"BRIDGE{n}": ["signed_curve25519"]} for n in range(devices)
    }
    return {
        "events": [message(f"e{n}") for n in range(events)],
        "de.sorunome.msc2409.to_device": [to_device(n) for n in range(to_devices)],
        "org.matrix.msc3202.device_one_time_key_counts": counts,
        "org.matrix.msc3202.device_one_time_keys_count": counts,
        "org.matrix.msc3202.device_unused_fallback_key_types": fallback,
    }


def test_the_key_counts_of_a_big_portal_room_do_not_get_the_transaction_refused() -> None:
    devices = defaults.MAX_TRANSACTION_ITEMS + 1
    items, rejected = split_transaction(synapse_body(devices))
    assert rejected == []
    kinds = [item.kind for item in items]
    assert kinds.count(ItemKind.EVENT) == 100
    assert kinds.count(ItemKind.TO_DEVICE) == 100
    assert kinds.count(ItemKind.OTK_COUNTS) == devices


def test_key_counts_past_their_own_limit_are_refused_with_a_clear_reason() -> None:
    devices = defaults.MAX_TRANSACTION_KEY_COUNTS + 1
    with pytest.raises(ErrorReply) as refused:
        split_transaction(synapse_body(devices, events=0, to_devices=0))
    assert (refused.value.status, refused.value.errcode) == (413, "M_TOO_LARGE")
    assert f"{devices}" in str(refused.value) and "one-time-key counts" in str(refused.value)
