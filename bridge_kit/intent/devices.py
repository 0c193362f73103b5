"""Devices (MSC4190), end-to-end keys and to-device messages of an Intent: the implementations.

With ``io.element.msc4190: true`` in its registration, an appservice creates
its users' devices itself (``PUT /devices/{deviceId}?user_id=...``) and deletes
them without interactive auth. A request that also carries ``device_id`` (and
MSC3202's ``org.matrix.msc3202.device_id``) acts as that device: that is how
keys are uploaded for it. No cryptography happens here; the keys are the
encryption library's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import cattrs

from bridge_kit.client.homeserver import quote_segment, structure_reply
from bridge_kit.errors import DevicesUnavailable, MatrixRequestError, WrongType
from bridge_kit.inbox.delivery import to_device_txn_id
from bridge_kit.intent._actor import CLIENT, content_json
from bridge_kit.types.converter import converter, describe_error
from bridge_kit.types.devices import Device, DevicesResponse, DeviceUpdate, SendToDeviceRequest
from bridge_kit.types.keys import (
    DeviceKeys,
    KeysClaimRequest,
    KeysClaimResponse,
    KeysQueryRequest,
    KeysQueryResponse,
    KeysUploadRequest,
    KeysUploadResponse,
    KeyValue,
    OneTimeKey,
)

if TYPE_CHECKING:
    from bridge_kit.intent import Intent

T = TypeVar("T")

#: How homeservers without MSC4190 (or without the flag loaded) answer the PUT: no such
#: route, "Unknown device" from a PUT that only renames, or a plain refusal (4xx only).
_REFUSED_ERRCODES = frozenset({"M_UNRECOGNIZED", "M_NOT_FOUND", "M_FORBIDDEN", "M_UNKNOWN"})
_REFUSED_STATUSES = frozenset({404, 405})


def checked_device_id(device_id: str) -> str:
    """``device_id``, or :class:`ValueError` for one no homeserver would take."""
    if not isinstance(device_id, str) or not device_id:
        raise ValueError(f"a device ID is a non-empty string, not {device_id!r}")
    if "\x00" in device_id:
        raise ValueError(f"a device ID cannot hold NUL: {device_id[:100]!r}")
    return device_id


def device_path(device_id: str) -> str:
    return f"{CLIENT}/devices/{quote_segment(device_id)}"


async def create_device(intent: Intent, device_id: str, display_name: str | None) -> None:
    checked_device_id(device_id)
    _require_device_management(intent, f"create device {device_id!r}")
    plain = intent.with_device(None)  # the device does not exist yet: no masquerading
    try:
        # PUT sets the device to one state, so a resend after a lost reply is harmless.
        await plain._request(
            "PUT", device_path(device_id), "/devices/{deviceId}", body=DeviceUpdate(display_name)
        )
    except MatrixRequestError as error:
        if _refused(error):
            raise DevicesUnavailable(
                f"the homeserver refused to create device {device_id!r} for {intent.user_id} "
                f"({error.status} {error.errcode or 'no errcode'}: {error.message})"
            ) from error
        raise
    if intent.room_state is not None:
        await intent.room_state.store.remember_device(intent.user_id, device_id, display_name)


def _refused(error: MatrixRequestError) -> bool:
    """Whether the homeserver refused the PUT (no MSC4190) rather than failed at it:
    a 5xx (Synapse's internal error is 500 M_UNKNOWN) is an outage, not a verdict."""
    if error.status >= 500:
        return False
    return error.errcode in _REFUSED_ERRCODES or error.status in _REFUSED_STATUSES


async def delete_device(intent: Intent, device_id: str) -> None:
    checked_device_id(device_id)
    _require_device_management(intent, f"delete device {device_id!r}")
    plain = intent.with_device(None)
    try:
        await plain._request("DELETE", device_path(device_id), "/devices/{deviceId}", body={})
    except MatrixRequestError as error:
        if error.status == 401 and "flows" in error.body:
            raise DevicesUnavailable(
                f"the homeserver asked for interactive auth to delete device {device_id!r} "
                f"of {intent.user_id}, which an appservice with MSC4190 does not need"
            ) from error
        raise
    if intent.room_state is not None:
        await intent.room_state.store.forget_device(intent.user_id, device_id)


async def list_devices(intent: Intent) -> list[Device]:
    reply = await intent.with_device(None)._request(
        "GET", f"{CLIENT}/devices", "/devices", body=None
    )
    return structure_reply(reply, DevicesResponse, "devices").devices


def _require_device_management(intent: Intent, what: str) -> None:
    # Synapse 1.163 creates the device even without the flag, other homeservers (and
    # older Synapse) refuse: a bridge should not work only by a homeserver's leniency.
    if intent.device_management is False:
        raise DevicesUnavailable(
            f"cannot {what} for {intent.user_id}: the registration does not have "
            "io.element.msc4190: true"
        )


# -- keys -------------------------------------------------------------------------------


async def keys_upload(
    intent: Intent,
    device_keys: DeviceKeys | Mapping[str, Any] | None,
    one_time_keys: Mapping[str, KeyValue | Mapping[str, Any]] | None,
    fallback_keys: Mapping[str, KeyValue | Mapping[str, Any]] | None,
) -> dict[str, int]:
    if intent.device_id is None:
        raise ValueError(
            "keys are uploaded for a device: use intent.with_device(device_id).keys_upload(...)"
        )
    request = KeysUploadRequest(
        device_keys=_device_keys(intent, device_keys),
        one_time_keys=_keys(one_time_keys),
        fallback_keys=_keys(fallback_keys),
    )
    reply = await intent._request("POST", f"{CLIENT}/keys/upload", "/keys/upload", body=request)
    return structure_reply(reply, KeysUploadResponse, "keys/upload").one_time_key_counts


def _device_keys(intent: Intent, keys: DeviceKeys | Mapping[str, Any] | None) -> DeviceKeys | None:
    if keys is None:
        return None
    if not isinstance(keys, DeviceKeys):
        keys = _structured(keys, DeviceKeys, "device_keys")
    if (keys.user_id, keys.device_id) != (intent.user_id, intent.device_id):
        # The homeserver files them under the requesting device; other IDs inside the
        # signed object would make every other client reject the keys.
        raise ValueError(
            f"device_keys are for {keys.user_id} {keys.device_id!r}, but this intent is "
            f"{intent.user_id} {intent.device_id!r}"
        )
    return keys


def _keys(keys: Mapping[str, KeyValue | Mapping[str, Any]] | None) -> dict[str, KeyValue] | None:
    if keys is None:
        return None
    return {
        name: value
        if isinstance(value, str | OneTimeKey)
        else _structured(value, OneTimeKey, f"key {name!r}")
        for name, value in keys.items()
    }


def _structured(value: Any, cls: type[T], what: str) -> T:
    """``value`` (a mapping) as ``cls``; a :class:`ValueError` that says what is wrong."""
    if not isinstance(value, Mapping):
        raise WrongType(f"a mapping or a {cls.__name__} for {what}", value)
    try:
        return converter.structure(dict(value), cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {describe_error(exc)}") from exc


async def keys_query(
    intent: Intent, users: Iterable[str] | Mapping[str, Sequence[str]], timeout_ms: int | None
) -> KeysQueryResponse:
    reply = await keys_query_json(intent, users, timeout_ms)
    return structure_reply(reply, KeysQueryResponse, "keys/query")


async def keys_query_json(
    intent: Intent, users: Iterable[str] | Mapping[str, Sequence[str]], timeout_ms: int | None
) -> dict[str, Any]:
    """The ``/keys/query`` reply as the homeserver sent it, unchecked: for the
    encryption layer, which checks each device (and its signature over exactly
    these objects) on its own, where one malformed device of another homeserver's
    user would make the whole typed reply unreadable."""
    wanted = (
        {user: list(devices) for user, devices in users.items()}
        if isinstance(users, Mapping)
        else {user: [] for user in users}
    )
    request = KeysQueryRequest(device_keys=wanted, timeout=timeout_ms)
    return await intent._request("POST", f"{CLIENT}/keys/query", "/keys/query", body=request)


async def keys_claim(
    intent: Intent, claims: Mapping[str, Mapping[str, str]], timeout_ms: int | None
) -> KeysClaimResponse:
    reply = await keys_claim_json(intent, claims, timeout_ms)
    return structure_reply(reply, KeysClaimResponse, "keys/claim")


async def keys_claim_json(
    intent: Intent, claims: Mapping[str, Mapping[str, str]], timeout_ms: int | None
) -> dict[str, Any]:
    """The ``/keys/claim`` reply as the homeserver sent it, unchecked (as
    :func:`keys_query_json`: each claimed key is checked on its own)."""
    wanted = {user: dict(devices) for user, devices in claims.items()}
    request = KeysClaimRequest(one_time_keys=wanted, timeout=timeout_ms)
    # A repeat after a lost reply claims a second key; the first is simply never used.
    return await intent._request("POST", f"{CLIENT}/keys/claim", "/keys/claim", body=request)


async def upload_signing_keys(intent: Intent, body: Mapping[str, Any]) -> None:
    """``POST /keys/device_signing/upload``: the user's cross-signing keys, as the
    encryption layer signed them. An appservice needs no interactive auth for it
    (spec v1.17; Synapse 1.163 asks none of an appservice's users)."""
    await intent._request(
        "POST", f"{CLIENT}/keys/device_signing/upload", "/keys/device_signing/upload",
        body=dict(body),
    )  # fmt: skip


async def upload_signatures(intent: Intent, body: Mapping[str, Any]) -> dict[str, Any]:
    """``POST /keys/signatures/upload``; the reply (its ``failures``) unchecked."""
    return await intent._request(
        "POST", f"{CLIENT}/keys/signatures/upload", "/keys/signatures/upload", body=dict(body)
    )


# -- to-device ---------------------------------------------------------------------------


async def send_to_device(
    intent: Intent,
    event_type: str,
    messages: Mapping[str, Mapping[str, Mapping[str, Any] | Any]],
    txn_id: str | None,
) -> None:
    body = SendToDeviceRequest(
        {
            user: {device: content_json(content) for device, content in devices.items()}
            for user, devices in messages.items()
        }
    )
    # Synapse deduplicates an appservice's txn IDs by path alone (facts §9), so the
    # derived ID names the sending user and device. It takes no number from the
    # handler's room sends (see bridge_kit.inbox.delivery).
    txn_id = txn_id or to_device_txn_id(intent.user_id, intent.device_id, event_type, body.messages)
    await intent._request(
        "PUT",
        f"{CLIENT}/sendToDevice/{quote_segment(event_type)}/{quote_segment(txn_id)}",
        "/sendToDevice/{eventType}/{txnId}",
        body=body,
    )
