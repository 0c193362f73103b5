"""attrs models of the wire formats, and the cattrs converter that maps them to JSON."""

from bridge_kit.types.converter import converter, describe_error, structure, unstructure
from bridge_kit.types.device_events import DeviceListUpdate, OtkCounts, ToDeviceEvent
from bridge_kit.types.devices import Device
from bridge_kit.types.error_body import MatrixErrorBody
from bridge_kit.types.events import DeviceLists, Event, Transaction
from bridge_kit.types.keys import (
    DeviceKeys,
    KeysClaimResponse,
    KeysQueryResponse,
    KeysUploadResponse,
    OneTimeKey,
)
from bridge_kit.types.media import MediaConfig, MediaInfo, MediaMessage
from bridge_kit.types.messages import Presence, RelatesTo
from bridge_kit.types.register import (
    AuthData,
    LoginType,
    RegisterRequest,
    RegisterResponse,
    RegistrationKind,
)
from bridge_kit.types.room import (
    CreateRoomRequest,
    CreateRoomResponse,
    MessageType,
    RoomPreset,
    RoomVisibility,
    StateEventInput,
    TextMessage,
)
from bridge_kit.types.room_state import Member, PowerLevels, ResolvedAlias

__all__ = [
    "AuthData",
    "CreateRoomRequest",
    "CreateRoomResponse",
    "Device",
    "DeviceKeys",
    "DeviceListUpdate",
    "DeviceLists",
    "Event",
    "KeysClaimResponse",
    "KeysQueryResponse",
    "KeysUploadResponse",
    "LoginType",
    "MatrixErrorBody",
    "MediaConfig",
    "MediaInfo",
    "MediaMessage",
    "Member",
    "MessageType",
    "OneTimeKey",
    "OtkCounts",
    "PowerLevels",
    "Presence",
    "RegisterRequest",
    "RegisterResponse",
    "RegistrationKind",
    "RelatesTo",
    "ResolvedAlias",
    "RoomPreset",
    "RoomVisibility",
    "StateEventInput",
    "TextMessage",
    "ToDeviceEvent",
    "Transaction",
    "converter",
    "describe_error",
    "structure",
    "unstructure",
]
