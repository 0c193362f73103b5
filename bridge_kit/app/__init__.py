"""The appservice as a whole: :class:`AppService`, and running it.

- :mod:`~bridge_kit.app.service`: :class:`AppService`, its states, start and stop;
- :mod:`~bridge_kit.app.runner`: :func:`run_app`, signals and exit codes;
- :mod:`~bridge_kit.app.encryption`: turning encryption on without importing
  vodozemac unless asked;
- :mod:`~bridge_kit.app.ratelimit`: the token bucket behind provisioning on query.
"""

from typing import TYPE_CHECKING

from bridge_kit._deprecated import renamed
from bridge_kit.app.runner import ExitCode, StopSignals, run_app
from bridge_kit.app.service import AppLifecycle, AppService

__all__ = ["AppLifecycle", "AppService", "ExitCode", "StopSignals", "run_app"]

# Deprecated (see CHANGELOG): the old name of AppLifecycle, one of three "states".
__getattr__ = renamed(__name__, {"AppState": ("AppLifecycle", AppLifecycle)})
if TYPE_CHECKING:
    AppState = AppLifecycle
