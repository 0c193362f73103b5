"""Derived transaction IDs: the same handler run for the same event sends nothing twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge_kit.inbox.delivery import handling, next_txn_id, to_device_txn_id

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


# -- no drift: to-device sends and other rooms take no number --------------------------------

KEY_SHARE = {"@human:hs": {"DEV": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "n": 1}}}


def room_sends(*, share_key: bool, other_room: bool) -> list[str]:
    """Two messages into ROOM from one run; before the first, maybe a room-key share and
    a message into another room."""
    with handling("bridge", "$e", "h"):
        if share_key:
            to_device_txn_id("@a:hs", "PUPPETDEV", "m.room.encrypted", KEY_SHARE)
        if other_room:
            next_txn_id("@a:hs", "!other:test.local", "m.room.message")
        return [next_txn_id("@a:hs", ROOM, "m.room.message") for _ in range(2)]


def test_a_key_share_in_the_first_run_only_does_not_shift_the_later_ids() -> None:
    first_run = room_sends(share_key=True, other_room=False)
    assert first_run == room_sends(share_key=False, other_room=False)


def test_a_send_into_another_room_does_not_shift_the_ids() -> None:
    assert room_sends(share_key=False, other_room=True) == room_sends(
        share_key=False, other_room=False
    )


def test_each_type_counts_on_its_own() -> None:
    with handling("bridge", "$e", "h"):
        reaction_first = next_txn_id("@a:hs", ROOM, "m.reaction")
        message_after = next_txn_id("@a:hs", ROOM, "m.room.message")
    with handling("bridge", "$e", "h"):
        message_alone = next_txn_id("@a:hs", ROOM, "m.room.message")
    assert message_after == message_alone != reaction_first


async def test_concurrent_tasks_into_different_rooms_keep_their_ids() -> None:
    rooms = [f"!r{n}:test.local" for n in range(5)]

    async def sends_into(room: str, pauses: int) -> list[str]:
        found = []
        for _ in range(3):
            for _ in range(pauses):
                await asyncio.sleep(0)
            found.append(next_txn_id("@a:hs", room, "m.room.message"))
        return found

    async def run(pauses: list[int]) -> list[list[str]]:
        with handling("bridge", "$e", "h"):
            return await asyncio.gather(
                *(sends_into(room, p) for room, p in zip(rooms, pauses, strict=True))
            )

    # Another interleaving of the tasks, the same IDs per room.
    assert await run([0, 1, 2, 3, 4]) == await run([4, 3, 2, 1, 0])


def test_a_to_device_send_is_known_by_its_content() -> None:
    def run(*contents: dict[str, Any]) -> list[str]:
        with handling("bridge", "$e", "h"):
            return [to_device_txn_id("@a:hs", "DEV", "m.dummy", c) for c in contents]

    one, two = {"@b:hs": {"D": {"n": 1}}}, {"@b:hs": {"D": {"n": 2}}}
    assert run(one, two) == run(one, two)
    assert run(one)[0] == run(two, one)[1]  # no number shared with other contents
    first, again = run(one, one)
    assert first != again  # the same message sent twice on purpose
    assert run({"@b:hs": {"D": {"b": 1, "a": 2}}}) == run({"@b:hs": {"D": {"a": 2, "b": 1}}})


@pytest.mark.parametrize(
    ("user", "device", "event_type"),
    [("@other:hs", "DEV", "m.dummy"), ("@a:hs", "OTHER", "m.dummy"), ("@a:hs", "DEV", "m.x")],
)
def test_the_sender_device_and_type_change_a_to_device_id(
    user: str, device: str, event_type: str
) -> None:
    messages: dict[str, Any] = {"@b:hs": {"D": {}}}
    with handling("bridge", "$e", "h"):
        base = to_device_txn_id("@a:hs", "DEV", "m.dummy", messages)
    with handling("bridge", "$e", "h"):
        changed = to_device_txn_id(user, device, event_type, messages)
    assert base != changed


def test_outside_a_handler_to_device_ids_are_random() -> None:
    messages: dict[str, Any] = {"@b:hs": {"D": {}}}
    assert to_device_txn_id("@a:hs", "D", "t", messages) != to_device_txn_id(
        "@a:hs", "D", "t", messages
    )
