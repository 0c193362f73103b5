"""``POST /_matrix/client/v3/register``: request and response, as ruma defines them.

Field for field the ruma ``account::register::v3`` types: every ``Option``
with ``skip_serializing_if = "Option::is_none"`` is omitted when ``None``,
every ``is_default`` field is omitted when it has its default, and
``Response.device_id`` (no skip rule) is always present.
"""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from bridge_kit.types.converter import converter, keep_unknown_keys


class RegistrationKind(enum.Enum):
    """The kind of account being registered; travels in the query string."""

    GUEST = "guest"
    USER = "user"


class LoginType(enum.Enum):
    """The login ``type`` an appservice uses to bypass the registration flows."""

    APPLICATION_SERVICE = "m.login.application_service"


@attrs.frozen
class AuthData:
    """User-interactive auth data (``auth``): a stage ``type``, a ``session``, and stage keys."""

    type: str | None = None
    session: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class RegisterRequest:
    """The body (and ``kind`` query parameter) of a register request."""

    password: str | None = None
    username: str | None = None
    device_id: str | None = None
    initial_device_display_name: str | None = None
    auth: AuthData | None = None
    kind: RegistrationKind = RegistrationKind.USER
    inhibit_login: bool = False
    login_type: LoginType | None = None
    refresh_token: bool = False

    @classmethod
    def for_puppet(cls, localpart: str) -> RegisterRequest:
        """The request an appservice sends for a puppet: no device, no token."""
        return cls(
            username=localpart,
            login_type=LoginType.APPLICATION_SERVICE,
            inhibit_login=True,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body; ``kind`` is not part of it (see :meth:`query`)."""
        result: dict[str, Any] = converter.unstructure(self)
        return result

    def query(self) -> dict[str, str]:
        """The query parameters: ``kind`` only when it is not the default ``user``."""
        if self.kind is RegistrationKind.USER:
            return {}
        return {"kind": self.kind.value}


@attrs.frozen
class RegisterResponse:
    """A successful register response."""

    user_id: str
    access_token: str | None = None
    device_id: str | None = None
    refresh_token: str | None = None
    expires_in: timedelta | None = None


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, AuthData, omit_if_default=True)
    # Every request field is left out when None or at its default, as ruma does.
    converter.register_unstructure_hook(
        RegisterRequest,
        make_dict_unstructure_fn(
            RegisterRequest,
            converter,
            _cattrs_omit_if_default=True,
            kind=override(omit=True),
            login_type=override(rename="type"),
        ),
    )
    converter.register_structure_hook(
        RegisterRequest,
        make_dict_structure_fn(RegisterRequest, converter, login_type=override(rename="type")),
    )
    # device_id has no skip rule in ruma: it is always serialised, null included.
    converter.register_unstructure_hook(
        RegisterResponse,
        make_dict_unstructure_fn(
            RegisterResponse,
            converter,
            _cattrs_omit_if_default=True,
            device_id=override(omit_if_default=False),
            expires_in=override(rename="expires_in_ms"),
        ),
    )
    converter.register_structure_hook(
        RegisterResponse,
        make_dict_structure_fn(
            RegisterResponse, converter, expires_in=override(rename="expires_in_ms")
        ),
    )
