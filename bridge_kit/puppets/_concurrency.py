"""The two small machines a bulk run is built on: an adaptive semaphore and a lean seen-set.

:class:`AimdLimiter` bounds the register requests in flight, halving the bound
when the homeserver rate-limits and growing it back slowly (AIMD, as TCP
does). :class:`SeenSet` drops repeated localparts from an input of millions
in a few bytes each.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import deque
from collections.abc import Callable, Hashable
from typing import Final

__all__ = ["MIN_PAUSE", "AimdLimiter", "SeenSet"]

#: The least time (seconds) after a cut during which congestion signals count as that cut.
MIN_PAUSE: Final = 0.05


class AimdLimiter:
    """A semaphore whose size adapts: halved on congestion, +1 per ``limit`` successes.

    Congestion signals that arrive within ``pause`` seconds of the last cut
    (the requests already in flight then) count once. ``clock`` tells the time
    in seconds; tests pass one they can move.
    """

    def __init__(self, maximum: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._maximum = maximum
        self._limit = maximum
        self._lowest = maximum
        self._clock = clock
        self._holders = 0
        self._successes = 0
        self._paused_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def maximum(self) -> int:
        """The limit it starts at and never grows beyond."""
        return self._maximum

    @property
    def limit(self) -> int:
        """How many slots may be held at once now."""
        return self._limit

    @property
    def lowest(self) -> int:
        """The lowest the limit has been."""
        return self._lowest

    @property
    def in_flight(self) -> int:
        """How many slots are held."""
        return self._holders

    @property
    def paused_until(self) -> float:
        """Until when (by ``clock``) congestion signals count as the last cut."""
        return self._paused_until

    async def acquire(self) -> None:
        """Wait for a free slot."""
        if self._holders < self._limit and not self._waiters:
            self._holders += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(success=False)  # the slot was handed over as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, *, success: bool) -> None:
        """Give a slot back; a success counts towards growing the limit."""
        self._holders -= 1
        if success and self._limit < self._maximum:
            self._successes += 1
            if self._successes >= self._limit:
                self._limit += 1
                self._successes = 0
        self._wake()

    def congestion(self, pause: float = 0.0) -> None:
        """The homeserver asked us to slow down: halve the limit (at most once per ``pause``)."""
        now = self._clock()
        if now < self._paused_until:
            return
        self._paused_until = now + max(pause, MIN_PAUSE)
        self._limit = max(1, self._limit // 2)
        self._lowest = min(self._lowest, self._limit)
        self._successes = 0

    def _wake(self) -> None:
        while self._waiters and self._holders < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._holders += 1
                waiter.set_result(None)


class SeenSet:
    """Remembers strings by their 64-bit hash in an open-addressing ``array``.

    16 bytes per entry instead of ~80 for a set of strings or boxed ints, so a
    million localparts fit in 16-32 MB. Two different localparts share a
    hash with probability ~n²/2⁶⁵ (3e-8 for a million); Python salts string
    hashes per process, so such a puppet is registered by the next run.
    ``capacity`` must be a power of two; the array doubles when half full.
    """

    __slots__ = ("_count", "_mask", "_slots")

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._slots = array("q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0

    def add(self, item: Hashable) -> bool:
        """Remember ``item``; False if it was seen before."""
        key = hash(item) or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        index = key & mask
        while True:
            found = slots[index]
            if found == 0:
                slots[index] = key
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return True
            if found == key:
                return False
            index = (index + 1) & mask

    def __contains__(self, item: object) -> bool:
        """Whether ``item`` was added (by its hash, as :meth:`add` tells)."""
        key = hash(item) or 1
        slots, mask = self._slots, self._mask
        index = key & mask
        while True:
            found = slots[index]
            if found == 0:
                return False
            if found == key:
                return True
            index = (index + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        capacity = 2 * len(old)
        slots = self._slots = array("q", bytes(8 * capacity))
        mask = self._mask = capacity - 1
        for key in old:
            if key:
                index = key & mask
                while slots[index]:
                    index = (index + 1) & mask
                slots[index] = key
