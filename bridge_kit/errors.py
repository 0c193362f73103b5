"""The one exception hierarchy of bridge_kit, rooted in :class:`BridgeKitError`.

Every exception bridge_kit raises on purpose lives here, grouped so that a caller
can catch a whole kind (``except HomeserverError``: anything from the homeserver)::

    BridgeKitError
    ├── SetupError                   the bridge is set up wrong (fix a file or a flag)
    │   ├── ConfigError              the daemon configuration is invalid
    │   │   ├── UsageError           the command line is wrong
    │   │   └── EncryptionUnavailable (CryptoError)  encryption on without the e2ee extra
    │   ├── RegistrationError        the registration file is invalid
    │   └── DevicesUnavailable       devices (MSC4190) are off in the registration or homeserver
    ├── InvalidInput                 a value bridge_kit refuses, before anything is sent
    │   ├── InvalidLocalpart (ValueError)  a localpart bridge_kit will not create
    │   ├── NotInNamespace (ValueError)  a user ID outside our user namespaces
    │   ├── InvalidMxc (ValueError)  a media URI that is not ``mxc://server/media_id``
    │   ├── WrongType (TypeError)    a JSON value of the wrong type in a wire model
    │   ├── YamlError                text that is not one valid YAML document
    │   ├── RemoteRefused            a bridge's remote network refused or does not know it
    │   │   ├── LoginRefused         a login's credentials (wrong or expired)
    │   │   └── UnknownChat          the remote chat a portal was asked for
    │   ├── CommandError             a bridge command that cannot run as typed (the reply says why)
    │   └── MediaError               media that cannot be bridged
    │       ├── MediaTooLarge        over the homeserver's size limit (or the bridge's), refused
    │       └── MediaUnavailable     a remote file that could not be fetched
    ├── HomeserverError              anything from the homeserver
    │   ├── HomeserverUnreachable    no HTTP reply from the homeserver, even after retries
    │   ├── UnexpectedReply          a 2xx reply of the wrong shape
    │   ├── DoublePuppetError        the homeserver would not let us log in as a real user
    │   ├── RegistrationAborted      a bulk registration run stopped at once
    │   └── MatrixRequestError       the homeserver answered with an error (by errcode:)
    │       ├── UserInUse            M_USER_IN_USE
    │       ├── Exclusive            M_EXCLUSIVE
    │       ├── LimitExceeded        M_LIMIT_EXCEEDED (and any 429)
    │       ├── UnknownToken         M_UNKNOWN_TOKEN
    │       ├── MissingToken         M_MISSING_TOKEN
    │       ├── Forbidden            M_FORBIDDEN
    │       ├── ResourceLimitExceeded  M_RESOURCE_LIMIT_EXCEEDED
    │       ├── NotFound             M_NOT_FOUND
    │       └── UnknownDevice        M_UNKNOWN_DEVICE
    ├── ServiceError                 the appservice could not start, serve or stop as asked
    │   ├── LifecycleError           start() or stop() called in the wrong state
    │   ├── ClientClosed             a request on a closed HomeserverClient
    │   ├── StartupCheckFailed       whoami or the ping failed at start-up, with a diagnosis
    │   ├── ListenError              the HTTP server could not listen
    │   └── RemoteError              the remote network of a bridge failed (worth a retry)
    ├── StoreError                   the store could not be opened or used
    └── CryptoError                  end-to-end encryption failed (bridge_kit.crypto)
        ├── EncryptionUnavailable (ConfigError)  (see SetupError)
        ├── WrongPickleKey           stored crypto state does not open with this pickle key
        └── UndecryptableEvent       an encrypted event bridge_kit cannot (or will not) decrypt
            └── NoRoomKey            its Megolm room key has not arrived (yet)

Matrix errors are mapped by errcode with the :func:`errcode` decorator, so a
bridge can ``except UserInUse`` instead of comparing strings.

The inbox's control-flow signals (``NotReady``, ``Park``) and the appservice API's
(``ErrorReply``, ``TransactionFailed``) are not errors a caller handles: they live
in :mod:`bridge_kit.inbox.signals`, outside this tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

__all__ = [
    "BridgeKitError",
    "ClientClosed",
    "CommandError",
    "ConfigError",
    "CryptoError",
    "DevicesUnavailable",
    "DoublePuppetError",
    "EncryptionUnavailable",
    "Exclusive",
    "Forbidden",
    "HomeserverError",
    "HomeserverUnreachable",
    "InvalidInput",
    "InvalidLocalpart",
    "InvalidMxc",
    "LifecycleError",
    "LimitExceeded",
    "ListenError",
    "LoginRefused",
    "MatrixRequestError",
    "MediaError",
    "MediaTooLarge",
    "MediaUnavailable",
    "MissingToken",
    "NoRoomKey",
    "NotFound",
    "NotInNamespace",
    "RegistrationAborted",
    "RegistrationError",
    "RemoteError",
    "RemoteRefused",
    "ResourceLimitExceeded",
    "ServiceError",
    "SetupError",
    "StartupCheckFailed",
    "StoreError",
    "UndecryptableEvent",
    "UnexpectedReply",
    "UnknownChat",
    "UnknownDevice",
    "UnknownToken",
    "UsageError",
    "UserInUse",
    "WrongPickleKey",
    "WrongType",
    "YamlError",
    "errcode",
]


class BridgeKitError(Exception):
    """Base class of every error bridge_kit raises on purpose."""


class SetupError(BridgeKitError):
    """The bridge is set up wrong: its configuration, registration or command line.

    The message says what to change; retrying without that change fails again.
    """


class InvalidInput(BridgeKitError):
    """A value bridge_kit refuses (a localpart, a URI, a JSON value, a YAML text...),
    found before anything is sent."""


class HomeserverError(BridgeKitError):
    """Anything from the homeserver: an error reply, no reply, or a reply of the wrong
    shape; also what bridge_kit concludes from such replies."""


class ServiceError(BridgeKitError):
    """The appservice could not start, serve or stop as asked."""


class ConfigError(SetupError):
    """The daemon configuration is invalid; the message names every problem."""


class UsageError(ConfigError):
    """The command line is wrong; the message says how."""


class RegistrationError(SetupError):
    """The registration file is invalid.

    ``problems`` holds one human-readable line per problem, each naming its
    field (and YAML line where known); ``str(error)`` joins them.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}invalid registration:\n  " + "\n  ".join(self.problems))


class InvalidLocalpart(InvalidInput, ValueError):
    """A localpart that bridge_kit refuses to register (spec grammar, length)."""

    def __init__(self, localpart: str, reason: str) -> None:
        self.localpart = localpart
        self.reason = reason
        super().__init__(f"invalid localpart {localpart!r}: {reason}")


class NotInNamespace(InvalidInput, ValueError):
    """A user ID outside this appservice's user namespaces."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"{user_id} is not in this appservice's user namespaces")


class StoreError(BridgeKitError):
    """The store could not be opened or used."""


class ListenError(ServiceError):
    """The appservice could not listen on its host and port."""


class RemoteError(ServiceError):
    """A bridge's remote network failed or could not be reached; trying again may work
    (the inbox retries the event, the layer reconnects the login with backoff)."""


class RemoteRefused(InvalidInput):
    """A bridge's remote network refused something, or does not know it: sending it
    again unchanged fails again."""


class LoginRefused(RemoteRefused):
    """The remote network refused a bridge login: wrong or expired credentials. The
    layer stops reconnecting it (``BAD_CREDENTIALS``) until the user logs in again."""


class UnknownChat(RemoteRefused):
    """A bridge's connector does not know the remote chat a portal was asked for."""


class LifecycleError(ServiceError):
    """An :class:`~bridge_kit.AppService` was started or used in the wrong state."""


class ClientClosed(ServiceError):
    """A request on a :class:`~bridge_kit.HomeserverClient` that was closed."""


class HomeserverUnreachable(HomeserverError):
    """The homeserver could not be reached, even after retries."""


class StartupCheckFailed(ServiceError):
    """A start-up check failed; the message says what is wrong and how to fix it."""


class RegistrationAborted(HomeserverError):
    """A puppet registration run stopped at once: retrying puppets would not help.

    ``diagnosis`` says in plain words what is wrong and how to fix it.
    """

    def __init__(self, diagnosis: str, cause: MatrixRequestError | None = None) -> None:
        self.diagnosis = diagnosis
        self.cause = cause
        super().__init__(diagnosis)


class UnexpectedReply(HomeserverError):
    """The homeserver answered 2xx, but not with what the endpoint promises.

    ``body`` is the decoded reply (``None`` when it was not JSON).
    """

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        self.status = status
        self.message = message
        self.body = body
        super().__init__(f"{status}: {message}")


class WrongType(InvalidInput, TypeError):
    """A JSON value of the wrong type; the message names the expected and the found type."""

    def __init__(self, expected: str, found: Any) -> None:
        super().__init__(f"expected {expected}, got {json_type(found)}")


def json_type(value: Any) -> str:
    """The JSON type of decoded ``value``, with its article, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


class YamlError(InvalidInput):
    """Text that is not one valid YAML document: the ``reason``, and where (1-based) if known."""

    def __init__(self, reason: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line is None:
            return self.reason
        column = "" if self.column is None else f", column {self.column}"
        return f"line {self.line}{column}: {self.reason}"


class CommandError(InvalidInput):
    """A bridge command that cannot run as typed; the message is the reply to the user."""


class MediaError(InvalidInput):
    """Media that cannot be bridged: too large, or not to be had from the remote side."""


class MediaTooLarge(MediaError):
    """Media larger than a limit: the homeserver's ``m.upload.size`` unless the
    message names another; nothing was sent (or the transfer stopped there).

    ``size`` is the size in bytes, or how much had been read when the transfer stopped.
    """

    def __init__(self, size: int, limit: int, message: str | None = None) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            message
            or f"the upload is {size} bytes, over the homeserver's limit of {limit} bytes "
            "(m.upload.size in /_matrix/client/v1/media/config); not sent"
        )


class MediaUnavailable(MediaError):
    """A remote file that could not be fetched (an error status, no answer, a broken
    transfer); the message names the URL and what went wrong."""


class DoublePuppetError(HomeserverError):
    """An appservice login as a real user (double puppeting) was refused; the message
    says why and what the operator can change."""


class CryptoError(BridgeKitError):
    """End-to-end encryption failed; the subclasses say how."""


class EncryptionUnavailable(CryptoError, ConfigError):
    """``encryption.enabled`` is on, but the ``e2ee`` extra (vodozemac) is not installed."""


class WrongPickleKey(CryptoError):
    """Stored crypto state does not decrypt with the configured pickle key.

    The key changed (``encryption.pickle_key``, or the as_token it defaults to
    being derived from) since the state was written; the old key opens it again.
    """


class UndecryptableEvent(CryptoError):
    """An encrypted event that cannot or must not be decrypted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NoRoomKey(UndecryptableEvent):
    """The Megolm session of a room event is unknown: its room key has not arrived."""

    def __init__(self, room_id: str, session_id: str) -> None:
        self.room_id = room_id
        self.session_id = session_id
        super().__init__("no room key")


class DevicesUnavailable(SetupError):
    """The appservice may not create or delete its users' devices (MSC4190).

    Either the registration lacks ``io.element.msc4190: true`` (bridge_kit then
    refuses before asking), or the homeserver refused ``PUT /devices/{deviceId}``
    (it does not implement MSC4190, or did not load the flag); the homeserver's
    error is then the ``__cause__``. The message says what to set.
    """

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(
            f"{problem}. Devices for appservice users need MSC4190: set "
            "'io.element.msc4190: true' in the registration (bridge-kit generate-registration "
            "--device-management, or --encryption), and restart the homeserver so that it "
            "loads it (Synapse 1.163 does). Encrypted bridges also need, in homeserver.yaml, "
            "experimental_features: {msc2409_to_device_messages_enabled: true, "
            "msc3202_transaction_extensions: true}"
        )


class InvalidMxc(InvalidInput, ValueError):
    """A media URI that is not ``mxc://<server name>/<media id>``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        super().__init__(f"not an mxc:// media URI (mxc://server/media_id): {uri!r}")


# -- Matrix errors from the homeserver ------------------------------------------------

_BY_ERRCODE: dict[str, type[MatrixRequestError]] = {}

E = TypeVar("E", bound="type[MatrixRequestError]")


def errcode(code: str) -> Callable[[E], E]:
    """Class decorator: :meth:`MatrixRequestError.from_response` maps ``code`` to this class."""

    def register(cls: E) -> E:
        if code in _BY_ERRCODE:
            raise ValueError(f"errcode {code} is already mapped to {_BY_ERRCODE[code].__name__}")
        cls.errcode_handled = code
        _BY_ERRCODE[code] = cls
        return cls

    return register


class MatrixRequestError(HomeserverError):
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
        code = body.get("errcode")
        code = code if isinstance(code, str) else None
        message = body.get("error")
        message = message if isinstance(message, str) else ""
        cls = _BY_ERRCODE.get(code or "", MatrixRequestError)
        if status == 429 and cls is MatrixRequestError:
            cls = LimitExceeded
        return cls(status, code, message, body)


@errcode("M_USER_IN_USE")
class UserInUse(MatrixRequestError):
    """``M_USER_IN_USE``: the user ID is already registered."""


@errcode("M_EXCLUSIVE")
class Exclusive(MatrixRequestError):
    """``M_EXCLUSIVE``: the ID is outside our namespace or reserved by another appservice."""


@errcode("M_LIMIT_EXCEEDED")
class LimitExceeded(MatrixRequestError):
    """``M_LIMIT_EXCEEDED`` (429). ``retry_after`` is the delay asked for, in seconds."""

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


@errcode("M_UNKNOWN_TOKEN")
class UnknownToken(MatrixRequestError):
    """``M_UNKNOWN_TOKEN``: the homeserver does not know our as_token."""


@errcode("M_MISSING_TOKEN")
class MissingToken(MatrixRequestError):
    """``M_MISSING_TOKEN``: no access token was sent."""


@errcode("M_FORBIDDEN")
class Forbidden(MatrixRequestError):
    """``M_FORBIDDEN``: the request is not allowed (e.g. masquerading outside the namespace)."""


@errcode("M_RESOURCE_LIMIT_EXCEEDED")
class ResourceLimitExceeded(MatrixRequestError):
    """``M_RESOURCE_LIMIT_EXCEEDED``: e.g. the homeserver's monthly-active-user limit."""


@errcode("M_NOT_FOUND")
class NotFound(MatrixRequestError):
    """``M_NOT_FOUND``."""


@errcode("M_UNKNOWN_DEVICE")
class UnknownDevice(MatrixRequestError):
    """``M_UNKNOWN_DEVICE``: an asserted ``device_id`` the homeserver does not know."""
