"""Flush lanes (spr.engine.lanes) with fake sinks: a batch split by partition over the
lanes, one outcome per attempt, a failed lane retried alone, the serious error first."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import psycopg
import pytest
from test_engine_logic import FakeSink

from spr._core_py import Batch
from spr.batch import STATE_COLUMNS
from spr.clock import FakeClock
from spr.config import EngineConfig
from spr.decode import decode_event
from spr.engine.failures import FirstFailure
from spr.engine.flushing import Flushing
from spr.engine.intake import PendingBatch
from spr.engine.lanes import BatchLane, combine
from spr.errors import SprError
from spr.sink.postgres import FlushResult


def _batch(partitions: int = 4, per_partition: int = 3) -> Any:
    batch = Batch(STATE_COLUMNS)
    for p in range(partitions):
        for i in range(per_partition):
            offset = 10 * p + i
            value = f'{{"entity_type":"o","entity_id":"p{p}e{i}","sequence":1,"state":"s"}}'
            event = decode_event(value.encode(), offset=offset, timestamp_ms=0)
            batch.add(event, "t", p, offset)
    return batch


class Rig(NamedTuple):
    flushing: Flushing
    sinks: list[FakeSink]
    committed: list[Any]
    failure: FirstFailure
    clock: FakeClock


@contextmanager
def _two_lanes() -> Iterator[Rig]:
    """A started Flushing over two fake sinks (every batch split); closed afterwards."""
    clock, sinks = FakeClock(), [FakeSink(), FakeSink()]
    committed: list[Any] = []
    failure = FirstFailure()
    flushing = Flushing(
        EngineConfig(group_id="g", topics=("t",), flush_connections=len(sinks), flush_split_rows=1),
        clock=clock,
        failure=failure,
        on_committed=lambda job, result, seconds: committed.append(result),
    )
    flushing.start(sinks, None)  # type: ignore[arg-type]
    try:
        yield Rig(flushing, sinks, committed, failure, clock)
    finally:
        flushing.close()


def _pending(batch: Any = None) -> PendingBatch:
    batch = _batch() if batch is None else batch
    events = batch.events_added
    return PendingBatch(batch, events, events, 0, array("q"), array("q"))


def _settle(rig: Rig) -> None:
    flushing, clock = rig.flushing, rig.clock
    for _ in range(400):
        if not flushing.busy:
            return
        clock.advance(1.0)  # past any retry's backoff
        flushing.poll()
        flushing.await_outcome(0.05)
    raise AssertionError("the flush did not settle")


def test_a_lane_holds_exactly_its_partitions_rows_and_offsets() -> None:
    batch = _batch()
    lanes = [BatchLane(batch, lane, 2) for lane in range(2)]
    assert [lane.next_offsets() for lane in lanes] == [
        {("t", 0): 3, ("t", 2): 23},
        {("t", 1): 13, ("t", 3): 33},
    ]
    assert [lane.row_count for lane in lanes] == [6, 6]
    assert {row[1] for row in lanes[1].rows()} == {f"p{p}e{i}" for p in (1, 3) for i in range(3)}
    assert b"".join(lanes[0].copy_chunks(64)) == lanes[0].copy_data()


def test_each_lane_flushes_its_share_and_the_job_commits_once_with_all_offsets() -> None:
    with _two_lanes() as rig:
        rig.flushing.submit(_pending())
        _settle(rig)
        assert rig.sinks[0].flushes == [{("t", 0): 3, ("t", 2): 23}]
        assert rig.sinks[1].flushes == [{("t", 1): 13, ("t", 3): 33}]
        assert len(rig.committed) == 1
        result = rig.committed[0]
        assert (result.rows, result.applied, result.stale) == (12, 12, 0)
        assert result.offsets == {("t", 0): 3, ("t", 1): 13, ("t", 2): 23, ("t", 3): 33}


def test_a_lane_with_nothing_to_do_opens_no_transaction() -> None:
    with _two_lanes() as rig:
        rig.flushing.submit(_pending(_batch(partitions=1)))  # partition 0 only: lane 1 idle
        _settle(rig)
        assert rig.sinks[0].flushes == [{("t", 0): 3}] and rig.sinks[1].flushes == []
        assert rig.committed[0].offsets == {("t", 0): 3}


def test_a_failed_lane_is_retried_alone() -> None:
    with _two_lanes() as rig:
        flushing, sinks, committed = rig.flushing, rig.sinks, rig.committed
        sinks[1].fail = psycopg.OperationalError("connection lost")
        flushing.submit(_pending())
        flushing.await_outcome(10.0)  # lane 0 committed, lane 1 failed: a retry
        assert committed == [] and flushing.busy and flushing.flush_retries == 1
        assert len(sinks[0].flushes) == 1 and sinks[1].flushes == []
        sinks[1].fail = None
        _settle(rig)
        assert len(sinks[0].flushes) == 1  # its share was never written again
        assert sinks[1].flushes == [{("t", 1): 13, ("t", 3): 33}]
        assert len(committed) == 1 and committed[0].applied == 12
        assert len(committed[0].offsets) == 4 and not rig.failure.failed


def test_a_fatal_error_in_one_lane_is_not_hidden_by_a_transient_one_in_another() -> None:
    with _two_lanes() as rig:
        rig.sinks[0].fail = psycopg.OperationalError("connection lost")
        rig.sinks[1].fail = SprError("the table rejects every row")
        rig.flushing.submit(_pending())
        rig.flushing.await_outcome(10.0)
        assert rig.committed == [] and rig.failure.failed
        with pytest.raises(SprError, match="rejects every row"):
            rig.failure.raise_if_failed()


def test_a_batch_below_the_split_size_goes_whole_over_one_connection() -> None:
    with _two_lanes() as rig:
        assert rig.flushing.lanes is not None
        rig.flushing.lanes.split_rows = 13
        rig.flushing.submit(_pending())
        _settle(rig)
        assert rig.sinks[0].flushes == [{("t", p): 10 * p + 3 for p in range(4)}]
        assert rig.sinks[1].flushes == [] and rig.committed[0].rows == 12


def _collapsed_batch() -> Any:
    batch = _batch()
    for p in range(4):  # a second event of every entity: 12 rows for 24 events
        for i in range(3):
            value = f'{{"entity_type":"o","entity_id":"p{p}e{i}","sequence":2,"state":"t"}}'
            offset = 10 * p + 3 + i
            batch.add(decode_event(value.encode(), offset=offset, timestamp_ms=0), "t", p, offset)
    assert (batch.row_count, batch.events_added) == (12, 24)
    return batch


def test_a_batch_that_collapsed_well_goes_whole_over_one_connection() -> None:
    with _two_lanes() as rig:
        lanes, sinks = rig.flushing.lanes, rig.sinks
        assert lanes is not None
        lanes.split_rows_per_event = 0.6  # 0.5 rows per event: whole
        rig.flushing.submit(_pending(_collapsed_batch()))
        _settle(rig)
        assert len(sinks[0].flushes) == 1 and sinks[1].flushes == []
        lanes.split_rows_per_event = 0.5  # at the threshold: split
        rig.flushing.submit(_pending(_collapsed_batch()))
        _settle(rig)
        assert len(sinks[0].flushes) == 2 and len(sinks[1].flushes) == 1
        assert len(rig.committed) == 2


def test_combine_sums_the_parts() -> None:
    parts = {
        1: FlushResult(rows=5, applied=3, stale=1, rejected=1, offsets={("t", 1): 9}),
        0: FlushResult(rows=2, applied=2, stale=0, offsets={("t", 0): 4}),
    }
    whole = combine(parts)
    assert (whole.rows, whole.applied, whole.stale, whole.rejected) == (7, 5, 1, 1)
    assert whole.offsets == {("t", 0): 4, ("t", 1): 9}
    assert combine({0: parts[0]}) is parts[0]
