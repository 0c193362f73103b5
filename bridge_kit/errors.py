"""The one exception hierarchy of bridge_kit, rooted in :class:`BridgeKitError`.

Matrix errors from the homeserver are mapped by errcode to subclasses of
:class:`MatrixRequestError`, so a bridge can ``except UserInUse`` instead of
comparing strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class BridgeKitError(Exception):
    """Base class of every error bridge_kit raises on purpose."""


class ConfigError(BridgeKitError):
    """The daemon configuration is invalid; the message names every problem."""


class RegistrationError(BridgeKitError):
    """The registration file is invalid.

    ``problems`` holds one human-readable line per problem, each naming its
    field (and YAML line where known); ``str(error)`` joins them.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid registration:\n  " + "\n  ".join(self.problems))


class InvalidLocalpart(BridgeKitError, ValueError):
    """A localpart that bridge_kit refuses to register (spec grammar, length)."""

    def __init__(self, localpart: str, reason: str) -> None:
        self.localpart = localpart
        self.reason = reason
        super().__init__(f"invalid localpart {localpart!r}: {reason}")


class NotInNamespace(BridgeKitError, ValueError):
    """A user ID outside this appservice's user namespaces."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"{user_id} is not in this appservice's user namespaces")


class StoreError(BridgeKitError):
    """The puppet/transaction store could not be opened or used."""


class ListenError(BridgeKitError):
    """The appservice could not listen on its host and port."""


class HomeserverUnreachable(BridgeKitError):
    """The homeserver could not be reached, even after retries."""


class RegistrationAborted(BridgeKitError):
    """A puppet registration run stopped at once: retrying puppets would not help.

    ``diagnosis`` says in plain words what is wrong and how to fix it.
    """

    def __init__(self, diagnosis: str, cause: MatrixRequestError | None = None) -> None:
        self.diagnosis = diagnosis
        self.cause = cause
        super().__init__(diagnosis)


class MatrixRequestError(BridgeKitError):
    """The homeserver answered with an error.

    ``status`` is the HTTP status, ``errcode`` the Matrix errcode (or ``None``
    for a non-Matrix body), ``message`` the human ``error`` text and ``body``
    the whole decoded body.
    """

    errcode_handled: ClassVar[str | None] = None

    def __init__(
        self,
        status: int,
        errcode: str | None,
        message: str,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.errcode = errcode
        self.message = message
        self.body: Mapping[str, Any] = body or {}
        super().__init__(f"{status} {errcode or 'no errcode'}: {message}")

    @staticmethod
    def from_response(status: int, body: Mapping[str, Any] | None) -> MatrixRequestError:
        """Build the most specific error for an HTTP error response."""
        body = body or {}
        errcode = body.get("errcode")
        errcode = errcode if isinstance(errcode, str) else None
        message = body.get("error")
        message = message if isinstance(message, str) else ""
        cls = _BY_ERRCODE.get(errcode or "", MatrixRequestError)
        if status == 429 and cls is MatrixRequestError:
            cls = LimitExceeded
        return cls(status, errcode, message, body)


class UserInUse(MatrixRequestError):
    """``M_USER_IN_USE``: the user ID is already registered."""

    errcode_handled = "M_USER_IN_USE"


class Exclusive(MatrixRequestError):
    """``M_EXCLUSIVE``: the ID is outside our namespace or reserved by another appservice."""

    errcode_handled = "M_EXCLUSIVE"


class LimitExceeded(MatrixRequestError):
    """``M_LIMIT_EXCEEDED`` (429). ``retry_after`` is the delay asked for, in seconds."""

    errcode_handled = "M_LIMIT_EXCEEDED"

    def __init__(
        self,
        status: int,
        errcode: str | None,
        message: str,
        body: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, errcode, message, body)
        if retry_after is None:
            ms = self.body.get("retry_after_ms")
            if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
                retry_after = ms / 1000
        self.retry_after = retry_after


class UnknownToken(MatrixRequestError):
    """``M_UNKNOWN_TOKEN``: the homeserver does not know our as_token."""

    errcode_handled = "M_UNKNOWN_TOKEN"


class MissingToken(MatrixRequestError):
    """``M_MISSING_TOKEN``: no access token was sent."""

    errcode_handled = "M_MISSING_TOKEN"


class Forbidden(MatrixRequestError):
    """``M_FORBIDDEN``: the request is not allowed (e.g. masquerading outside the namespace)."""

    errcode_handled = "M_FORBIDDEN"


class ResourceLimitExceeded(MatrixRequestError):
    """``M_RESOURCE_LIMIT_EXCEEDED``: e.g. the homeserver's monthly-active-user limit."""

    errcode_handled = "M_RESOURCE_LIMIT_EXCEEDED"


class NotFound(MatrixRequestError):
    """``M_NOT_FOUND``."""

    errcode_handled = "M_NOT_FOUND"


class UnknownDevice(MatrixRequestError):
    """``M_UNKNOWN_DEVICE``: an asserted ``device_id`` the homeserver does not know."""

    errcode_handled = "M_UNKNOWN_DEVICE"


def _errcode_table() -> dict[str, type[MatrixRequestError]]:
    table: dict[str, type[MatrixRequestError]] = {}
    for cls in MatrixRequestError.__subclasses__():
        if cls.errcode_handled:
            table[cls.errcode_handled] = cls
    return table


_BY_ERRCODE = _errcode_table()
