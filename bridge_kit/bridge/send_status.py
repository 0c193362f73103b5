"""Message send status: a Matrix message a portal could not bridge is never silent.

:class:`SendStatusReporter` runs the send of one Matrix event to the remote
side. A transient failure is retried (``retries`` times, with backoff), with a
``PENDING`` status meanwhile; a failure that stays ends in a
``com.beeper.message_send_status`` event relating to the message (``FAIL_*``,
with a reason) and a notice replying to it that says why, as
``bridge.message_status`` asks: ``off`` (neither), ``notice`` (the notice
only) or ``both``. After a ``PENDING`` status a success is told too, so a
client does not keep showing the message as pending.

A connector says how a send failed by raising :class:`~bridge_kit.errors.SendFailed` (or
:class:`~bridge_kit.errors.InvalidInput` for what the network refuses, which
is never retried); a :class:`~bridge_kit.errors.RemoteError` or a connection
error (``OSError``, ``TimeoutError``, an aiohttp client error) is taken as
transient, anything else as a bug.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aiohttp
import attrs

from bridge_kit.errors import InvalidInput, RemoteError, RemoteRefused, SendFailed
from bridge_kit.inbox.signals import NotReady, Park

__all__ = [
    "MESSAGE_STATUS_EVENT",
    "NoticeMode",
    "SendOutcome",
    "SendStatus",
    "SendStatusReporter",
    "StatusReason",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MESSAGE_STATUS_EVENT = "com.beeper.message_send_status"


class SendStatus(enum.Enum):
    SUCCESS = "SUCCESS"
    PENDING = "PENDING"
    FAIL_RETRIABLE = "FAIL_RETRIABLE"
    FAIL_PERMANENT = "FAIL_PERMANENT"


class StatusReason(enum.StrEnum):
    """Why a message was not bridged (the event's ``reason``)."""

    GENERIC = "m.event_not_handled"
    UNSUPPORTED = "com.beeper.unsupported_event"
    TOO_OLD = "m.event_too_old"
    NETWORK_ERROR = "m.foreign_network_error"
    NO_PERMISSION = "m.no_permission"
    BRIDGE_UNAVAILABLE = "m.bridge_unavailable"


class NoticeMode(enum.Enum):
    """What a failure sends to the room (``bridge.message_status``)."""

    OFF = "off"
    NOTICE = "notice"
    BOTH = "both"


class _Sender(Protocol):
    """What sends the status events and notices (the bridge bot's Intent)."""

    async def send_event(
        self, room_id: str, event_type: str, content: Any, *, txn_id: str | None = None
    ) -> str: ...

    async def send_notice(self, room_id: str, text: str, *, reply_to: str | None = None) -> str: ...


@attrs.frozen
class SendOutcome:
    """How the send of one event ended (for the caller's logs and tests)."""

    status: SendStatus
    attempts: int
    message: str = ""


class SendStatusReporter:
    """Runs sends to the remote side and tells the room how they ended.

    ``sender`` sends the events (the bridge bot's Intent, or a function giving it:
    the bot exists once the app started); ``network`` is the connector's
    network id (the event's ``network``);
    ``retries`` is how many times a transient failure is tried again, after
    ``backoff``, then twice that, and so on.
    """

    def __init__(
        self,
        sender: _Sender | Callable[[], _Sender],
        network: str,
        *,
        mode: NoticeMode = NoticeMode.BOTH,
        retries: int = 2,
        backoff: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sender = sender
        self.network = network
        self.mode = mode
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep

    async def deliver(
        self,
        room_id: str,
        event_id: str,
        send: Callable[[], Awaitable[T]],
        *,
        what: str = "message",
        failed_before: bool = False,
    ) -> tuple[SendOutcome, T | None]:
        """Run ``send`` (retrying transient failures) and report a failure in the room.

        Returns the outcome and what ``send`` returned (``None`` if it failed).
        Never raises for a failed send: the room was told. ``failed_before``: an
        earlier run told the room this event failed; a success now is told too.
        """
        pending = failed_before
        for attempt in range(1, self.retries + 2):
            try:
                result = await send()
            except (NotReady, Park):
                raise  # the inbox's own signals: it waits and tries the event again
            except Exception as exc:  # every failure is told to the room
                failure = _as_failure(exc)
                if failure.transient and attempt <= self.retries:
                    log.info("sending %s %s failed (%s); retrying", what, event_id, failure.message)
                    if not pending:
                        pending = True
                        await self._status(room_id, event_id, SendStatus.PENDING, failure)
                    await self._sleep(self.backoff * 2 ** (attempt - 1))
                    continue
                return await self.report_failure(room_id, event_id, failure, what, attempt), None
            if pending:
                await self._status(room_id, event_id, SendStatus.SUCCESS, None)
            return SendOutcome(SendStatus.SUCCESS, attempt), result
        raise AssertionError("unreachable: the last attempt returns")

    @property
    def sender(self) -> _Sender:
        sender = self._sender
        return sender() if callable(sender) else sender

    async def report_failure(
        self,
        room_id: str,
        event_id: str,
        failure: SendFailed,
        what: str = "message",
        attempts: int = 1,
    ) -> SendOutcome:
        """Tell the room that ``event_id`` was not bridged, and why (no send tried:
        e.g. a sender without a login in a room without a relay)."""
        status = SendStatus.FAIL_RETRIABLE if failure.transient else SendStatus.FAIL_PERMANENT
        log.warning("%s %s not bridged: %s", what, event_id, failure.message)
        await self._status(room_id, event_id, status, failure)
        if self.mode is not NoticeMode.OFF:
            certainty = "may not have been" if failure.transient else "was not"
            await self._tell(
                self.sender.send_notice(
                    room_id,
                    f"⚠️ Your {what} {certainty} bridged: {failure.message}",
                    reply_to=event_id,
                )
            )
        return SendOutcome(status, attempts, failure.message)

    async def _status(
        self, room_id: str, event_id: str, status: SendStatus, failure: SendFailed | None
    ) -> None:
        if self.mode is not NoticeMode.BOTH:
            return
        content: dict[str, Any] = {
            "network": self.network,
            "m.relates_to": {"rel_type": "m.reference", "event_id": event_id},
            "status": status.value,
        }
        if failure is not None and status is not SendStatus.SUCCESS:
            content["reason"] = str(failure.reason)
            content["message"] = failure.message
        # One transaction id per (event, status): a handler run twice sends each once.
        txn_id = f"mss.{event_id}.{status.value}"
        await self._tell(
            self.sender.send_event(room_id, MESSAGE_STATUS_EVENT, content, txn_id=txn_id)
        )

    @staticmethod
    async def _tell(sending: Awaitable[str]) -> None:
        try:
            await sending
        except Exception:
            # The status is a courtesy: failing to send it must not fail the handler.
            log.exception("cannot send a message status")


def _as_failure(exc: Exception) -> SendFailed:
    if isinstance(exc, SendFailed):
        return exc
    if isinstance(exc, InvalidInput):
        return SendFailed(str(exc), reason=StatusReason.UNSUPPORTED)
    if isinstance(exc, RemoteRefused):
        # The network's "no": sending it again unchanged gets the same answer.
        return SendFailed(_one_line(exc))
    if isinstance(exc, RemoteError | OSError | TimeoutError | aiohttp.ClientError):
        # The network or the connection to it failed: worth another try.
        return SendFailed(_one_line(exc), transient=True)
    # A bug: the user learns that it failed, the log gets the traceback.
    log.error("sending to the remote side failed unexpectedly", exc_info=exc)
    return SendFailed("an internal error in the bridge", reason=StatusReason.GENERIC)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
