"""What bridge_kit serves over HTTP.

- :mod:`~bridge_kit.server.appservice_api`: the appservice API the homeserver
  calls (transactions, user and alias queries, third-party lookups, ping), with
  health and metrics, as an aiohttp application.
"""

from bridge_kit.server.appservice_api import (
    PROCESSOR_KEY,
    ThirdPartyHandlers,
    abort_requests,
    create_app,
    serve_app,
)

__all__ = ["PROCESSOR_KEY", "ThirdPartyHandlers", "abort_requests", "create_app", "serve_app"]
