"""Talking to the homeserver: the appservice's client-server API client.

- :mod:`~bridge_kit.client.homeserver`: :class:`HomeserverClient`, retries and
  error mapping;
- ``_wire`` and ``_transfer``: request bodies and streamed transfers (private).
"""

from typing import TYPE_CHECKING

from bridge_kit._deprecated import renamed
from bridge_kit.client._transfer import Raw
from bridge_kit.client.homeserver import (
    REGISTER_ENDPOINT,
    ClientLifecycle,
    ClientObserver,
    HomeserverClient,
    RawBody,
    RetryPolicy,
    WhoAmI,
    quote_segment,
)

__all__ = [
    "REGISTER_ENDPOINT",
    "ClientLifecycle",
    "ClientObserver",
    "HomeserverClient",
    "Raw",
    "RawBody",
    "RetryPolicy",
    "WhoAmI",
    "quote_segment",
]

# Deprecated (see CHANGELOG): the old name of ClientLifecycle, like AppState's.
__getattr__ = renamed(__name__, {"ClientState": ("ClientLifecycle", ClientLifecycle)})
if TYPE_CHECKING:
    ClientState = ClientLifecycle
