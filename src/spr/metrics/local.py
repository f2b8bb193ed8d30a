"""What the hot loop records between two publishes: plain ints, floats and bucket counts."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence

from spr.metrics.names import (
    CIRCUIT_CLOSED,
    FLUSH_BUCKETS,
    LATENCY_BUCKETS,
    check_bounds,
)

# ---------------------------------------------------------------------- local stats


class BucketCounts:
    """Histogram observations folded into preallocated, non-cumulative bucket counts.

    Invariant: ``counts[i]`` holds the weight of observations ``v`` with
    ``bounds[i-1] < v <= bounds[i]`` (Prometheus' inclusive ``le``); the last slot is
    ``+Inf``. ``total`` is the sum of ``value * weight``. Plain Python, not thread-safe:
    one owner thread observes, and :class:`MetricsPublisher` drains from that thread.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = check_bounds(bounds)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.total: float = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """Record ``weight`` observations of ``value`` (seconds). O(log buckets), no allocation."""
        self.counts[bisect_left(self.bounds, value)] += weight
        self.total += value * weight

    def observe_many(self, values: Iterable[float]) -> None:
        """Record each value once."""
        bounds = self.bounds
        counts = self.counts
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self.total += total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def clear(self) -> None:
        counts = self.counts
        for i in range(len(counts)):
            counts[i] = 0
        self.total = 0.0


class LocalStats:
    """What the engine's hot loop records between two publishes; plain ints and floats.

    Two kinds of fields:

    - *deltas*, zeroed by every publish: the outcome counters (``applied``, ``stale``,
      ``duplicate``, ``dead_lettered``), ``idempotency_lookups`` / ``idempotency_hits``,
      ``producer_records`` / ``producer_errors``, ``rebalances``, ``offset_gaps`` /
      ``offset_gap_events``, ``misrouted`` (events per topic), the ``latency`` and
      ``flush`` bucket counts, and
      ``partition_events`` (events per ``(topic, partition)``);
    - *current state*, kept across publishes: ``lag`` and ``lag_seconds`` per
      ``(topic, partition)``, ``retention_seconds`` per topic, ``paused_partitions``,
      ``stalled_partitions`` and
      ``circuit_state``.

    Increment the attributes directly (``stats.applied += n``); that is the whole hot-path
    cost. Not thread-safe: one thread owns a LocalStats and calls the publisher.
    """

    __slots__ = (
        "applied",
        "circuit_state",
        "dead_lettered",
        "duplicate",
        "flush",
        "idempotency_hits",
        "idempotency_lookups",
        "lag",
        "lag_seconds",
        "latency",
        "misrouted",
        "offset_gap_events",
        "offset_gaps",
        "partition_events",
        "paused_partitions",
        "producer_errors",
        "producer_records",
        "rebalances",
        "retention_seconds",
        "stale",
        "stalled_partitions",
    )

    def __init__(
        self,
        *,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        flush_buckets: Sequence[float] = FLUSH_BUCKETS,
    ) -> None:
        self.applied = 0
        self.stale = 0
        self.duplicate = 0
        self.dead_lettered = 0
        self.idempotency_lookups = 0
        self.idempotency_hits = 0
        self.producer_records = 0
        self.producer_errors = 0
        self.rebalances = 0
        self.offset_gaps = 0
        self.offset_gap_events = 0
        self.misrouted: dict[str, int] = {}
        self.latency = BucketCounts(latency_buckets)
        self.flush = BucketCounts(flush_buckets)
        self.partition_events: dict[tuple[str, int], int] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.lag_seconds: dict[tuple[str, int], float] = {}
        self.retention_seconds: dict[str, float] = {}
        self.paused_partitions = 0
        self.stalled_partitions = 0
        self.circuit_state = CIRCUIT_CLOSED

    def observe_latency(self, seconds: float, weight: int = 1) -> None:
        """Broker timestamp to database commit, for ``weight`` events."""
        self.latency.observe(seconds, weight)

    def observe_event_latencies(self, commit_ms: int, timestamps_ms: Iterable[int]) -> None:
        """One latency observation per event: ``commit_ms - timestamp_ms`` (floored at 0,
        since broker and host clocks may disagree slightly)."""
        self.latency.observe_many(max(commit_ms - ts, 0) / 1000.0 for ts in timestamps_ms)

    def observe_flush(self, seconds: float) -> None:
        """Duration of one flush transaction."""
        self.flush.observe(seconds)

    def count_partition_events(self, topic: str, partition: int, events: int) -> None:
        """``events`` more events seen on one partition (feeds the distribution variance)."""
        key = (topic, partition)
        self.partition_events[key] = self.partition_events.get(key, 0) + events

    def note_partitions(self, topic: str, partitions: Iterable[int]) -> None:
        """Partitions that count in the distribution variance even with no events (a
        partition that receives nothing is the worst skew)."""
        for partition in partitions:
            self.partition_events.setdefault((topic, partition), 0)

    def set_lag(
        self, topic: str, partition: int, messages: int, seconds: float | None = None
    ) -> None:
        """Current lag of one partition: messages behind the high watermark and, when
        known, the age of the oldest unconsumed message."""
        self.lag[(topic, partition)] = messages
        if seconds is not None:
            self.lag_seconds[(topic, partition)] = seconds

    def forget_partition(self, topic: str, partition: int) -> None:
        """The partition was revoked or lost: its lag series disappear at the next publish."""
        self.lag.pop((topic, partition), None)
        self.lag_seconds.pop((topic, partition), None)

    def clear_deltas(self) -> None:
        """Zero the delta fields; :meth:`MetricsPublisher.publish` calls this."""
        self.applied = self.stale = self.duplicate = self.dead_lettered = 0
        self.idempotency_lookups = self.idempotency_hits = 0
        self.producer_records = self.producer_errors = 0
        self.rebalances = self.offset_gaps = self.offset_gap_events = 0
        self.misrouted.clear()
        self.latency.clear()
        self.flush.clear()
        self.partition_events.clear()


def fold_engine_counters(
    stats: LocalStats, previous: Mapping[str, float], current: Mapping[str, float]
) -> None:
    """Add the change between two engine counter snapshots (``EngineStats.as_dict()``)
    to ``stats``, so the engine's own cumulative counters feed the metrics without a
    second increment in its loop.

    Mapping: ``applied`` = applied + collapsed (superseded within a batch by a newer
    sequence of the same entity, which is what applying it in order gives);
    ``stale``; ``duplicate``; ``dead_lettered`` = invalid + rejected (rows the database
    refused, dead-lettered) + misrouted events held back and dead-lettered; ring lookups = consumed -
    invalid (every decodable event is looked up) and hits = duplicate; ``rebalances``;
    ``offset_gaps`` and ``offset_gap_events`` (retention gaps skipped, events lost in them).
    ``paused_partitions`` and ``stalled_partitions`` are copied as current values.
    """

    def delta(key: str) -> int:
        return int(current.get(key, 0)) - int(previous.get(key, 0))

    stats.applied += delta("applied") + delta("collapsed")
    stats.stale += delta("stale")
    stats.duplicate += delta("duplicate")
    stats.dead_lettered += delta("invalid") + delta("rejected") + delta("misrouted_dead_lettered")
    stats.idempotency_lookups += delta("consumed") - delta("invalid")
    stats.idempotency_hits += delta("duplicate")
    stats.rebalances += delta("rebalances")
    stats.offset_gaps += delta("offset_gaps")
    stats.offset_gap_events += delta("offset_gap_events")
    stats.paused_partitions = int(current.get("paused_partitions", 0))
    stats.stalled_partitions = int(current.get("stalled_partitions", 0))


def partition_distribution_variance(counts: Sequence[int]) -> float:
    """Coefficient of variation of events per partition: population std / mean.

    0.0 for perfectly even counts (and for a single partition); NaN when there are no
    partitions or no events (no distribution to judge). 0.15 reads as "15 % skew".
    """
    n = len(counts)
    if n == 0:
        return math.nan
    mean = sum(counts) / n
    if mean <= 0:
        return math.nan
    variance = sum((c - mean) ** 2 for c in counts) / n
    return math.sqrt(variance) / mean
