"""Matrix -> remote: the handlers of Matrix events in portals and management rooms.

A message goes out through its sender's login, or, for a sender without one,
through the portal's relay login with the relay template applied. Before a
message is sent, its event is claimed in the message map
(:meth:`~bridge_kit.store.BridgeRecordStore.claim_event`): a handler the inbox runs twice
finds it claimed and sends nothing the second time. So a message (or edit) is sent
at most once: a crash while it is being sent leaves its claim pending, and the
next run, which cannot know whether it went out, sends nothing and tells the room
that it may not have been bridged. Reactions and redactions are sent at least once
(a crash after the send and before it is recorded sends it again).

On a store several daemons share, an event may be handled by a daemon whose
login for it is on standby (another daemon holds its lease and its live client):
the handler raises :class:`~bridge_kit.inbox.signals.NotHere`, the item waits a
moment, and this daemon leaves the portal's lane to the others, so the holder's
inbox claims it and sends it (typing notices are not passed on: they go only
through a login connected in the daemon that handles them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from bridge_kit.bridge.connector import (
    MatrixEdit,
    MatrixMessage,
    MatrixReaction,
    MatrixReactionRemove,
    MatrixRedaction,
    MatrixTyping,
    NetworkClient,
)
from bridge_kit.bridge.core import BridgeCore
from bridge_kit.bridge.events import MessageKind, RemoteMedia
from bridge_kit.bridge.formatting import parse_edit, reply_target, strip_reply_fallback
from bridge_kit.bridge.logins import Login
from bridge_kit.bridge.permissions import Level
from bridge_kit.bridge.records import LoginState, MessageRecord, PortalRecord, ReactionRecord
from bridge_kit.bridge.send_status import SendStatus, StatusReason
from bridge_kit.errors import RemoteError, SendFailed
from bridge_kit.inbox.signals import NotHere, NotReady
from bridge_kit.store import Store
from bridge_kit.types import Event

__all__ = ["MatrixHandler"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_KINDS = {kind.value: kind for kind in MessageKind}
#: How long an event waits for its login's client to connect before it is retried.
_CONNECT_WAIT = 5.0
#: And how long at most: then the event becomes a dead letter (replayable).
_GIVE_UP = 3600.0
#: How long an event for a login another daemon holds waits before one looks again.
_ELSEWHERE_WAIT = 1.0
#: Login states that only the user can end: their events do not wait for them.
_NEEDS_THE_USER = frozenset(
    {LoginState.BAD_CREDENTIALS, LoginState.LOGGED_OUT, LoginState.UNKNOWN_ERROR}
)


@attrs.frozen
class _Sender:
    """Who sends a Matrix event to the remote side: a login's client, and whether
    it relays for someone without a login."""

    client: NetworkClient
    relayed: bool


class MatrixHandler:
    """The bridge's Matrix event handlers (registered on the app by the bridge)."""

    def __init__(self, bridge: BridgeCore) -> None:
        self.bridge = bridge
        self._typing: dict[str, set[str]] = {}
        #: Events whose earlier send failed (the inbox retries them now).
        self._failed_before: set[str] = set()

    @property
    def store(self) -> Store:
        return self.bridge.app.store

    # -- m.room.message ---------------------------------------------------------------

    async def on_message(self, event: Event) -> None:
        room_id, sender = event.room_id, event.sender
        if room_id is None or sender is None or event.event_id is None:
            return
        if self.bridge.ghosts.is_ghost(sender):
            return  # never bridge our own puppets back
        portal = await self.bridge.portals.by_room(room_id)
        if await self._command(event, portal):
            return
        if portal is None:
            return
        edit = parse_edit(event.content)
        if edit is not None:
            await self._edit(event, portal, edit.target, edit.content)
            return
        await self._send_message(event, portal)

    async def _command(self, event: Event, portal: PortalRecord | None) -> bool:
        body = event.content.get("body")
        if event.content.get("msgtype") != "m.text" or not isinstance(body, str):
            return False
        assert event.room_id is not None and event.sender is not None
        management = portal is None and await self.bridge.is_management_room(event.room_id)
        if portal is None and not management:
            return False
        return await self.bridge.commands.handle(
            sender=event.sender,
            room_id=event.room_id,
            body=body,
            reply=self.bridge.reply_to(event.room_id, event.event_id),
            state=self.bridge,
            management=management,
            event_id=event.event_id,
        )

    async def _send_message(self, event: Event, portal: PortalRecord) -> None:
        assert event.room_id is not None and event.sender is not None
        assert event.event_id is not None
        kind = _KINDS.get(str(event.content.get("msgtype")))
        if kind is None:
            return
        via = await self._sender(event, portal)
        if via is None:
            await self._not_bridged(event, "you are not logged in, and no login relays here")
            return
        if not await self._claim(event, portal):
            return
        content = event.content
        replied = reply_target(content)
        reply_to = await self.store.message_by_event(replied) if replied else None
        if reply_to is not None:
            content = strip_reply_fallback(content)
        plain = await self.bridge.formatter.matrix_to_remote(content)
        name = await self._displayname(event.room_id, event.sender)
        text = self.bridge.relay_text(event.sender, name, plain) if via.relayed else plain
        message = MatrixMessage(
            portal=portal,
            event_id=event.event_id,
            sender_mxid=event.sender,
            sender_name=name,
            kind=kind,
            text=text,
            html=_html(content),
            reply_to=reply_to,
            media=_media(content, kind),
            relayed=via.relayed,
            content=event.content,
            plain_text=plain,
        )
        client = via.client
        sent = await self._releasing(
            event, portal, self._deliver(event, lambda: client.send_message(message))
        )
        if sent is None:
            # It failed for good, and the room was told; a claim kept would stay
            # pending forever (a rerun sends again, and is refused again).
            await self.store.release_event(event.event_id)
            return
        record = MessageRecord(
            portal.key,
            sent.remote_id,
            event.event_id,
            event.room_id,
            sender_mxid=event.sender,
            timestamp=sent.timestamp or time.time(),
        )
        await self.store.put_messages([record])

    async def _claim(self, event: Event, portal: PortalRecord, what: str = "message") -> bool:
        """Claim ``event`` for sending; False when it was claimed (and maybe sent) before
        (a claim released by a failed send, :meth:`_releasing`, is gone: claimed again)."""
        assert event.room_id is not None and event.event_id is not None
        claim = MessageRecord(
            portal.key,
            event.event_id,  # a placeholder until the remote id is known
            event.event_id,
            event.room_id,
            sender_mxid=event.sender or "",
            timestamp=time.time(),
            pending=True,
        )
        if await self.store.claim_event(claim):
            return True
        earlier = await self.store.message_by_event(event.event_id)
        if earlier is not None and earlier.pending:
            # Claimed and never completed nor released: the run that claimed it died
            # while sending. Sending again might post it twice; never silently.
            log.warning("%s: its send was cut short by a restart: not sent again", event.event_id)
            failure = SendFailed(
                "the bridge restarted while sending it; send it again if it did not arrive",
                reason=StatusReason.BRIDGE_UNAVAILABLE,
                transient=True,
            )
            await self.bridge.send_status.report_failure(
                event.room_id, event.event_id, failure, what=what
            )
            return False
        log.debug("%s was claimed before: not sent again", event.event_id)
        return False

    async def _deliver(
        self, event: Event, send: Callable[[], Awaitable[T]], what: str = "message"
    ) -> T | None:
        """``send()`` with its status told in the room (:mod:`~bridge_kit.bridge.send_status`):
        what it returned, or None when it failed for good. A failure still transient
        after the quick retries is raised, for the inbox to try the event again later."""
        assert event.room_id is not None and event.event_id is not None
        failed_before = event.event_id in self._failed_before
        self._failed_before.discard(event.event_id)
        outcome, result = await self.bridge.send_status.deliver(
            event.room_id, event.event_id, send, what=what, failed_before=failed_before
        )
        if outcome.status is SendStatus.FAIL_RETRIABLE:
            self._failed_before.add(event.event_id)  # its room was told: tell success too
            raise RemoteError(outcome.message)
        return result

    async def _releasing(self, event: Event, portal: PortalRecord, send: Awaitable[T]) -> T:
        """Await ``send``; if it fails, release the event's claim, so that the retry
        sends it (only a crash in the middle leaves it claimed: sent at most once)."""
        try:
            return await send
        except Exception:  # not a cancellation: the send may have gone out
            assert event.event_id is not None
            await self.store.release_event(event.event_id)
            raise

    async def _edit(
        self, event: Event, portal: PortalRecord, target_id: str, new: dict[str, Any]
    ) -> None:
        assert event.room_id is not None and event.sender is not None
        assert event.event_id is not None
        target = await self.store.message_by_event(target_id)
        if target is None or target.pending or not self.bridge.connector.capabilities.edits:
            return
        if target.sender_mxid != event.sender:
            # Matrix shows an edit from its message's sender only; through the relay,
            # which sent both, the network would take anyone's.
            log.info("%s: an edit of another user's message, not sent", event.event_id)
            return
        via = await self._sender(event, portal)
        if via is None or not await self._claim(event, portal, "edit"):
            return
        name = await self._displayname(event.room_id, event.sender)
        plain = await self.bridge.formatter.matrix_to_remote(new)
        text = self.bridge.relay_text(event.sender, name, plain) if via.relayed else plain
        edit = MatrixEdit(
            portal=portal,
            event_id=event.event_id,
            sender_mxid=event.sender,
            sender_name=name,
            target=target,
            text=text,
            html=_html(new),
            relayed=via.relayed,
            plain_text=plain,
        )
        client = via.client
        await self._releasing(
            event, portal, self._deliver(event, lambda: client.send_edit(edit), "edit")
        )
        # An edit maps to no remote message: its claim is dropped rather than kept
        # pending forever (only a crash right here could send it twice).
        await self.store.release_event(event.event_id)

    # -- reactions and redactions ------------------------------------------------------

    async def on_reaction(self, event: Event) -> None:
        room_id, sender = event.room_id, event.sender
        if room_id is None or sender is None or event.event_id is None:
            return
        relation = event.content.get("m.relates_to")
        if self.bridge.ghosts.is_ghost(sender) or not isinstance(relation, dict):
            return
        target_id, key = relation.get("event_id"), relation.get("key")
        if not isinstance(target_id, str) or not isinstance(key, str):
            return
        if not self.bridge.connector.capabilities.reactions:
            return
        portal = await self.bridge.portals.by_room(room_id)
        target = await self.store.message_by_event(target_id)
        if portal is None or target is None or target.pending:
            return
        if await self.store.reaction_by_event(event.event_id) is not None:
            return  # sent before
        via = await self._sender(event, portal, relay=False)
        if via is None:
            return
        reaction = MatrixReaction(
            portal=portal, event_id=event.event_id, sender_mxid=sender, target=target, key=key
        )
        remote_id = await via.client.send_reaction(reaction)
        await self.store.put_reaction(
            ReactionRecord(
                portal.key,
                target.remote_id,
                remote_id or sender,
                key,
                event.event_id,
                room_id,
                part=target.part,
                sender_mxid=sender,
                timestamp=time.time(),
            )
        )

    async def on_redaction(self, event: Event) -> None:
        room_id, sender = event.room_id, event.sender
        if room_id is None or sender is None or event.event_id is None:
            return
        if self.bridge.ghosts.is_ghost(sender):
            return
        redacts = event.content.get("redacts") or event.extra.get("redacts")
        if not isinstance(redacts, str):
            return
        portal = await self.bridge.portals.by_room(room_id)
        if portal is None or not self.bridge.connector.capabilities.redactions:
            return
        message = await self.store.message_by_event(redacts)
        if message is not None and not message.pending:
            via = await self._sender(event, portal, relay=False)
            if via is not None:
                redaction = MatrixRedaction(
                    portal=portal, event_id=event.event_id, sender_mxid=sender, target=message
                )
                await via.client.send_redaction(redaction)
            await self.store.delete_messages(portal.key, message.remote_id)
            return
        reaction = await self.store.reaction_by_event(redacts)
        if reaction is not None:
            # Through the remover's login a network removes the remover's reaction:
            # someone else's (a moderator's removal) has no such counterpart.
            mine = reaction.sender_mxid == sender
            via = await self._sender(event, portal, relay=False) if mine else None
            if via is not None:
                removal = MatrixReactionRemove(
                    portal=portal, event_id=event.event_id, sender_mxid=sender, target=reaction
                )
                await via.client.send_reaction_remove(removal)
            await self.store.delete_reaction(redacts)

    # -- typing -------------------------------------------------------------------------

    async def on_typing(self, event: Event) -> None:
        room_id = event.room_id
        user_ids = event.content.get("user_ids")
        if room_id is None or not isinstance(user_ids, list):
            return
        if not self.bridge.connector.capabilities.typing:
            return
        now = {u for u in user_ids if isinstance(u, str) and not self.bridge.ghosts.is_ghost(u)}
        before = self._typing.get(room_id, set())
        if now == before:
            return
        # Only what was passed on is remembered: a user whose login could not take it
        # (not connected yet) is tried again at the homeserver's next typing event.
        passed = before - now
        self._remember_typing(room_id, before & now)
        portal = await self.bridge.portals.by_room(room_id)
        if portal is None:
            return
        for user_id in now - before:
            if await self._send_typing(portal, user_id, typing=True):
                self._remember_typing(room_id, self._typing.get(room_id, set()) | {user_id})
        for user_id in passed:
            await self._send_typing(portal, user_id, typing=False)

    def _remember_typing(self, room_id: str, user_ids: set[str]) -> None:
        if user_ids:
            self._typing[room_id] = user_ids
        else:
            self._typing.pop(room_id, None)  # a room nobody types in costs nothing

    async def _send_typing(self, portal: PortalRecord, user_id: str, *, typing: bool) -> bool:
        """Pass one user's typing on through their login; whether it was."""
        logins = self._own_logins(user_id)
        if not logins or not logins[0].connected or logins[0].client is None:
            return False
        typing_item = MatrixTyping(portal=portal, sender_mxid=user_id, typing=typing)
        await logins[0].client.send_typing(typing_item)
        return True

    # -- helpers -------------------------------------------------------------------------

    async def _not_bridged(self, event: Event, reason: str) -> None:
        assert event.room_id is not None and event.event_id is not None
        failure = SendFailed(reason, reason=StatusReason.NO_PERMISSION)
        await self.bridge.send_status.report_failure(event.room_id, event.event_id, failure)

    async def _sender(
        self, event: Event, portal: PortalRecord, *, relay: bool = True
    ) -> _Sender | None:
        """The client that sends ``event`` to the remote side, or None.

        The sender's own login first (waited for while it connects); a login that
        needs the user (bad credentials, logged out) is passed over, so such a user
        is relayed like one without a login.
        """
        assert event.sender is not None
        own = self._own_logins(event.sender)
        # A login another daemon added since this one last looked is the user's own:
        # used (here or by its holder), not passed over for the relay.
        allowed = self.bridge.permissions.allows(event.sender, Level.USER)
        if not own and allowed and await self.bridge.logins.discover(event.sender):
            own = self._own_logins(event.sender)
        for login in own:
            if login.state in _NEEDS_THE_USER:
                continue
            _not_elsewhere(login)
            if login.client is None:
                continue
            _wait_for(login)
            return _Sender(login.client, relayed=False)
        relay_login = self.bridge.relay_login(portal) if relay else None
        if relay_login is None or not self.bridge.permissions.allows(event.sender, Level.RELAY):
            return None
        if relay_login.state in _NEEDS_THE_USER:
            return None
        _not_elsewhere(relay_login)
        if relay_login.client is None:
            return None
        _wait_for(relay_login)
        return _Sender(relay_login.client, relayed=True)

    def _own_logins(self, user_id: str) -> list[Login]:
        """``user_id``'s logins, while their level lets them use one: a login kept
        after an admin lowered the level (or made before it) is not used."""
        if not self.bridge.permissions.allows(user_id, Level.USER):
            return []
        return self.bridge.logins.of_user(user_id)

    async def _displayname(self, room_id: str, user_id: str) -> str:
        # From the stored member event (the sender's event came to us, so its join
        # did too): no request, and none that the bot, maybe not in the room, may not make.
        member = await self.store.membership(room_id, user_id)
        if member is not None and member.displayname:
            return member.displayname
        return user_id[1:].partition(":")[0]


def _not_elsewhere(login: Login) -> None:
    """Raise NotHere (the daemon holding ``login`` handles the event) if it is on standby."""
    if login.standby:
        raise NotHere(
            f"login {login.id} is connected by another daemon",
            retry_after=_ELSEWHERE_WAIT,
            give_up_after=_GIVE_UP,
        )


def _wait_for(login: Login) -> None:
    """Raise NotReady (the event waits in its lane) unless ``login`` is connected."""
    if not login.connected:
        raise NotReady(
            f"login {login.id} is not connected", retry_after=_CONNECT_WAIT, give_up_after=_GIVE_UP
        )


def _html(content: dict[str, Any]) -> str | None:
    html = content.get("formatted_body")
    if content.get("format") == "org.matrix.custom.html" and isinstance(html, str):
        return html
    return None


def _media(content: dict[str, Any], kind: MessageKind) -> RemoteMedia | None:
    url = content.get("url")
    if kind not in (MessageKind.IMAGE, MessageKind.FILE, MessageKind.AUDIO, MessageKind.VIDEO):
        return None
    if not isinstance(url, str):
        return None
    info = content.get("info") if isinstance(content.get("info"), dict) else {}
    name = content.get("filename") or content.get("body") or "file"
    mimetype = info.get("mimetype") if isinstance(info, dict) else None
    size = info.get("size") if isinstance(info, dict) else None
    return RemoteMedia(
        url,
        name=str(name),
        mimetype=mimetype if isinstance(mimetype, str) else None,
        size=size if isinstance(size, int) else None,
    )
