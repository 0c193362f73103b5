"""Transactions the homeserver pushes: validated, stored in the inbox, acknowledged.

:class:`TransactionProcessor` is the inbox's front door. It splits a
transaction into its events, writes them to the store's inbox together with
the txnId in one commit, and returns; handlers run later (see
:mod:`bridge_kit.inbox.lanes`). So the acknowledgement costs one commit, whatever
the handlers do, and a transaction accepted before is acknowledged without
storing anything twice.

A transaction is recognised by its txnId *and* a digest of its body
(:func:`body_digest`): Synapse on SQLite numbers its transactions from 1 again
after a restart (and any Synapse restored from a backup reuses numbers), so a
txnId alone would answer new transactions as duplicates and drop their events.
The same txnId with another digest is stored as a new transaction (and logged
at WARNING, rate-limited); the same digest is a duplicate. The dedup records
are pruned to a count and an age (``appservice.dedup_keep``,
``appservice.dedup_max_age``).

A body too large for a transaction (past ``appservice.max_body_bytes`` or
:data:`~bridge_kit.defaults.MAX_TRANSACTION_ITEMS`) gets 413, which the
homeserver resends forever: :meth:`TransactionProcessor.refused` logs it at
ERROR (rate-limited), counts it in the metrics and keeps the last one for the
health endpoint.

A malformed event does not stall the bridge: it becomes a dead letter with
its raw JSON and the validation error, and the rest of the transaction is
accepted. Only a body that is not a JSON object with an ``events`` list is
refused (400), because nothing in it can be trusted to be a transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import cattrs

from bridge_kit import defaults
from bridge_kit._json import item_text
from bridge_kit.errors import StoreError, json_type
from bridge_kit.inbox.device_items import count_device_items, first_present, split_device_items
from bridge_kit.inbox.records import Acceptance, ItemKind, NewDeadLetter, NewInboxItem, storable
from bridge_kit.inbox.signals import ErrorReply, TransactionFailed
from bridge_kit.logs import LogLimiter
from bridge_kit.metrics import Metrics
from bridge_kit.store.base import Store
from bridge_kit.types import describe_error
from bridge_kit.types.events import checked_room_id

__all__ = ["Refusal", "TransactionProcessor", "body_digest", "event_lane", "split_transaction"]

log = logging.getLogger(__name__)

#: Where each kind of item comes from in a transaction body, stable name first. Only the
#: first name present is read: Synapse puts the same ephemeral events under both names
#: when a registration has both ephemeral flags.
_SOURCES: Final = (
    (ItemKind.EVENT, ("events",)),
    (ItemKind.EPHEMERAL, ("ephemeral", "de.sorunome.msc2409.ephemeral")),
)
_INVALID_LANE: Final = "~invalid"
_REPR_LIMIT: Final = 65_536
#: A dead letter's validation error is for a person: its first kilobyte says it all.
_ERROR_LIMIT: Final = 1024
#: Dead letters of one transaction logged one by one; the rest in one line.
_LOGGED_LETTERS: Final = 20
# For a dead letter's JSON: readable, not compact; ASCII, so a lone surrogate is an escape.
_ENCODE_AS_IS: Final = json.JSONEncoder(allow_nan=False).encode


# Sorted keys: the digest of a body without events must not depend on key order. ASCII,
# so a lone surrogate is an escape, and NaN allowed: 1e999 is read as infinity.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def body_digest(body: Mapping[str, Any]) -> bytes:
    """What tells two bodies under one txnId apart: the same transaction resent, or another.

    Not a hash of the raw bytes: Synapse does not resend the bytes it sent. A
    retry is rebuilt from its database (synapse/appservice/scheduler.py,
    ``_Recoverer`` and ``get_oldest_unsent_txn``): only the persistent events are
    kept, by event ID, and serialised anew, so ``unsigned.age`` has grown and a
    redaction since may have stripped the content; ephemeral events, to-device
    messages, key counts and device lists are dropped. What is stable is the
    list of event IDs, so a body with events is known by its event IDs in order
    (an event without a string ``event_id``, which becomes a dead letter, by its
    JSON minus ``unsigned``). A body without events is known by the rest of it,
    in canonical JSON; a Synapse retry of such a body carries nothing, so it can
    only be told apart harmlessly (it stores nothing).
    """
    events = body.get("events")
    if isinstance(events, list) and events:
        ids = _event_ids(events)
        if ids is not None:  # as good as always: one encode for all
            known_by = "\0".join(["events", *ids]).encode("utf-8", "surrogatepass")
        else:
            known_by = b"\0".join([b"events", *map(_event_identity, events)])
    else:
        known_by = b"other\0" + _CANONICAL.encode(dict(body)).encode()
    return hashlib.sha256(known_by).digest()


def _event_ids(events: list[Any]) -> list[str] | None:
    """The events' IDs, or None if one has none (then :func:`_event_identity` each)."""
    ids = []
    for event in events:
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if not isinstance(event_id, str):
            return None
        ids.append(event_id)
    return ids


def _event_identity(event: Any) -> bytes:
    if isinstance(event, Mapping):
        event_id = event.get("event_id")
        if isinstance(event_id, str):
            return event_id.encode("utf-8", "surrogatepass")
        event = {key: value for key, value in event.items() if key != "unsigned"}
    return b"json:" + _CANONICAL.encode(event).encode()


@attrs.frozen
class Refusal:
    """A transaction refused with 413 (see :meth:`TransactionProcessor.refused`)."""

    txn_id: str
    #: ``body`` (past ``max_body_bytes``) or ``items`` (past ``MAX_TRANSACTION_ITEMS``).
    reason: str
    message: str
    #: Unix time.
    at: float


def event_lane(kind: ItemKind, room_id: str | None) -> str:
    """The lane an event is handled in: its room (events), or a lane of its own.

    Ephemeral events get lanes apart from the room's timeline, so a typing
    notice never waits behind a slow message handler.
    """
    if kind is ItemKind.EVENT:
        return room_id or "~no-room"
    return f"~ephemeral:{room_id}" if room_id else "~ephemeral"


def split_transaction(body: Any) -> tuple[list[NewInboxItem], list[NewDeadLetter]]:
    """The inbox items of a transaction body, and the dead letters of its invalid items.

    Raises :class:`~bridge_kit.inbox.signals.ErrorReply` (400 ``M_BAD_JSON``) for a body
    that is not a JSON object with an ``events`` list.
    """
    if not isinstance(body, dict):
        raise _bad_json(f"A transaction must be a JSON object, not {json_type(body)}")
    if not isinstance(body.get("events"), list):
        found = "none" if "events" not in body else json_type(body["events"])
        raise _bad_json(f"A transaction must have an 'events' array (found {found})")
    _check_size(body)
    items: list[NewInboxItem] = []
    rejected: list[NewDeadLetter] = []
    for kind, keys in _SOURCES:
        key, value = first_present(body, keys)
        if key is None:
            continue
        if not isinstance(value, list):
            rejected.append(
                _letter(kind, value, f"'{key}' must be an array, not {json_type(value)}")
            )
            continue
        for index, raw in enumerate(value):
            _split_item(kind, f"{key}[{index}]", raw, items, rejected)
    # To-device events, device lists and key counts: see bridge_kit.inbox.device_items.
    device_items, device_rejected = split_device_items(body)
    items += device_items
    rejected += device_rejected
    return items, rejected


def _check_size(body: dict[str, Any]) -> None:
    """Refuse a transaction with more items than any homeserver sends, before any
    work on them (see :data:`~bridge_kit.defaults.MAX_TRANSACTION_ITEMS`)."""
    count = sum(
        len(value)
        for _, keys in _SOURCES
        if isinstance(value := first_present(body, keys)[1], list)
    )
    count += count_device_items(body)
    if count > defaults.MAX_TRANSACTION_ITEMS:
        raise ErrorReply(
            413,
            "M_TOO_LARGE",
            f"A transaction may carry at most {defaults.MAX_TRANSACTION_ITEMS} events, "
            f"ephemeral and to-device events and device key counts; this one has {count}",
        )


def _split_item(
    kind: ItemKind,
    where: str,
    raw: Any,
    items: list[NewInboxItem],
    rejected: list[NewDeadLetter],
) -> None:
    try:
        # Checked, not built: the inbox builds the Event when a handler needs it.
        room_id = checked_room_id(raw)
        text = item_text(raw)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        rejected.append(_letter(kind, raw, f"invalid event at {where}: {describe_error(exc)}"))
        return
    lane = event_lane(kind, room_id)
    if not lane.isascii() and storable(lane) != lane:
        rejected.append(_letter(kind, raw, f"invalid event at {where}: room_id is not Unicode"))
        return
    items.append(NewInboxItem(lane, kind, text))


def _letter(kind: ItemKind, raw: Any, error: str) -> NewDeadLetter:
    fields = raw if isinstance(raw, Mapping) else {}
    room_id, event_id, event_type = (fields.get(k) for k in ("room_id", "event_id", "type"))
    if len(error) > _ERROR_LIMIT:
        error = error[: _ERROR_LIMIT - 1] + "…"
    return NewDeadLetter(
        lane=storable(room_id) if isinstance(room_id, str) else _INVALID_LANE,
        kind=kind,
        event_json=_as_json(raw),
        error=storable(error),
        event_id=storable(event_id) if isinstance(event_id, str) else None,
        event_type=storable(event_type) if isinstance(event_type, str) else None,
    )


def _as_json(raw: Any) -> str:
    """``raw`` as JSON text; what JSON cannot hold (1e999 became infinity) as its repr,
    under a key no event has, so a replay finds it invalid again instead of handling it."""
    try:
        return _ENCODE_AS_IS(raw)
    except ValueError:
        return json.dumps({"bridge_kit.not_json": repr(raw)[:_REPR_LIMIT]})


def _bad_json(message: str) -> ErrorReply:
    return ErrorReply(400, "M_BAD_JSON", message)


class TransactionProcessor:
    """Accepts transactions into the store's inbox, once per txnId and body digest.

    ``on_accepted`` is called after each newly accepted transaction (the
    inbox's wake-up). Every ``prune_every`` accepted transactions, or
    :data:`~bridge_kit.defaults.DEDUP_PRUNE_INTERVAL` seconds (and on the first
    after start), the dedup records are pruned to the newest ``prune_keep`` and
    to those younger than ``prune_max_age`` seconds, in the background.
    """

    def __init__(
        self,
        store: Store,
        on_accepted: Callable[[], object] | None = None,
        *,
        metrics: Metrics | None = None,
        prune_every: int = defaults.DEDUP_PRUNE_EVERY,
        prune_keep: int = defaults.DEDUP_KEEP,
        prune_max_age: float | None = defaults.DEDUP_MAX_AGE,
    ) -> None:
        if prune_every < 1 or prune_keep < 0:
            raise ValueError("prune_every must be >= 1 and prune_keep >= 0")
        if prune_max_age is not None and not prune_max_age > 0:
            raise ValueError("prune_max_age must be more than 0 seconds")
        self._store = store
        self._on_accepted = on_accepted
        self._metrics = metrics
        self._prune_every = prune_every
        self._prune_keep = prune_keep
        self._prune_max_age = prune_max_age
        self._since_prune = prune_every - 1
        self._last_prune = time.monotonic()
        self._prune_task: asyncio.Task[None] | None = None
        #: Transactions refused with 413 since start, and the last of them (for health).
        self.refusals = 0
        self.last_refusal: Refusal | None = None
        # One INFO line per transaction tells an operator that traffic flows; the
        # limit keeps a flood from filling the disk.
        self.log = LogLimiter(log, logging.INFO, what="transactions")
        # After a homeserver restart every txnId it sends may be a reused one: one
        # line says so, the rest are counted.
        self._reused_log = LogLimiter(
            log, logging.WARNING, what="reused txnIds", burst=1, interval=600.0
        )
        # The homeserver resends a refused transaction forever: once a minute is enough.
        self._refused_log = LogLimiter(
            log, logging.ERROR, what="refused transactions", burst=1, interval=60.0
        )

    async def process(self, txn_id: str, body: Any) -> bool:
        """Accept ``body`` under ``txn_id``; False when it was accepted before.

        Raises :class:`ErrorReply` for a malformed body (413 for one with too
        many items, see :meth:`refused`) and :class:`TransactionFailed` when the
        store could not take it (then the homeserver must send it again: it was
        not acknowledged).
        """
        started = time.perf_counter()
        try:
            items, rejected = split_transaction(body)
        except ErrorReply as refused:
            if refused.status == 413:
                self.refused(txn_id, "items", refused.message)
            raise
        digest = body_digest(body)
        stored = time.perf_counter()
        try:
            accepted = await self._store.accept_transaction(txn_id, items, rejected, digest=digest)
        except Exception as exc:
            if self._metrics is not None:
                self._metrics.count_handler_failure()
            # A store failure is an operations matter: one line says it. Anything else
            # is a bug in bridge_kit, and its traceback is what finds it.
            log.error(
                "transaction %s could not be stored (not acknowledged; the homeserver "
                "will send it again): %s",
                txn_id,
                exc,
                exc_info=None if isinstance(exc, StoreError) else exc,
            )
            raise TransactionFailed(txn_id) from exc
        done = time.perf_counter()
        if not accepted:
            if self._metrics is not None:
                self._metrics.count_duplicate()
            self.log.log(
                "transaction %s was accepted before: acknowledged again, nothing stored",
                txn_id, totals={"repeated": 1},
            )  # fmt: skip
            return False
        if accepted is Acceptance.REUSED_ID:
            self._reused(txn_id, stored=len(items) + len(rejected))
        self._accepted(txn_id, len(items), rejected, done - stored)
        self.log.log(
            "accepted transaction %s: %d events%s in %.1f ms",
            txn_id, len(items), f" (+{len(rejected)} invalid)" if rejected else "",
            (done - started) * 1000, totals={"events": len(items)},
        )  # fmt: skip
        return True

    def refused(self, txn_id: str, reason: str, message: str) -> None:
        """Note a transaction refused with 413 (``reason``: ``body`` or ``items``).

        The homeserver keeps resending it and sends nothing after it, so this is
        an outage: an ERROR line (at most one a minute), a metric, and the health
        endpoint's ``refused_transactions`` and ``last_refused``.
        """
        self.refusals += 1
        self.last_refusal = Refusal(txn_id, reason, message, time.time())
        if self._metrics is not None:
            self._metrics.count_refused_transaction(reason)
        self._refused_log.log(
            "transaction %s refused with 413 (%s): %s. The homeserver will resend it "
            "forever and deliver nothing after it until the limit is raised "
            "(appservice.max_body_bytes) or the transaction is removed on the homeserver",
            _loggable(txn_id), reason, message,
        )  # fmt: skip

    def _reused(self, txn_id: str, stored: int) -> None:
        if self._metrics is not None:
            self._metrics.count_reused_txn_id()
        if stored:  # a retry of a body without events carries nothing: not worth a line
            self._reused_log.log(
                "transaction %s: this txnId came before with another body, so this is "
                "a new transaction and was stored (the homeserver numbers its "
                "transactions anew, as Synapse on SQLite does after a restart)",
                _loggable(txn_id),
            )

    def _accepted(
        self, txn_id: str, events: int, rejected: list[NewDeadLetter], seconds: float
    ) -> None:
        if self._metrics is not None:
            self._metrics.count_transaction(events, seconds)
            if rejected:
                self._metrics.count_dead_letter("invalid", len(rejected))
        # A few lines say what is wrong; thousands would only flood the log.
        for letter in rejected[:_LOGGED_LETTERS]:
            log.warning("transaction %s: set aside as a dead letter: %s", txn_id, letter.error)
        if len(rejected) > _LOGGED_LETTERS:
            log.warning(
                "transaction %s: %d more invalid items set aside as dead letters",
                txn_id,
                len(rejected) - _LOGGED_LETTERS,
            )
        if self._on_accepted is not None:
            self._on_accepted()
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        self._since_prune += 1
        # By time too: at a few transactions a day the count alone would keep records
        # for months past their age.
        due = time.monotonic() - self._last_prune >= defaults.DEDUP_PRUNE_INTERVAL
        if self._since_prune < self._prune_every and not due:
            return
        if self._prune_task is not None and not self._prune_task.done():
            return
        self._since_prune = 0
        self._last_prune = time.monotonic()
        self._prune_task = asyncio.create_task(self._prune())

    async def _prune(self) -> None:
        try:
            removed = await self._store.prune_transactions(self._prune_keep, self._prune_max_age)
        except Exception:
            log.exception("pruning transaction dedup records failed; will try again later")
            return
        log.debug("pruned %d transaction dedup records", removed)

    async def wait_idle(self) -> None:
        """Wait for a background prune, if one runs (for shutdown and tests)."""
        if self._prune_task is not None:
            await self._prune_task


def _loggable(text: str) -> str:
    """A txnId from the URL, cut short and escaped: one line of ASCII in the log."""
    return text[:200].encode("unicode_escape").decode("ascii")
