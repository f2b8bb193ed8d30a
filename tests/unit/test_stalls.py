"""The stall detector: pure rules, then the watch over a fake consumer (no servers)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from spr.engine.stalls import PartitionState, StallDetector, StallWatch

A, B = ("t", 0), ("t", 1)


def state(position: int, high: int, held: bool = False) -> PartitionState:
    return PartitionState(position=position, high=high, held=held)


def test_a_partition_standing_still_with_lag_is_stalled_after_the_bound() -> None:
    detector = StallDetector(stall_after_s=10)
    assert detector.observe({A: state(5, 9), B: state(3, 9)}, 0.0) == []
    assert detector.observe({A: state(5, 9), B: state(4, 9)}, 9.9) == []
    assert detector.observe({A: state(5, 9), B: state(6, 9)}, 10.0) == [(A, True)]
    assert detector.stalled == {A}
    # Still stuck after a recovery: due again a full bound later, no longer "first".
    assert detector.observe({A: state(5, 9), B: state(7, 9)}, 15.0) == []
    assert detector.observe({A: state(5, 9), B: state(8, 9)}, 20.0) == [(A, False)]
    # It moves: no longer stalled.
    assert detector.observe({A: state(6, 9), B: state(9, 9)}, 21.0) == []
    assert detector.stalled == set()


@pytest.mark.parametrize(
    "quiet",
    [
        state(9, 9),  # caught up: nothing waits
        state(5, 9, held=True),  # paused by spr, or flushing held up
        state(-1001, 9),  # position unknown
        state(5, -1),  # high watermark unknown
    ],
    ids=["caught-up", "held", "no-position", "no-watermark"],
)
def test_no_stall_without_lag_or_with_a_reason(quiet: PartitionState) -> None:
    detector = StallDetector(stall_after_s=1)
    for now in (0.0, 5.0, 50.0):
        assert detector.observe({A: quiet}, now) == []
    assert detector.stalled == set()


def test_holding_resets_the_clock_and_revoked_partitions_are_forgotten() -> None:
    detector = StallDetector(stall_after_s=10)
    detector.observe({A: state(5, 9)}, 0.0)
    detector.observe({A: state(5, 9, held=True)}, 8.0)  # paused for backpressure
    assert detector.observe({A: state(5, 9)}, 12.0) == []  # counts from 12 again
    assert detector.observe({A: state(5, 9)}, 22.0) == [(A, True)]
    assert detector.observe({}, 23.0) == [] and detector.stalled == set()


def test_a_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StallDetector(0)


class FakeConsumer:
    """Positions and cached watermarks as librdkafka reports them; records seeks and
    resumes. ``stuck`` partitions never move (a pause flag left behind)."""

    def __init__(self, positions: dict[tuple[str, int], int], high: int) -> None:
        self.positions = positions
        self.high = high
        self.seeks: list[tuple[str, int, int]] = []
        self.resumed: list[tuple[str, int]] = []

    def position(self, parts: list[Any]) -> list[Any]:
        return [
            SimpleNamespace(topic=p.topic, partition=p.partition,
                            offset=self.positions[(p.topic, p.partition)])
            for p in parts
        ]  # fmt: skip

    def get_watermark_offsets(self, part: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.high

    def seek(self, part: Any) -> None:
        self.seeks.append((part.topic, part.partition, part.offset))

    def resume(self, parts: list[Any]) -> None:
        self.resumed += [(p.topic, p.partition) for p in parts]


def test_the_watch_warns_once_seeks_to_the_committed_offset_and_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer({A: 40, B: 100}, high=100)
    positions = SimpleNamespace(assigned={A, B}, committed={A: 35, B: 100}, start_offsets={})
    watch = StallWatch(5.0, watermarks=lambda keys: {}, interval_s=1.0)
    caplog.set_level(logging.WARNING, "spr.engine")
    for now in range(0, 12):
        watch.check(consumer, positions, paused=set(), held=False, now_s=float(now))
    assert consumer.seeks == [("t", 0, 35), ("t", 0, 35)]  # at 5 s, and again at 10 s
    assert consumer.resumed == [A, A]
    assert watch.stalled == 1 and watch.recoveries == 2
    warnings = [r.getMessage() for r in caplog.records if "stall" in r.getMessage()]
    assert len(warnings) == 1 and "partition=0" in warnings[0] and "position=40" in warnings[0]
    consumer.positions[A] = 60  # the recovery worked
    watch.check(consumer, positions, paused=set(), held=False, now_s=13.0)
    assert watch.stalled == 0


def test_the_watch_leaves_paused_partitions_alone_and_asks_for_unknown_ends() -> None:
    consumer = FakeConsumer({A: 40, B: -1001}, high=-1001)  # nothing fetched yet
    positions = SimpleNamespace(assigned={A, B}, committed={A: 40, B: 7}, start_offsets={})
    asked: list[list[tuple[str, int]]] = []

    def watermarks(keys: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        asked.append(keys)
        return {key: (0, 100) for key in keys}

    watch = StallWatch(4.0, watermarks=watermarks, interval_s=1.0)
    for now in range(0, 6):
        watch.check(consumer, positions, paused={A}, held=False, now_s=float(now))
    # A is paused by spr: no stall. B never fetched: it stands at its committed offset,
    # its end comes from the admin client (rate-limited), and it is recovered.
    assert asked and all(keys == [A, B] for keys in asked) and len(asked) <= 3
    assert consumer.seeks == [("t", 1, 7)] and consumer.resumed == [B]


def test_a_partition_that_never_fetched_from_the_beginning_stands_at_the_log_start() -> None:
    consumer = FakeConsumer({A: -1001}, high=-1001)
    positions = SimpleNamespace(assigned={A}, committed={}, start_offsets={A: -2})
    watch = StallWatch(2.0, watermarks=lambda keys: {A: (30, 90)}, interval_s=1.0)
    for now in range(0, 4):
        watch.check(consumer, positions, paused=set(), held=False, now_s=float(now))
    assert consumer.seeks == [("t", 0, 30)] and consumer.resumed == [A]
