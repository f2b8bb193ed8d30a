"""Bounded retries with exponential backoff and full jitter, and a circuit breaker.

Both are driven by the caller's clock readings (``now`` arguments, seconds on a
monotonic scale) instead of sleeping, so the consumer loop can keep polling Kafka (and
stay in its group) with its partitions paused while it waits for the next attempt::

    attempt = policy.start(now)
    ...                                     # the flush fails with a TRANSIENT error
    delay = attempt.next_delay(now)         # None: the budget is spent, stop
    ...                                     # keep polling until now >= attempt.ready_at

:meth:`RetryPolicy.call` is the blocking form for code that has nothing else to do.
Nothing in this module reads a clock on its own; randomness is injected too.
"""

from __future__ import annotations

import enum
import random as _random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

from spr.clock import Clock, SystemClock
from spr.errors import ConfigError

__all__ = [
    "BreakerPolicy",
    "CircuitBreaker",
    "CircuitState",
    "RandomSource",
    "RetryAttempt",
    "RetryPolicy",
]

T = TypeVar("T")


class RandomSource(Protocol):
    """Where jitter comes from: anything with ``random() -> float`` in [0, 1)."""

    def random(self) -> float: ...


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry a TRANSIENT failure.

    The n-th retry (n = 1, 2, ...) waits a uniformly random time in
    ``[0, min(max_delay, base_delay * multiplier ** (n - 1)))`` ("full jitter", so that
    many consumers failing together do not retry together). At most ``max_attempts``
    attempts are made in all (the first one included), and no attempt starts later than
    ``max_elapsed`` seconds after the first. Raises ConfigError when built with values
    that cannot work.
    """

    base_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    max_attempts: int = 20
    max_elapsed: float = 60.0

    PRESETS: ClassVar[tuple[str, ...]] = ("default", "fast", "patient", "none")

    def __post_init__(self) -> None:
        _require(self.base_delay >= 0, f"base_delay must be >= 0, got {self.base_delay}")
        _require(
            self.max_delay >= self.base_delay,
            f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})",
        )
        _require(self.multiplier >= 1, f"multiplier must be >= 1, got {self.multiplier}")
        _require(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")
        _require(self.max_elapsed >= 0, f"max_elapsed must be >= 0, got {self.max_elapsed}")

    @classmethod
    def preset(cls, name: str) -> RetryPolicy:
        """A named policy: ``default`` (about a minute), ``fast`` (a few seconds, for
        tests and interactive commands), ``patient`` (ten minutes, for a database that
        restarts slowly), ``none`` (one attempt). Raises ConfigError for other names."""
        if name == "default":
            return cls()
        if name == "fast":
            return cls(base_delay=0.05, max_delay=0.5, max_attempts=10, max_elapsed=5.0)
        if name == "patient":
            return cls(base_delay=0.5, max_delay=30.0, max_attempts=1000, max_elapsed=600.0)
        if name == "none":
            return cls(base_delay=0.0, max_delay=0.0, max_attempts=1, max_elapsed=0.0)
        raise ConfigError(f"unknown retry preset {name!r}; choose one of {', '.join(cls.PRESETS)}")

    def backoff_cap(self, retry: int) -> float:
        """The upper bound of the jittered wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, got {retry}")
        # Cap the exponent so huge retry counts cannot overflow a float.
        exponent = min(retry - 1, 1024)
        try:
            grown = self.base_delay * self.multiplier**exponent
        except OverflowError:
            grown = self.max_delay
        return min(self.max_delay, grown)

    def start(self, now: float, *, random: RandomSource | None = None) -> RetryAttempt:
        """Begin retrying an operation whose first attempt starts at ``now``.

        ``random`` supplies the jitter (default: a private :class:`random.Random`).
        """
        return RetryAttempt(self, now, random if random is not None else _random.Random())

    def call(
        self,
        operation: Callable[[], T],
        *,
        should_retry: Callable[[BaseException], bool],
        clock: Clock | None = None,
        random: RandomSource | None = None,
    ) -> T:
        """Run ``operation`` until it succeeds, blocking (``clock.sleep``) between tries.

        An exception for which ``should_retry`` is false is raised at once; when the
        budget is spent, the last exception is raised. For code that has nothing else
        to do while it waits; the consumer loop uses :meth:`start` instead.
        """
        clock = clock if clock is not None else SystemClock()
        attempt = self.start(clock.monotonic(), random=random)
        while True:
            try:
                return operation()
            except Exception as exc:
                if not should_retry(exc):
                    raise
                delay = attempt.next_delay(clock.monotonic())
                if delay is None:
                    raise
                clock.sleep(delay)


@dataclass(eq=False)
class RetryAttempt:
    """The retry state of one operation; not thread-safe, cheap to create.

    ``attempts`` counts attempts that failed so far; ``ready_at`` is when the next
    attempt may start (on the clock the ``now`` arguments come from).
    """

    policy: RetryPolicy
    started_at: float
    random: RandomSource
    attempts: int = 0
    ready_at: float = field(init=False)
    exhausted: bool = False

    def __post_init__(self) -> None:
        self.ready_at = self.started_at

    @property
    def deadline(self) -> float:
        """The latest time at which an attempt may start."""
        return self.started_at + self.policy.max_elapsed

    def next_delay(self, now: float) -> float | None:
        """Record a failed attempt at ``now``; return how long to wait before the next
        one, or None when the budget (attempts or elapsed time) is spent.

        The delay is never negative and never ends after :attr:`deadline`. Once None has
        been returned, every later call returns None.
        """
        self.attempts += 1
        if self.exhausted or self.attempts >= self.policy.max_attempts or now >= self.deadline:
            self.exhausted = True
            return None
        delay = self.policy.backoff_cap(self.attempts) * self.random.random()
        delay = max(0.0, min(delay, self.deadline - now))
        self.ready_at = now + delay
        return delay

    def ready(self, now: float) -> bool:
        """Whether the next attempt may start at ``now``."""
        return not self.exhausted and now >= self.ready_at


class CircuitState(enum.IntEnum):
    """The breaker's state; its int value is the ``spr_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """When a :class:`CircuitBreaker` opens and when it tries again.

    It opens when, among the outcomes in its window (the last ``window_size`` calls that
    are at most ``window_seconds`` old; ``None`` means no age limit), there are at least
    ``minimum_calls`` and failures make up at least ``failure_threshold`` of them. After
    ``cool_down`` seconds open it lets one probe through (half-open). A probe whose
    outcome is not reported within ``cool_down`` is presumed lost and another is allowed.
    """

    failure_threshold: float = 0.5
    minimum_calls: int = 5
    window_size: int = 20
    window_seconds: float | None = 60.0
    cool_down: float = 5.0

    def __post_init__(self) -> None:
        _require(
            0 < self.failure_threshold <= 1,
            f"failure_threshold must be in (0, 1], got {self.failure_threshold}",
        )
        _require(self.minimum_calls >= 1, f"minimum_calls must be >= 1, got {self.minimum_calls}")
        _require(
            self.window_size >= self.minimum_calls,
            f"window_size ({self.window_size}) must be >= minimum_calls ({self.minimum_calls})",
        )
        _require(
            self.window_seconds is None or self.window_seconds > 0,
            f"window_seconds must be > 0 or None, got {self.window_seconds}",
        )
        _require(self.cool_down >= 0, f"cool_down must be >= 0, got {self.cool_down}")


class CircuitBreaker:
    """A failure-rate circuit breaker on caller-supplied time; not thread-safe.

    CLOSED: every call is allowed and its outcome recorded; reaching the failure rate
    opens it. OPEN: nothing is allowed until ``cool_down`` has passed, then the next
    :meth:`allow` turns it HALF_OPEN and admits exactly one probe. HALF_OPEN: the probe's
    success closes it (with an empty window), its failure re-opens it for another
    cool-down. Outcomes reported while OPEN (calls that started before it opened) are
    ignored. ``on_change(old, new)`` is called on every transition. Nothing blocks.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        self.policy = policy if policy is not None else BreakerPolicy()
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        # Invariant: _failures == number of False outcomes in _window.
        self._window: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self.transitions = 0

    @property
    def state(self) -> CircuitState:
        """The state as of the last call; OPEN turns HALF_OPEN only in :meth:`allow`."""
        return self._state

    @property
    def failure_rate(self) -> float:
        """Failures over outcomes in the window as last trimmed (0.0 when empty)."""
        return self._failures / len(self._window) if self._window else 0.0

    @property
    def calls_in_window(self) -> int:
        return len(self._window)

    def reopens_at(self) -> float | None:
        """When an OPEN breaker will admit a probe; None unless OPEN."""
        if self._state is not CircuitState.OPEN:
            return None
        return self._opened_at + self.policy.cool_down

    def allow(self, now: float) -> bool:
        """Whether a call may go ahead at ``now``. In HALF_OPEN, True means "you are the
        probe": report its outcome with :meth:`record_success` or :meth:`record_failure`."""
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.OPEN:
            if now < self._opened_at + self.policy.cool_down:
                return False
            self._set(CircuitState.HALF_OPEN)
            self._probe_started = now
            return True
        if self._probe_started is None or now >= self._probe_started + self.policy.cool_down:
            self._probe_started = now
            return True
        return False

    def record_success(self, now: float) -> None:
        """Report a call that succeeded at ``now``."""
        if self._state is CircuitState.HALF_OPEN:
            self._reset_window()
            self._probe_started = None
            self._set(CircuitState.CLOSED)
        elif self._state is CircuitState.CLOSED:
            self._add(now, ok=True)
            self._check(now)

    def record_failure(self, now: float) -> None:
        """Report a call that failed at ``now`` (a TRANSIENT failure: errors that are the
        data's fault say nothing about the health of the server)."""
        if self._state is CircuitState.HALF_OPEN:
            self._open(now)
        elif self._state is CircuitState.CLOSED:
            self._add(now, ok=False)
            self._check(now)

    def _check(self, now: float) -> None:
        # Checked after every outcome, successes included: a success can slide an old
        # success out of the window and leave the rate at the threshold.
        if (
            len(self._window) >= self.policy.minimum_calls
            and self._failures / len(self._window) >= self.policy.failure_threshold
        ):
            self._open(now)

    def _add(self, now: float, *, ok: bool) -> None:
        self._window.append((now, ok))
        if not ok:
            self._failures += 1
        while len(self._window) > self.policy.window_size:
            self._pop()
        if self.policy.window_seconds is not None:
            horizon = now - self.policy.window_seconds
            while self._window and self._window[0][0] <= horizon:
                self._pop()

    def _pop(self) -> None:
        _, ok = self._window.popleft()
        if not ok:
            self._failures -= 1

    def _reset_window(self) -> None:
        self._window.clear()
        self._failures = 0

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe_started = None
        self._reset_window()
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        old = self._state
        if old is state:
            return
        self._state = state
        self.transitions += 1
        if self._on_change is not None:
            self._on_change(old, state)
