"""Talking to the homeserver: the appservice's client-server API client.

- :mod:`~bridge_kit.client.homeserver`: :class:`HomeserverClient`, retries and
  error mapping;
- ``_wire`` and ``_transfer``: request bodies and streamed transfers (private).
"""

from bridge_kit.client._transfer import Raw
from bridge_kit.client.homeserver import (
    REGISTER_ENDPOINT,
    ClientObserver,
    ClientState,
    HomeserverClient,
    RawBody,
    RetryPolicy,
    WhoAmI,
    quote_segment,
)

__all__ = [
    "REGISTER_ENDPOINT",
    "ClientObserver",
    "ClientState",
    "HomeserverClient",
    "Raw",
    "RawBody",
    "RetryPolicy",
    "WhoAmI",
    "quote_segment",
]
