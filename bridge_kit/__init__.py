"""bridge_kit: a fast, persistent framework for Matrix application services.

The public API is what this package exports (``__all__``) plus these public
packages and modules, each with its own ``__all__``:

- :mod:`bridge_kit.app`: :class:`AppService`, :func:`run_app`, signals and exit codes;
- :mod:`bridge_kit.errors`: the exception tree;
- :mod:`bridge_kit.types`: the wire models and the converter;
- :mod:`bridge_kit.config`: the daemon configuration sections;
- :mod:`bridge_kit.registration`: registration files (load, check, generate);
- :mod:`bridge_kit.client`: the homeserver client;
- :mod:`bridge_kit.server`: the appservice HTTP API as an aiohttp application;
- :mod:`bridge_kit.intent`: acting as a puppet or the bot, and the room-state store;
- :mod:`bridge_kit.store`: the stores;
- :mod:`bridge_kit.puppets`: the puppet engine;
- :mod:`bridge_kit.crypto`: end-to-end encryption (needs the ``e2ee`` extra).

The other packages are bridge_kit's own working parts: :mod:`bridge_kit.inbox`
(the durable inbox; its modules are documented, and may change in any release),
``checks``, ``cli`` and ``testing`` (a throw-away Synapse for tests), and every
module whose name starts with ``_``.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from bridge_kit._deprecated import renamed as _renamed
from bridge_kit._preconf import configure_converter as _configure_converter
from bridge_kit._preconf import make_converter
from bridge_kit._version import __version__ as __version__
from bridge_kit.app import AppLifecycle, AppService, ExitCode, StopSignals, run_app
from bridge_kit.client.homeserver import (
    ClientLifecycle,
    ClientObserver,
    HomeserverClient,
    RetryPolicy,
    WhoAmI,
)
from bridge_kit.config import (
    AppServiceConfig,
    Config,
    EncryptionConfig,
    HomeserverConfig,
    LoggingConfig,
    PuppetsConfig,
)
from bridge_kit.errors import (
    AppserviceLoginUnsupported,
    Banned,
    BridgeKitError,
    ClientClosed,
    ConfigError,
    DevicesUnavailable,
    Exclusive,
    Forbidden,
    HomeserverError,
    HomeserverUnreachable,
    InvalidInput,
    InvalidLocalpart,
    LifecycleError,
    LimitExceeded,
    ListenError,
    MatrixRequestError,
    MissingToken,
    NotFound,
    NotInNamespace,
    PowerLevelConflict,
    PowerLevelRefused,
    RegistrationAborted,
    RegistrationError,
    ResourceLimitExceeded,
    ServiceError,
    SetupError,
    StartupCheckFailed,
    StoreError,
    UnexpectedReply,
    UnknownDevice,
    UnknownToken,
    UsageError,
    UserInUse,
    WrongType,
    YamlError,
)
from bridge_kit.ids import localpart_problem, split_user_id, user_id, validate_localpart
from bridge_kit.inbox import signals as _signals
from bridge_kit.intent import Intent
from bridge_kit.logs import configure_logging
from bridge_kit.metrics import Metrics
from bridge_kit.puppets import BulkProgress, BulkResult, PuppetRegistrar
from bridge_kit.registration import (
    CheckResult,
    Finding,
    Namespace,
    Namespaces,
    Registration,
    check_file,
    generate_registration,
)
from bridge_kit.server.appservice_api import ThirdPartyHandlers
from bridge_kit.store import Store, open_store, parse_store_url
from bridge_kit.types import (
    Event,
    MessageType,
    RegisterRequest,
    RegisterResponse,
    TextMessage,
    Transaction,
)
from bridge_kit.types.converter import converter as _shared_converter

_configure_converter(_shared_converter)

# Deprecated (see CHANGELOG): the old name of AppLifecycle, one of three "states".
# ErrorReply and TransactionFailed: signals between the inbox and the HTTP server,
# out of the public error tree (bridge_kit.inbox.signals).
__getattr__ = _renamed(
    __name__,
    {
        "AppState": ("AppLifecycle", AppLifecycle),
        "ClientState": ("ClientLifecycle", ClientLifecycle),
        "ErrorReply": ("inbox.signals.ErrorReply", _signals.ErrorReply),
        "TransactionFailed": ("inbox.signals.TransactionFailed", _signals.TransactionFailed),
    },
)
if _TYPE_CHECKING:
    AppState = AppLifecycle
    ClientState = ClientLifecycle

__all__ = [
    "AppLifecycle",
    "AppService",
    "AppServiceConfig",
    "AppserviceLoginUnsupported",
    "Banned",
    "BridgeKitError",
    "BulkProgress",
    "BulkResult",
    "CheckResult",
    "ClientClosed",
    "ClientLifecycle",
    "ClientObserver",
    "Config",
    "ConfigError",
    "DevicesUnavailable",
    "EncryptionConfig",
    "Event",
    "Exclusive",
    "ExitCode",
    "Finding",
    "Forbidden",
    "HomeserverClient",
    "HomeserverConfig",
    "HomeserverError",
    "HomeserverUnreachable",
    "Intent",
    "InvalidInput",
    "InvalidLocalpart",
    "LifecycleError",
    "LimitExceeded",
    "ListenError",
    "LoggingConfig",
    "MatrixRequestError",
    "MessageType",
    "Metrics",
    "MissingToken",
    "Namespace",
    "Namespaces",
    "NotFound",
    "NotInNamespace",
    "PowerLevelConflict",
    "PowerLevelRefused",
    "PuppetRegistrar",
    "PuppetsConfig",
    "RegisterRequest",
    "RegisterResponse",
    "Registration",
    "RegistrationAborted",
    "RegistrationError",
    "ResourceLimitExceeded",
    "RetryPolicy",
    "ServiceError",
    "SetupError",
    "StartupCheckFailed",
    "StopSignals",
    "Store",
    "StoreError",
    "TextMessage",
    "ThirdPartyHandlers",
    "Transaction",
    "UnexpectedReply",
    "UnknownDevice",
    "UnknownToken",
    "UsageError",
    "UserInUse",
    "WhoAmI",
    "WrongType",
    "YamlError",
    "check_file",
    "configure_logging",
    "generate_registration",
    "localpart_problem",
    "make_converter",
    "open_store",
    "parse_store_url",
    "run_app",
    "split_user_id",
    "user_id",
    "validate_localpart",
]
