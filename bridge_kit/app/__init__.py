"""The appservice as a whole: :class:`AppService`, and running it.

- :mod:`~bridge_kit.app.service`: :class:`AppService`, its states, start and stop;
- :mod:`~bridge_kit.app.runner`: :func:`run_app`, signals and exit codes;
- :mod:`~bridge_kit.app.encryption`: turning encryption on without importing
  vodozemac unless asked;
- :mod:`~bridge_kit.app.ratelimit`: the token bucket behind provisioning on query.
"""

from bridge_kit.app.runner import ExitCode, StopSignals, run_app
from bridge_kit.app.service import AppService, AppState

__all__ = ["AppService", "AppState", "ExitCode", "StopSignals", "run_app"]
