"""The handler registry: which handlers each inbox item gets, and in what order.

:class:`~bridge_kit.app.service.AppService` keeps one and its decorators
(``on_event``, ``on_to_device``, ...) add to it; the inbox asks it, through
:meth:`HandlerRegistry.route`, for an item's handlers. An item gets, in order:

1. the *internal* handlers of its kind (:meth:`HandlerRegistry.add_internal`):
   bridge_kit's own subscribers, e.g. the room-state store for state events, or an
   encryption layer's key tracking for to-device events and device lists;
2. the bridge's handlers for its type, in the order they were registered;
3. the bridge's handlers for every type of its kind.

Each is one step of the item's progress: once it returned, a retry of the item
does not run it again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from bridge_kit.inbox.items import describe_item
from bridge_kit.inbox.lanes import ItemHandler, handler_name
from bridge_kit.inbox.records import ItemKind
from bridge_kit.logs import LogLimiter
from bridge_kit.types import DeviceListUpdate, Event, OtkCounts, ToDeviceEvent

__all__ = [
    "DeviceListHandler",
    "EventHandler",
    "HandlerRegistry",
    "OtkCountsHandler",
    "ToDeviceHandler",
]

log = logging.getLogger(__name__)

EventHandler = Callable[[Event], Awaitable[None]]
ToDeviceHandler = Callable[[ToDeviceEvent], Awaitable[None]]
DeviceListHandler = Callable[[DeviceListUpdate], Awaitable[None]]
OtkCountsHandler = Callable[[OtkCounts], Awaitable[None]]
H = TypeVar("H", bound=Callable[..., Awaitable[None]])

_Table = dict[str | None, list[ItemHandler]]


class HandlerRegistry:
    """The bridge's handlers and bridge_kit's internal ones, per item kind and type.

    ``event_log``, when given, gets one DEBUG line per item whose handlers all
    returned (rate-limited by the :class:`LogLimiter`).
    """

    def __init__(self, event_log: LogLimiter | None = None) -> None:
        self._user: dict[ItemKind, _Table] = {kind: defaultdict(list) for kind in ItemKind}
        self._internal: dict[ItemKind, _Table] = {kind: defaultdict(list) for kind in ItemKind}
        self._event_log = event_log

    def decorator(self, kind: ItemKind, event_type: str | None = None) -> Callable[[H], H]:
        """A decorator that registers a bridge's handler for items of ``kind`` and
        ``event_type`` (every type when None)."""

        def register(handler: H) -> H:
            self._user[kind][event_type].append(handler)
            return handler

        return register

    def add_internal(
        self, kind: ItemKind, handler: ItemHandler, event_type: str | None = None
    ) -> None:
        """Run ``handler`` before every bridge handler, for items of ``kind`` (and
        ``event_type``, unless None). Internal handlers run in the order added.

        For bridge_kit's own layers (the room-state store, encryption): such a handler
        gets the item as the bridge's handlers will (after the inbox's preprocessors),
        and is retried, and its item dead-lettered, like any handler.
        """
        self._internal[kind][event_type].append(handler)

    def handled_types(self) -> set[str]:
        """The event types bridge handlers are registered for (the metrics' labels)."""
        return {t for table in self._user.values() for t in table if t is not None}

    def route(self, kind: ItemKind, event_type: str | None) -> Sequence[ItemHandler]:
        """The handlers for an item of ``kind`` and ``event_type``, in the order they run."""
        handlers = [
            *_matching(self._internal[kind], event_type),
            *_matching(self._user[kind], event_type),
        ]
        if handlers and self._event_log is not None and log.isEnabledFor(logging.DEBUG):
            # The inbox completes an item when its last handler returns: log it there.
            handlers[-1] = _logged(handlers[-1], self._event_log)
        return handlers


def _matching(table: _Table, event_type: str | None) -> list[ItemHandler]:
    typed = table.get(event_type, []) if event_type is not None else []
    return [*typed, *table.get(None, ())]


def _logged(handler: ItemHandler, limiter: LogLimiter) -> ItemHandler:
    """``handler``, then one (rate-limited) DEBUG line for the item it completed.

    The wrapper has the handler's name (:func:`~bridge_kit.inbox.lanes.handler_name`):
    the inbox records a handler's progress, and derives its sends' transaction
    IDs, under that name, so logging must not change it.
    """

    async def handled(item: Any) -> None:
        await handler(item)
        if isinstance(item, Event):
            limiter.log(
                "handled %s (%s) in %s from %s",
                item.event_id or "an event", item.type, item.room_id, item.sender,
            )  # fmt: skip
        else:
            limiter.log("handled %s", describe_item(item))

    # handler_name() joins __module__ and __qualname__ with a dot; any split of the
    # name at a dot gives the same name back.
    handled.__module__, _, handled.__qualname__ = handler_name(handler).rpartition(".")
    return handled
