"""The stall detector: a partition with lag that stopped moving for no reason spr knows.

A partition is *stalled* when its consumer position has not moved for longer than
``stall_after_s`` while messages wait behind it (position below the high watermark),
and spr has no reason to hold it: it is not paused by spr, and flushing is not held up
by failures. That is a bug or a broker problem (a member that froze and came back kept
a pause flag spr did not set; a fetcher that stopped); whatever the cause, the pipeline
would otherwise stop silently for that partition.

:class:`StallDetector` is pure logic on an injected clock: the engine feeds it the
positions and watermarks about once a second and acts on what it returns (one WARNING
per stall, the ``spr_stalled_partitions`` gauge, and a recovery: seek to the committed
offset and resume). Nothing here blocks or reads a clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spr.kafka.clients import topic_partition
from spr.logs import log_event

__all__ = ["PartitionState", "StallDetector", "StallWatch"]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True, kw_only=True)
class PartitionState:
    """One partition as the loop sees it: the consumer's ``position`` (next offset to
    return; -1 when unknown), the ``high`` watermark (-1 when unknown), and whether spr
    holds it on purpose (``held``: paused by spr, or flushing held up)."""

    position: int
    high: int
    held: bool


class StallDetector:
    """Finds partitions whose position stands still while lag waits.

    ``stalled`` holds the partitions stalled now (the gauge). :meth:`observe` returns the
    partitions to recover: each one ``stall_after_s`` after it stopped, and again every
    ``stall_after_s`` while a recovery does not move it. A partition leaves ``stalled``
    when it moves, catches up, is held by spr or is no longer observed.
    """

    def __init__(self, stall_after_s: float) -> None:
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s must be positive, got {stall_after_s}")
        self.stall_after_s = stall_after_s
        self.stalled: set[TopicPartitionKey] = set()
        # Per waiting partition: the position it stands at, and since when it counts.
        self._since: dict[TopicPartitionKey, tuple[int, float]] = {}

    def observe(
        self, partitions: Mapping[TopicPartitionKey, PartitionState], now_s: float
    ) -> list[tuple[TopicPartitionKey, bool]]:
        """Take one look at ``partitions`` (every assigned one) at ``now_s``; returns
        ``(partition, first)`` for each partition to recover now, in order, ``first``
        when its stall was not known before (the one time to warn)."""
        since = self._since
        for key in list(since):
            if key not in partitions:
                del since[key]
        self.stalled &= partitions.keys()
        due: list[tuple[TopicPartitionKey, bool]] = []
        for key in sorted(partitions):
            state = partitions[key]
            waiting = 0 <= state.position < state.high
            previous = since.get(key)
            if state.held or not waiting or previous is None or previous[0] != state.position:
                self.stalled.discard(key)
                if state.held or not waiting:
                    since.pop(key, None)
                else:
                    since[key] = (state.position, now_s)
                continue
            if now_s - previous[1] >= self.stall_after_s:
                due.append((key, key not in self.stalled))
                self.stalled.add(key)
                # The recovery gets its own stall_after_s before it is tried again.
                since[key] = (state.position, now_s)
        return due


class StallWatch:
    """Runs a :class:`StallDetector` over a live consumer about once a second and
    recovers what it finds: log one WARNING per stall, seek the partition to its
    committed offset (what the database holds; anything after it is read again, which
    the ring and the sequence guard make harmless) and resume it.

    ``positions`` is the pipeline's :class:`~spr.engine.positions.Positions` (what is
    committed, where a partition started); ``watermarks`` answers ``(log start, end)``
    of partitions the consumer knows nothing about yet (one that never fetched since
    its assignment: the very case of a pause flag left behind), at most every half
    ``stall_after_s``. ``recoveries`` counts the seeks.
    """

    def __init__(
        self,
        stall_after_s: float,
        *,
        watermarks: Callable[
            [list[TopicPartitionKey]], Mapping[TopicPartitionKey, tuple[int, int]]
        ],
        interval_s: float = 1.0,
    ) -> None:
        self.detector = StallDetector(stall_after_s)
        self.watermarks = watermarks
        self.interval_s = interval_s
        self.recoveries = 0
        self._last_s = -1e18
        self._marks: dict[TopicPartitionKey, tuple[int, int]] = {}
        self._marks_s = -1e18

    @property
    def stalled(self) -> int:
        return len(self.detector.stalled)

    def check(
        self,
        consumer: Any,
        positions: Any,
        *,
        paused: set[TopicPartitionKey],
        held: bool,
        now_s: float,
    ) -> None:
        """One look, at most every ``interval_s``; never raises (a failed look is
        logged at debug level and retried at the next one)."""
        if now_s - self._last_s < self.interval_s:
            return
        self._last_s = now_s
        try:
            states = self._states(consumer, positions, paused, held, now_s)
            for key, first in self.detector.observe(states, now_s):
                self._recover(consumer, positions, key, states[key], first)
        except Exception as exc:
            log.debug("the stall check failed: %s", exc)

    def _states(
        self,
        consumer: Any,
        positions: Any,
        paused: set[TopicPartitionKey],
        held: bool,
        now_s: float,
    ) -> dict[TopicPartitionKey, PartitionState]:
        assigned = sorted(positions.assigned)
        if not assigned:
            return {}
        highs: dict[TopicPartitionKey, int] = {}
        at: dict[TopicPartitionKey, int] = {}
        for tp in consumer.position([topic_partition(t, p) for t, p in assigned]):
            key = (tp.topic, tp.partition)
            highs[key] = consumer.get_watermark_offsets(tp, cached=True)[1]
            at[key] = tp.offset
        unknown = [key for key in assigned if highs[key] < 0 or at[key] < 0]
        if unknown and now_s - self._marks_s >= self.detector.stall_after_s / 2:
            self._marks_s = now_s
            self._marks = dict(self.watermarks(unknown))
        states: dict[TopicPartitionKey, PartitionState] = {}
        for key in assigned:
            low, end = self._marks.get(key, (-1, -1))
            position = at[key]
            if position < 0:
                # Nothing returned since the assignment: it stands where it started.
                start = positions.committed.get(key, positions.start_offsets.get(key, -1))
                position = start if start >= 0 else low
            high = highs[key] if highs[key] >= 0 else end
            states[key] = PartitionState(position=position, high=high, held=held or key in paused)
        return states

    def _recover(
        self,
        consumer: Any,
        positions: Any,
        key: TopicPartitionKey,
        state: PartitionState,
        first: bool,
    ) -> None:
        target = positions.committed.get(key, state.position)
        if first:
            log_event(
                log,
                "stall",
                level=logging.WARNING,
                topic=key[0],
                partition=key[1],
                position=state.position,
                high_watermark=state.high,
                committed=positions.committed.get(key),
                stalled_for_s=self.detector.stall_after_s,
                action=f"seek to {target} and resume",
            )
        consumer.seek(topic_partition(key[0], key[1], target))
        consumer.resume([topic_partition(*key)])
        self.recoveries += 1
