"""End-to-end encryption keys: the bodies of ``/keys/upload``, ``/keys/query`` and ``/keys/claim``.

Raw wire models, no cryptography: a key is the unpadded base64 text the
encryption library made, a signature the text it signed. A one-time or fallback
key is either a bare key (``curve25519:AAAAAQ``: ``"base64"``) or a signed key
object (``signed_curve25519:AAAAAQ``: :class:`OneTimeKey`).
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.errors import WrongType
from bridge_kit.types.converter import keep_unknown_keys

#: user ID -> ``algorithm:key_id`` -> signature.
Signatures = dict[str, dict[str, str]]


@attrs.frozen
class DeviceKeys:
    """A device's identity keys, signed by the device (``device_keys`` of an upload)."""

    user_id: str
    device_id: str
    algorithms: list[str]
    keys: dict[str, str]
    signatures: Signatures = attrs.field(factory=dict)
    unsigned: dict[str, Any] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OneTimeKey:
    """A signed one-time or fallback key (``signed_curve25519``)."""

    key: str
    signatures: Signatures = attrs.field(factory=dict)
    fallback: bool | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


#: A one-time or fallback key: bare, or a signed key object.
KeyValue = str | OneTimeKey


@attrs.frozen
class KeysUploadRequest:
    """The body of ``POST /keys/upload``; an absent part is left as it is on the server."""

    device_keys: DeviceKeys | None = None
    one_time_keys: dict[str, KeyValue] | None = None
    fallback_keys: dict[str, KeyValue] | None = None


@attrs.frozen
class KeysUploadResponse:
    """How many unclaimed one-time keys the device has, per algorithm."""

    one_time_key_counts: dict[str, int] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class KeysQueryRequest:
    """The body of ``POST /keys/query``: user -> device IDs (empty: every device)."""

    device_keys: dict[str, list[str]]
    timeout: int | None = None


@attrs.frozen
class KeysQueryResponse:
    """The reply of ``POST /keys/query``: user -> device -> keys; ``failures`` by server.

    The cross-signing keys (``master_keys`` and the others) are kept as they came.
    """

    device_keys: dict[str, dict[str, DeviceKeys]] = attrs.field(factory=dict)
    failures: dict[str, Any] = attrs.field(factory=dict)
    master_keys: dict[str, Any] = attrs.field(factory=dict)
    self_signing_keys: dict[str, Any] = attrs.field(factory=dict)
    user_signing_keys: dict[str, Any] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class KeysClaimRequest:
    """The body of ``POST /keys/claim``: user -> device -> algorithm wanted."""

    one_time_keys: dict[str, dict[str, str]]
    timeout: int | None = None


@attrs.frozen
class KeysClaimResponse:
    """The reply of ``POST /keys/claim``: user -> device -> ``algorithm:key_id`` -> key."""

    one_time_keys: dict[str, dict[str, dict[str, KeyValue]]] = attrs.field(factory=dict)
    failures: dict[str, Any] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    omitted = override(omit_if_default=True)
    keep_unknown_keys(converter, DeviceKeys, strict=True, unsigned=omitted)
    keep_unknown_keys(converter, OneTimeKey, strict=True, fallback=omitted)

    def structure_key(value: Any, _: Any) -> KeyValue:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return converter.structure(value, OneTimeKey)
        raise WrongType("a key (a string or a signed key object)", value)

    converter.register_structure_hook_func(lambda tp: tp == KeyValue, structure_key)
    for request in (KeysUploadRequest, KeysQueryRequest, KeysClaimRequest):
        converter.register_unstructure_hook(request, _without_none(converter, request))
    keep_unknown_keys(converter, KeysUploadResponse, strict=True)
    keep_unknown_keys(converter, KeysQueryResponse, strict=True)
    keep_unknown_keys(converter, KeysClaimResponse, strict=True)


def _without_none(converter: cattrs.Converter, cls: type[Any]) -> Any:
    """An unstructure hook that leaves out the fields that are ``None``."""

    def unstructure(obj: Any) -> dict[str, Any]:
        return {
            field.name: converter.unstructure(getattr(obj, field.name))
            for field in attrs.fields(cls)
            if getattr(obj, field.name) is not None
        }

    return unstructure
