"""A token bucket: at most ``rate`` actions per ``period`` on average, in bursts up to ``burst``.

The appservice limits the puppets it registers because the homeserver asked
about them (``puppets.provision_per_minute``)::

    bucket = TokenBucket(rate=60, period=60.0)
    if bucket.try_take():
        ...  # register

The clock is injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Starts full with ``burst`` tokens (default ``rate``) and refills ``rate`` per ``period``.

    ``clock`` returns seconds (default :func:`time.monotonic`); if it steps
    back, no tokens are added until it has caught up again.
    """

    def __init__(
        self,
        rate: float,
        period: float = 60.0,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or period <= 0:
            raise ValueError(f"rate and period must be positive, not {rate} and {period}")
        self.rate = rate
        self.period = period
        self.burst = rate if burst is None else burst
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")
        self._clock = clock
        self._tokens = float(self.burst)
        self._updated = clock()

    def try_take(self) -> bool:
        """Take one token if there is one; never waits."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    @property
    def available(self) -> float:
        """Tokens there are now (fractions count towards the next one)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        if now <= self._updated:
            return  # a clock that stepped back earns nothing until it is past the last update
        elapsed, self._updated = now - self._updated, now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate / self.period)
