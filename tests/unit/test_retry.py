"""RetryPolicy: full jitter within bounds, exponential growth, cap, budgets."""

from __future__ import annotations

import random
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr.clock import FakeClock, SystemClock
from spr.errors import ConfigError
from spr.retry import RetryPolicy


class Fixed:
    """A random source that always returns the same fraction."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_caps_grow_exponentially_up_to_max_delay() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0, multiplier=2.0)
    caps = [policy.backoff_cap(n) for n in range(1, 8)]
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert policy.backoff_cap(10**9) == 1.0  # no overflow for absurd retry numbers
    with pytest.raises(ValueError):
        policy.backoff_cap(0)


def test_full_jitter_spans_zero_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=10.0, max_attempts=100, max_elapsed=1e9)
    low = policy.start(0.0, random=Fixed(0.0))
    high = policy.start(0.0, random=Fixed(0.999999))
    assert [low.next_delay(0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert [high.next_delay(0.0) for _ in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8], rel=1e-5)


def test_jitter_is_spread_over_the_whole_range() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=1.0, max_attempts=10_001, max_elapsed=1e9)
    attempt = policy.start(0.0, random=random.Random(7))
    delays = [attempt.next_delay(0.0) for _ in range(10_000)]
    assert all(d is not None and 0.0 <= d < 1.0 for d in delays)
    values = [d for d in delays if d is not None]
    # Full jitter is uniform: the mean is near half the cap, and both ends are reached.
    assert sum(values) / len(values) == pytest.approx(0.5, abs=0.02)
    assert min(values) < 0.01 and max(values) > 0.99


def test_max_attempts_counts_the_first_attempt() -> None:
    attempt = RetryPolicy(max_attempts=3, max_elapsed=1e9).start(0.0, random=Fixed(0.5))
    assert attempt.next_delay(0.0) is not None  # attempt 1 failed, try a 2nd
    assert attempt.next_delay(0.0) is not None  # attempt 2 failed, try a 3rd
    assert attempt.next_delay(0.0) is None  # attempt 3 failed: spent
    assert attempt.attempts == 3 and attempt.exhausted
    assert attempt.next_delay(0.0) is None  # stays spent
    assert not attempt.ready(100.0)


def test_elapsed_budget_stops_retries_and_clips_the_last_wait() -> None:
    policy = RetryPolicy(base_delay=4.0, max_delay=4.0, max_attempts=1000, max_elapsed=10.0)
    attempt = policy.start(100.0, random=Fixed(0.99))
    assert attempt.deadline == 110.0
    assert attempt.next_delay(100.0) == pytest.approx(3.96)
    assert attempt.next_delay(108.0) == pytest.approx(2.0)  # clipped to the deadline
    assert attempt.ready_at == pytest.approx(110.0)
    assert attempt.next_delay(110.0) is None


def test_ready_says_when_the_next_attempt_may_start() -> None:
    attempt = RetryPolicy(base_delay=1.0, max_delay=1.0).start(5.0, random=Fixed(0.5))
    assert attempt.ready(5.0)  # the first attempt needs no wait
    assert attempt.next_delay(6.0) == 0.5
    assert not attempt.ready(6.2)
    assert attempt.ready(6.5)


def test_presets_and_validation() -> None:
    assert RetryPolicy.preset("default") == RetryPolicy()
    assert RetryPolicy.preset("fast").max_elapsed <= 5.0
    assert RetryPolicy.preset("patient").max_elapsed >= 600.0
    none = RetryPolicy.preset("none").start(0.0)
    assert none.next_delay(0.0) is None
    with pytest.raises(ConfigError, match="unknown retry preset 'eager'"):
        RetryPolicy.preset("eager")
    for bad in (
        {"base_delay": -1.0},
        {"base_delay": 2.0, "max_delay": 1.0},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"max_elapsed": -1.0},
    ):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(FrozenInstanceError):
        RetryPolicy().base_delay = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(0.1)  # type: ignore[misc]  # keyword-only


def test_call_retries_only_what_it_is_told_to_on_the_injected_clock() -> None:
    clock = FakeClock()
    failures = iter([TimeoutError("1"), TimeoutError("2")])

    def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "done"

    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, max_attempts=5, max_elapsed=100.0)
    result = policy.call(
        flaky,
        should_retry=lambda exc: isinstance(exc, TimeoutError),
        clock=clock,
        random=Fixed(0.5),
    )
    assert result == "done"
    assert clock.sleeps == [0.5, 1.0]
    assert clock.monotonic() == 1.5

    with pytest.raises(KeyError):
        policy.call(_raise(KeyError("bug")), should_retry=lambda exc: False, clock=clock)

    clock = FakeClock()
    with pytest.raises(TimeoutError):
        policy.call(_raise(TimeoutError("down")), should_retry=lambda exc: True, clock=clock)
    assert len(clock.sleeps) == 4  # five attempts, four waits


def _raise(error: Exception):  # type: ignore[no-untyped-def]
    def operation() -> None:
        raise error

    return operation


def test_clocks() -> None:
    clock = FakeClock(10.0)
    clock.sleep(2.5)
    clock.advance(0.5)
    assert clock.monotonic() == 13.0 and clock.sleeps == [2.5]
    with pytest.raises(ValueError):
        clock.advance(-1)
    system = SystemClock()
    first = system.monotonic()
    system.sleep(0)
    assert system.monotonic() >= first


policies = st.builds(
    lambda base, extra, mult, attempts, elapsed: RetryPolicy(
        base_delay=base,
        max_delay=base + extra,
        multiplier=mult,
        max_attempts=attempts,
        max_elapsed=elapsed,
    ),
    st.floats(0.0, 10.0),
    st.floats(0.0, 100.0),
    st.floats(1.0, 10.0),
    st.integers(1, 50),
    st.floats(0.0, 1000.0),
)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    seed=st.integers(0, 2**32),
    start=st.floats(-1e6, 1e6),
    steps=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=60),
)
def test_property_delays_respect_every_bound(
    policy: RetryPolicy, seed: int, start: float, steps: list[float]
) -> None:
    attempt = policy.start(start, random=random.Random(seed))
    now = start
    granted = 0
    for retry, step in enumerate(steps, start=1):
        now = max(now, attempt.ready_at) + step
        delay = attempt.next_delay(now)
        if delay is None:
            break
        granted += 1
        assert 0.0 <= delay <= policy.backoff_cap(retry)
        assert now + delay <= attempt.deadline + 1e-9
    # Never more attempts than allowed, and never one past the budget.
    assert granted <= policy.max_attempts - 1
    if attempt.exhausted:
        assert attempt.next_delay(now) is None


@settings(max_examples=200, deadline=None)
@given(policy=policies, retry=st.integers(1, 200))
def test_property_caps_are_monotonic_and_bounded(policy: RetryPolicy, retry: int) -> None:
    assert policy.backoff_cap(retry) <= policy.backoff_cap(retry + 1) <= policy.max_delay
    assert policy.backoff_cap(1) == min(policy.base_delay, policy.max_delay)
