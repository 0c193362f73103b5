"""What the helper modules of :mod:`bridge_kit.intent` need from an :class:`Intent`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

import attrs

from bridge_kit.client.homeserver import HomeserverClient, quote_segment
from bridge_kit.types.converter import converter

CLIENT = "/_matrix/client/v3"


class OutgoingEncryption(Protocol):
    """What encrypts an intent's room events (bridge_kit.crypto.bridge.BridgeEncryption)."""

    async def outgoing(
        self, intent: Any, room_id: str, event_type: str, content: Any
    ) -> tuple[str, Any]:
        """The type and content to send: ``m.room.encrypted`` in an encrypted room."""
        ...


class Actor(Protocol):
    """An :class:`~bridge_kit.intent.Intent`, as the module functions see it."""

    client: HomeserverClient
    user_id: str
    encryption: OutgoingEncryption | None

    @property
    def device_id(self) -> str | None: ...

    async def ensure_registered(self) -> None: ...

    async def _request(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: Any,
        query: Mapping[str, Any] | None = None,
        resend: bool = True,
    ) -> dict[str, Any]: ...

    async def send_event(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any] | Any,
        *,
        txn_id: str | None = None,
        timestamp: int | None = None,
    ) -> str: ...

    async def send_state(
        self,
        room_id: str,
        event_type: str,
        content: Mapping[str, Any] | Any,
        state_key: str = "",
        *,
        timestamp: int | None = None,
    ) -> str: ...


#: The endpoints (under ``/_matrix/client/v3``) whose effect depends on the device
#: they come from: its keys, the to-device messages it sends. Only these carry the
#: unstable name of the device parameter as well (see :func:`device_query`).
UNSTABLE_DEVICE_ENDPOINTS: Final = frozenset({"/keys/upload", "/sendToDevice/{eventType}/{txnId}"})
#: MSC3202's name for the ``device_id`` query parameter, before MSC4326 made it stable.
UNSTABLE_DEVICE_ID: Final = "org.matrix.msc3202.device_id"


def device_query(device_id: str | None, endpoint: str = "") -> dict[str, str]:
    """The query parameters that make a request to ``endpoint`` act as ``device_id``
    (none for ``None``).

    ``device_id`` is the stable name (spec v1.17, MSC4326), the only one Synapse
    reads today. Homeservers from before it was stable read only MSC3202's
    ``org.matrix.msc3202.device_id``: it goes along on the requests where acting
    as the wrong device would matter (:data:`UNSTABLE_DEVICE_ENDPOINTS`), and only there.
    """
    if device_id is None:
        return {}
    if endpoint in UNSTABLE_DEVICE_ENDPOINTS:
        return {"device_id": device_id, UNSTABLE_DEVICE_ID: device_id}
    return {"device_id": device_id}


def room_path(room_id: str) -> str:
    """``/_matrix/client/v3/rooms/{roomId}`` for this room."""
    return f"{CLIENT}/rooms/{quote_segment(room_id)}"


def content_json(content: Mapping[str, Any] | Any) -> Any:
    """Event or account-data content as JSON: from a mapping or an attrs model."""
    if attrs.has(type(content)):
        return converter.unstructure(content)
    if isinstance(content, Mapping):
        return dict(content)
    raise TypeError(f"event content must be a mapping or an attrs model, not {type(content)!r}")
