"""Time, injected: the one place spr's Python code reads a clock.

Retry budgets, circuit-breaker cool-downs and flush ages are all measured on a
:class:`Clock`, so tests can move time with :class:`FakeClock` instead of sleeping.
``monotonic()`` is seconds on a monotonic scale (only differences mean anything);
``time()`` is wall-clock seconds since the epoch, for comparing with Kafka's broker
timestamps (latency, the age of the oldest unconsumed message).
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A monotonic clock in seconds, and a way to wait on it."""

    def monotonic(self) -> float:
        """Seconds on a scale that never goes backwards; only differences mean anything."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (may jump; only for comparing with
        timestamps that come from elsewhere, such as Kafka's)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds`` (on this clock)."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.time` and :func:`time.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; ``sleep`` advances it without blocking.

    ``sleeps`` records every requested sleep, so a test can assert on the delays a
    retry loop chose.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - self._now
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        """``wall_start`` plus the time advanced since (it moves with the clock)."""
        return self._now + self._wall_offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``; raises ValueError for a negative step."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds})")
        self._now += seconds
