"""CircuitBreaker: opening, half-open probe, recovery, sliding windows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr.errors import ConfigError
from spr.retry import BreakerPolicy, CircuitBreaker, CircuitState

CLOSED, HALF_OPEN, OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN


def breaker(**policy: float | int | None) -> CircuitBreaker:
    settings_ = {"minimum_calls": 4, "window_size": 10, "window_seconds": None, "cool_down": 5.0}
    settings_.update(policy)
    return CircuitBreaker(BreakerPolicy(**settings_))  # type: ignore[arg-type]


def test_state_values_are_the_gauge_values() -> None:
    assert (int(CLOSED), int(HALF_OPEN), int(OPEN)) == (0, 1, 2)
    assert BreakerPolicy().failure_threshold == 0.5


def test_opens_at_half_failures_once_the_minimum_is_reached() -> None:
    b = breaker()
    for _ in range(3):
        b.record_failure(0.0)
    assert b.state is CLOSED and b.allow(0.0)  # 3 calls < minimum_calls
    b.record_failure(0.0)
    assert b.state is OPEN and not b.allow(0.0)

    b = breaker()
    b.record_success(0.0)
    b.record_success(0.0)
    b.record_failure(0.0)
    assert b.state is CLOSED
    b.record_failure(0.0)  # 2 of 4 = 50%
    assert b.state is OPEN


def test_the_rate_is_checked_after_successes_too() -> None:
    b = breaker()
    for _ in range(3):
        b.record_failure(0.0)
    b.record_success(0.0)  # the 4th call: 3 of 4 failed
    assert b.state is OPEN


def test_below_the_threshold_it_stays_closed() -> None:
    b = breaker()
    for _ in range(10):
        b.record_success(1.0)
        b.record_success(1.0)
        b.record_failure(1.0)  # one in three
    assert b.state is CLOSED
    assert b.failure_rate == pytest.approx(0.4)  # the last 10: F SSF SSF SSF


def test_half_open_admits_one_probe_and_its_success_closes() -> None:
    changes: list[tuple[CircuitState, CircuitState]] = []
    b = CircuitBreaker(
        BreakerPolicy(minimum_calls=2, window_size=4, window_seconds=None, cool_down=5.0),
        on_change=lambda old, new: changes.append((old, new)),
    )
    b.record_failure(10.0)
    b.record_failure(10.0)
    assert b.state is OPEN and b.reopens_at() == 15.0
    assert not b.allow(14.9)
    assert b.allow(15.0)  # the probe
    assert b.state is HALF_OPEN and b.reopens_at() is None
    assert not b.allow(15.1)  # only one probe at a time
    b.record_success(15.2)
    assert b.state is CLOSED and b.allow(15.3)
    assert b.calls_in_window == 0  # recovery starts with a clean window
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert b.transitions == 3


def test_a_failed_probe_reopens_for_another_cool_down() -> None:
    b = breaker(minimum_calls=1, window_size=1)
    b.record_failure(0.0)
    assert b.allow(5.0) and b.state is HALF_OPEN
    b.record_failure(6.0)
    assert b.state is OPEN
    assert not b.allow(10.9)
    assert b.allow(11.0) and b.state is HALF_OPEN


def test_a_lost_probe_is_replaced_after_a_cool_down() -> None:
    b = breaker(minimum_calls=1, window_size=1)
    b.record_failure(0.0)
    assert b.allow(5.0)
    assert not b.allow(9.9)
    assert b.allow(10.0)  # the first probe never reported


def test_outcomes_while_open_are_ignored() -> None:
    b = breaker(minimum_calls=1, window_size=1)
    b.record_failure(0.0)
    b.record_success(1.0)  # a call that started before the breaker opened
    assert b.state is OPEN
    b.record_failure(2.0)
    assert b.reopens_at() == 5.0  # not pushed back


def test_window_slides_by_count() -> None:
    b = breaker(minimum_calls=4, window_size=4, failure_threshold=0.75)
    for _ in range(2):
        b.record_failure(0.0)
    for _ in range(4):
        b.record_success(0.0)  # the two failures slide out
    assert b.calls_in_window == 4 and b.failure_rate == 0.0
    for _ in range(2):
        b.record_failure(0.0)
    assert b.state is CLOSED  # 2 of the last 4
    b.record_failure(0.0)
    assert b.state is OPEN  # 3 of the last 4


def test_window_slides_by_time() -> None:
    b = breaker(minimum_calls=4, window_size=100, window_seconds=10.0)
    for t in range(3):
        b.record_failure(float(t))
    b.record_success(20.0)  # the failures are more than 10 s old: forgotten
    assert b.calls_in_window == 1 and b.failure_rate == 0.0
    for t in (21.0, 22.0, 23.0):
        b.record_failure(t)
    assert b.state is OPEN  # 3 of 4 recent calls


def test_policy_validation() -> None:
    for bad in (
        {"failure_threshold": 0.0},
        {"failure_threshold": 1.5},
        {"minimum_calls": 0},
        {"minimum_calls": 10, "window_size": 5},
        {"window_seconds": 0.0},
        {"cool_down": -1.0},
    ):
        with pytest.raises(ConfigError):
            BreakerPolicy(**bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    outcomes=st.lists(st.tuples(st.booleans(), st.floats(0.0, 3.0)), max_size=200),
    threshold=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    minimum=st.integers(1, 10),
    extra=st.integers(0, 20),
    window_seconds=st.one_of(st.none(), st.floats(1.0, 30.0)),
)
def test_property_matches_a_reference_model(
    outcomes: list[tuple[bool, float]],
    threshold: float,
    minimum: int,
    extra: int,
    window_seconds: float | None,
) -> None:
    policy = BreakerPolicy(
        failure_threshold=threshold,
        minimum_calls=minimum,
        window_size=minimum + extra,
        window_seconds=window_seconds,
        cool_down=4.0,
    )
    b = CircuitBreaker(policy)
    # Reference model: the full history since the last reset, filtered on every check.
    history: list[tuple[float, bool]] = []
    state = CLOSED
    opened_at = 0.0
    probing = False
    now = 0.0
    for ok, step in outcomes:
        now += step
        allowed = b.allow(now)
        if state is CLOSED:
            expect_allowed = True
        elif state is OPEN:
            expect_allowed = now >= opened_at + 4.0
            if expect_allowed:
                state, probing = HALF_OPEN, True
        else:
            expect_allowed = False  # a probe is out; steps < cool_down keep it out
        assert allowed is expect_allowed
        assert b.state is state
        if not allowed:
            continue
        if ok:
            b.record_success(now)
        else:
            b.record_failure(now)
        if state is HALF_OPEN and probing:
            probing = False
            if ok:
                state, history = CLOSED, []
            else:
                state, opened_at, history = OPEN, now, []
            continue
        history.append((now, ok))
        history = history[-policy.window_size :]
        if window_seconds is not None:
            history = [(t, o) for t, o in history if t > now - window_seconds]
        failures = sum(1 for _, o in history if not o)
        if len(history) >= minimum and failures / len(history) >= threshold:
            state, opened_at, history = OPEN, now, []
        assert b.state is state
        assert b.calls_in_window == len(history)
