"""Checks of a set-up, for ``bridge-kit check`` and the daemon's start.

- :mod:`~bridge_kit.checks.homeserver`: can the homeserver be reached, does it
  know the appservice (``check --homeserver``, the start's checks);
- :mod:`~bridge_kit.checks.devices`: devices and to-device data (MSC4190, MSC3202);
- :mod:`~bridge_kit.checks.doctor`: the registration against the homeserver's
  own config and the daemon's.
"""
