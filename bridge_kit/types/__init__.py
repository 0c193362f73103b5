"""attrs models of the wire formats, and the cattrs converter that maps them to JSON."""

from bridge_kit.types.converter import converter, describe_error, structure, unstructure
from bridge_kit.types.errors import AuthFlow, MatrixErrorBody, UiaaResponse
from bridge_kit.types.events import DeviceLists, Event, Transaction
from bridge_kit.types.register import (
    AuthData,
    LoginType,
    RegisterRequest,
    RegisterResponse,
    RegistrationKind,
)

__all__ = [
    "AuthData",
    "AuthFlow",
    "DeviceLists",
    "Event",
    "LoginType",
    "MatrixErrorBody",
    "RegisterRequest",
    "RegisterResponse",
    "RegistrationKind",
    "Transaction",
    "UiaaResponse",
    "converter",
    "describe_error",
    "structure",
    "unstructure",
]
