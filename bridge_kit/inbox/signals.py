"""Control-flow signals between bridge_kit's layers: exceptions that say what to do next.

They are not errors a caller handles, so they stand outside the
:class:`~bridge_kit.errors.BridgeKitError` tree (an ``except BridgeKitError`` must
not swallow a signal meant for the inbox or the HTTP server):

- :class:`NotReady` and :class:`Park`, raised by an inbox preprocessor or handler,
  tell :class:`~bridge_kit.inbox.lanes.Inbox` to try an item again later, or to
  move it out of its lane until what it waits for arrives;
- :class:`ErrorReply`, raised while a request of the homeserver is handled, is
  what the appservice API answers (status, errcode, message);
- :class:`TransactionFailed`, raised by the transaction processor, tells the
  appservice API that a transaction was not stored (and so not acknowledged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["ErrorReply", "NotHere", "NotReady", "Park", "TransactionFailed"]


class NotReady(Exception):
    """Raised by an inbox preprocessor: this item cannot be handled *yet*.

    The inbox tries the item again after ``retry_after`` seconds, counting no
    attempt; its lane's later items wait behind it, so their order holds. Once
    ``give_up_after`` seconds have passed since the item was first found not ready
    (or first failed), it becomes a dead letter with ``reason`` as its error.
    A replayed dead letter gets the full wait again.
    """

    def __init__(self, reason: str, *, retry_after: float, give_up_after: float) -> None:
        if not retry_after > 0 or not give_up_after >= 0:
            raise ValueError("retry_after must be > 0 and give_up_after >= 0")
        self.reason = reason
        self.retry_after = retry_after
        self.give_up_after = give_up_after
        super().__init__(reason)


class NotHere(NotReady):
    """A :class:`NotReady` for what another daemon on the shared store has and this one
    has not (a bridge login's live client, which only the daemon holding its lease
    keeps): the item is deferred like any not-ready item, and this process leaves
    its lane alone for a while after, so the daemon that can handle it claims it.
    """


class Park(Exception):
    """Raised by an inbox preprocessor or handler: this item waits for ``key``, outside
    its lane.

    The inbox moves the item out of its lane into the parked items (durably), and
    the lane goes on with its later items at once. :meth:`bridge_kit.inbox.lanes.Inbox.unpark`
    with the same ``key`` puts it back at the end of its lane (so it is handled
    after later events of its room); :meth:`~bridge_kit.inbox.lanes.Inbox.give_up_parked`
    makes it a dead letter. Once ``give_up_after`` seconds have passed since it was
    first not ready it becomes a dead letter with ``reason`` as its error.

    ``recheck``, if given, is awaited once the item is parked: True means what it
    waits for came in the meantime (between the failed try and the parking), and
    the item is unparked at once.
    """

    def __init__(
        self,
        key: str,
        *,
        give_up_after: float,
        reason: str,
        recheck: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        if not key or not give_up_after >= 0:
            raise ValueError("a park key must not be empty, and give_up_after must be >= 0")
        self.key = key
        self.give_up_after = give_up_after
        self.reason = reason
        self.recheck = recheck
        super().__init__(f"{reason} (waits for {key})")


class ErrorReply(Exception):
    """Raised inside an appservice route: answer with this Matrix error body."""

    def __init__(self, status: int, errcode: str, message: str) -> None:
        self.status = status
        self.errcode = errcode
        self.message = message
        super().__init__(f"{status} {errcode}: {message}")


class TransactionFailed(Exception):
    """Processing a received transaction failed; it was not acknowledged."""

    def __init__(self, txn_id: str) -> None:
        self.txn_id = txn_id
        super().__init__(f"transaction {txn_id} failed")
