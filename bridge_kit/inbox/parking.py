"""Parked inbox items: events that wait for something outside their lane.

A preprocessor (or handler) that raises :class:`~bridge_kit.inbox.signals.Park` says
"this item waits for ``key``": the inbox moves it out of its lane into the
store's parked items, and the lane goes on with its later items at once. So
one sender's undecryptable events cannot hold up a room. The price: a parked
event is handled *after* the later events of its room, when it comes back.

- :meth:`ParkedItems.unpark` (``Inbox.unpark``): what ``key`` waited for came;
  its items go back to the end of their lanes, in the order they first arrived.
- :meth:`ParkedItems.give_up` (``Inbox.give_up_parked``): it will never come;
  its items become dead letters with the reason given.
- :meth:`ParkedItems.expire`, run by the inbox's scheduler every second or poll
  interval, whichever is longer:
  items parked past their ``give_up_after`` become dead letters, whether or not
  new events arrive.

Parked items are in the store, so they survive a restart; each move is one
commit that only the first of two racing processes makes. Crypto is the first
user (:mod:`bridge_kit.crypto.bridge`): events waiting for a room key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Final

from bridge_kit.inbox.items import Item, describe_item, item_event_id, item_type, parse_item
from bridge_kit.inbox.records import (
    InboxItem,
    NewDeadLetter,
    ParkedItem,
    Parking,
    clipped_error,
    storable,
)
from bridge_kit.inbox.signals import Park
from bridge_kit.metrics import Metrics
from bridge_kit.store.base import Store

__all__ = ["ParkedItems", "dead_letter"]

log = logging.getLogger(__name__)

#: Parked items buried per store read, when many give up at once.
_EXPIRE_BATCH: Final = 100
#: The metric's reason for a parked item that gave up: the one a deferral's uses.
_REASON: Final = "not_ready"


def dead_letter(
    item: InboxItem,
    handler: str | None,
    error: str,
    attempts: int,
    parsed: Item | None,
    done: Sequence[str] = (),
) -> NewDeadLetter:
    """The dead letter of ``item``: its raw JSON, why, what it was (if parsed), and
    ``done``, the handlers that succeeded for it (a replay does not run them again)."""
    event_id = item_event_id(parsed) if parsed is not None else None
    event_type = item_type(parsed) if parsed is not None else None
    return NewDeadLetter(
        lane=item.lane,
        kind=item.kind,
        event_json=item.event_json,
        error=storable(clipped_error(error)),
        handler=handler and storable(handler),
        attempts=attempts,
        first_failed_at=item.first_failed_at,
        event_id=storable(event_id) if event_id else None,
        event_type=storable(event_type) if event_type is not None else None,
        done_handlers=tuple(storable(name) for name in done),
    )


class ParkedItems:
    """The parking side of one :class:`~bridge_kit.inbox.lanes.Inbox`; ``wake`` tells it that
    items came back into their lanes."""

    def __init__(self, store: Store, metrics: Metrics | None, wake: Callable[[], None]) -> None:
        self.store = store
        self.metrics = metrics
        self._wake = wake

    async def park(
        self, item: InboxItem, parsed: Item, name: str, done: list[str], park: Park
    ) -> None:
        """``name`` raised ``park`` for ``item``: park it, or bury it if it waited enough."""
        now = time.time()
        first = item.first_failed_at if item.first_failed_at is not None else now
        give_up_at = first + park.give_up_after
        if give_up_at <= now:
            log.error(
                "%s waited %.1f s for %s in %s; it is now a dead letter: %s",
                describe_item(parsed), now - first, name, item.lane, park.reason,
            )  # fmt: skip
            # An item still in the inbox: bury it from there.
            letter = dead_letter(item, name, park.reason, item.attempts, parsed, done)
            await self.store.bury_item(item.id, letter)
            self._count_dead()
            return
        parking = Parking(park.key, park.reason, give_up_at, first, tuple(done))
        if not await self.store.park_item(item.id, parking):
            return  # another worker (whose lease we took over) moved it already
        # DEBUG, as a deferral: a sender can make many, and a dead letter logs an ERROR.
        log.debug(
            "%s in %s waits for %s outside its lane (%s), at most %.1f s more",
            describe_item(parsed), item.lane, park.key, park.reason, give_up_at - now,
        )  # fmt: skip
        if park.recheck is not None and await park.recheck():
            await self.unpark(park.key)

    async def unpark(self, key: str) -> int:
        """Put the items parked under ``key`` back into their lanes; return how many."""
        count = await self.store.unpark_items(key)
        if count:
            log.info("%d parked items waiting for %s are back in their lanes", count, key)
            self._wake()
        return count

    async def give_up(self, key: str, reason: str) -> int:
        """Make the items parked under ``key`` dead letters with ``reason``; return how many."""
        buried = 0
        while parked := await self.store.parked_items(key=key, limit=_EXPIRE_BATCH):
            for one in parked:
                buried += await self._bury(one, reason)
        return buried

    async def expire(self) -> int:
        """Bury the items whose wait ran out; return how many."""
        buried = 0
        while parked := await self.store.parked_items(due_by=time.time(), limit=_EXPIRE_BATCH):
            for one in parked:
                waited = time.time() - one.parking.first_failed_at
                buried += await self._bury(one, one.parking.reason, waited)
        return buried

    async def _bury(self, parked: ParkedItem, reason: str, waited: float | None = None) -> int:
        item = parked.item
        try:
            parsed: Item | None = parse_item(item.kind, item.event_json)
        except Exception:  # it parsed when it was parked; a letter needs no model
            parsed = None
        # The letter's first failure is the parked row's, which the store fills in.
        letter = dead_letter(
            item, None, reason, item.attempts, parsed, parked.parking.done_handlers
        )
        if not await self.store.bury_parked(item.id, letter):
            return 0  # another process buried or unparked it first
        what = describe_item(parsed) if parsed is not None else f"item {item.id}"
        if waited is None:
            log.error("%s in %s is now a dead letter: %s", what, item.lane, reason)
        else:
            log.error(
                "%s waited %.1f s for %s in %s; it is now a dead letter: %s",
                what, waited, parked.parking.key, item.lane, reason,
            )  # fmt: skip
        self._count_dead()
        return 1

    def _count_dead(self) -> None:
        if self.metrics is not None:
            self.metrics.count_dead_letter(_REASON)
