"""isolate_poison: bisecting a rejected batch down to exactly the poison rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import psycopg
import psycopg.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr.sink.isolate import isolate_poison


class Table:
    """A fake table: applying a chunk is all-or-nothing, and poison rows fail it."""

    def __init__(self, poison: set[int], sqlstate: str = "23514") -> None:
        self.poison = poison
        self.sqlstate = sqlstate
        self.rows: list[int] = []

    def apply(self, chunk: Sequence[int]) -> None:
        if any(row in self.poison for row in chunk):
            raise psycopg.errors.lookup(self.sqlstate)("new row violates check constraint")
        self.rows.extend(chunk)


def test_a_clean_batch_is_applied_in_one_call() -> None:
    table = Table(set())
    result = isolate_poison(list(range(100)), table.apply)
    assert (result.applied, result.calls, result.rejected) == (100, 1, [])
    assert table.rows == list(range(100))


def test_exactly_the_poison_rows_are_rejected_and_the_rest_applied_in_order() -> None:
    table = Table({3, 4, 97})
    result = isolate_poison(list(range(100)), table.apply)
    assert [row for row, _ in result.rejected] == [3, 4, 97]
    assert all(isinstance(error, psycopg.errors.CheckViolation) for _, error in result.rejected)
    assert table.rows == [row for row in range(100) if row not in {3, 4, 97}]
    assert result.applied == 97


def test_empty_input_calls_nothing() -> None:
    result = isolate_poison([], Table(set()).apply)
    assert (result.applied, result.calls) == (0, 0)


@pytest.mark.parametrize("sqlstate", ["08006", "40001", "42P01", "57P01"])
def test_errors_that_are_not_data_abort_the_bisection(sqlstate: str) -> None:
    table = Table({5}, sqlstate=sqlstate)
    with pytest.raises(psycopg.Error) as caught:
        isolate_poison(list(range(10)), table.apply)
    assert caught.value.sqlstate == sqlstate
    assert table.rows == []


def test_a_transient_error_midway_is_raised_not_bisected() -> None:
    calls: list[Sequence[int]] = []

    def apply(chunk: Sequence[int]) -> None:
        calls.append(chunk)
        if len(calls) == 1:
            raise psycopg.errors.lookup("23505")("duplicate key")
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    with pytest.raises(psycopg.OperationalError):
        isolate_poison([1, 2, 3, 4], apply)
    assert len(calls) == 2


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 300),
    poison=st.sets(st.integers(0, 299), max_size=12),
)
def test_property_isolates_exactly_and_within_the_call_bound(size: int, poison: set[int]) -> None:
    poison = {row for row in poison if row < size}
    table = Table(poison)
    result = isolate_poison(list(range(size)), table.apply)
    assert [row for row, _ in result.rejected] == sorted(poison)
    assert table.rows == [row for row in range(size) if row not in poison]
    bound = 1 + 2 * len(poison) * max(1, math.ceil(math.log2(size)))
    assert result.calls <= bound
