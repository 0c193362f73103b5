"""Derived transaction IDs: the same handler run for the same event sends nothing twice."""

from __future__ import annotations

import pytest

from bridge_kit.delivery import handling, next_txn_id

ROOM = "!room:test.local"


def ids_of_one_run(event: str = "$e1", handler: str = "h", user: str = "@a:hs") -> list[str]:
    with handling("bridge", event, handler):
        return [
            next_txn_id(user, ROOM, "m.room.message"),
            next_txn_id(user, ROOM, "m.room.message"),
            next_txn_id(user, ROOM, "m.reaction"),
        ]


def test_a_rerun_derives_the_same_ids_in_the_same_order() -> None:
    first = ids_of_one_run()
    assert first == ids_of_one_run()
    assert len(set(first)) == 3, "each send of one run needs its own ID"


@pytest.mark.parametrize(
    "changed",
    [{"event": "$e2"}, {"handler": "other"}, {"user": "@b:hs"}],
)
def test_every_part_of_the_identity_changes_the_ids(changed: dict[str, str]) -> None:
    assert set(ids_of_one_run()).isdisjoint(ids_of_one_run(**changed))


def test_the_room_and_type_change_the_id() -> None:
    with handling("bridge", "$e", "h"):
        in_room = next_txn_id("@a:hs", ROOM, "m.room.message")
    with handling("bridge", "$e", "h"):
        elsewhere = next_txn_id("@a:hs", "!other:test.local", "m.room.message")
    assert in_room != elsewhere


def test_outside_a_handler_ids_are_random() -> None:
    assert next_txn_id("@a:hs", ROOM, "m.room.message") != next_txn_id(
        "@a:hs", ROOM, "m.room.message"
    )
