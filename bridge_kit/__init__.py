"""bridge_kit: a fast, persistent framework for Matrix application services.

The public API is re-exported here; everything else is private.
"""

from bridge_kit.appservice import AppService
from bridge_kit.client import ClientObserver, HomeserverClient, RetryPolicy, WhoAmI
from bridge_kit.config import Config
from bridge_kit.errors import (
    BridgeKitError,
    ConfigError,
    Exclusive,
    Forbidden,
    HomeserverUnreachable,
    InvalidLocalpart,
    LimitExceeded,
    ListenError,
    MatrixRequestError,
    MissingToken,
    NotFound,
    NotInNamespace,
    RegistrationAborted,
    RegistrationError,
    ResourceLimitExceeded,
    StoreError,
    UnknownDevice,
    UnknownToken,
    UserInUse,
)
from bridge_kit.ids import localpart_problem, split_user_id, user_id, validate_localpart
from bridge_kit.intent import Intent
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
from bridge_kit.server import ThirdPartyHandlers
from bridge_kit.store import Store, open_store
from bridge_kit.types import Event, RegisterRequest, RegisterResponse, Transaction

__version__ = "0.1.0"

__all__ = [
    "AppService",
    "BridgeKitError",
    "BulkProgress",
    "BulkResult",
    "CheckResult",
    "ClientObserver",
    "Config",
    "ConfigError",
    "Event",
    "Exclusive",
    "Finding",
    "Forbidden",
    "HomeserverClient",
    "HomeserverUnreachable",
    "Intent",
    "InvalidLocalpart",
    "LimitExceeded",
    "ListenError",
    "MatrixRequestError",
    "Metrics",
    "MissingToken",
    "Namespace",
    "Namespaces",
    "NotFound",
    "NotInNamespace",
    "PuppetRegistrar",
    "RegisterRequest",
    "RegisterResponse",
    "Registration",
    "RegistrationAborted",
    "RegistrationError",
    "ResourceLimitExceeded",
    "RetryPolicy",
    "Store",
    "StoreError",
    "ThirdPartyHandlers",
    "Transaction",
    "UnknownDevice",
    "UnknownToken",
    "UserInUse",
    "WhoAmI",
    "check_file",
    "generate_registration",
    "localpart_problem",
    "open_store",
    "split_user_id",
    "user_id",
    "validate_localpart",
]
