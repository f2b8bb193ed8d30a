"""The prometheus-client side: metric objects in a private registry, fed in batches."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric

from spr.errors import ConfigError
from spr.metrics.local import BucketCounts, LocalStats, partition_distribution_variance
from spr.metrics.names import (
    CIRCUIT_STATE,
    CONSUMER_LAG,
    CONSUMER_LAG_SECONDS,
    EVENTS_TOTAL,
    FLUSH_BUCKETS,
    FLUSH_SECONDS,
    IDEMPOTENCY_HITS_TOTAL,
    IDEMPOTENCY_LOOKUPS_TOTAL,
    LATENCY_BUCKETS,
    MISROUTED_EVENTS_TOTAL,
    OFFSET_GAP_EVENTS_TOTAL,
    OFFSET_GAPS_TOTAL,
    OUTCOMES,
    PARTITION_DISTRIBUTION_VARIANCE,
    PAUSED_PARTITIONS,
    PROCESSOR_LATENCY_SECONDS,
    PRODUCER_ERRORS_TOTAL,
    PRODUCER_RECORDS_TOTAL,
    REBALANCES_TOTAL,
    STALLED_PARTITIONS,
    TOPIC_RETENTION_SECONDS,
    check_bounds,
)

# ----------------------------------------------------------------- prometheus side


class _BucketedHistogram:
    """A histogram collector fed with pre-bucketed counts.

    prometheus-client's ``Histogram`` takes one observation per call; folding thousands of
    locally bucketed observations through it would cost as much as observing in the hot
    loop. This collector keeps cumulative counts and emits a standard histogram family
    on scrape. ``fold`` and ``collect`` run on different threads, hence the lock.
    """

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = check_bounds(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def fold(self, local: BucketCounts) -> None:
        if local.bounds != self.bounds:
            raise ConfigError(
                f"{self.name}: local buckets {local.bounds} differ from {self.bounds}"
            )
        with self._lock:
            for i, n in enumerate(local.counts):
                if n:
                    self._counts[i] += n
            self._sum += local.total

    def snapshot(self) -> tuple[list[int], float]:
        """(non-cumulative counts with +Inf last, sum)."""
        with self._lock:
            return list(self._counts), self._sum

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=())

    def collect(self) -> Iterator[Metric]:
        counts, total = self.snapshot()
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class SprMetrics:
    """Every spr metric, created once in a private ``CollectorRegistry``.

    Build one per engine (or per test). Reading the attributes is safe from any thread;
    writing is :class:`MetricsPublisher`'s job.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        flush_buckets: Sequence[float] = FLUSH_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.consumer_lag = Gauge(
            CONSUMER_LAG,
            "Messages between the consumer's position and the partition's high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            CONSUMER_LAG_SECONDS,
            "Age of the oldest unconsumed message of the partition, seconds (0 without lag).",
            ["topic", "partition"],
            registry=r,
        )
        self.topic_retention_seconds = Gauge(
            TOPIC_RETENTION_SECONDS,
            "The topic's retention.ms in seconds (absent when retention is infinite).",
            ["topic"],
            registry=r,
        )
        self.processor_latency = _BucketedHistogram(
            PROCESSOR_LATENCY_SECONDS,
            "Broker timestamp of an event to the commit of the transaction that applied it.",
            latency_buckets,
        )
        r.register(self.processor_latency)
        self.flush_seconds = _BucketedHistogram(
            FLUSH_SECONDS, "Duration of one flush transaction.", flush_buckets
        )
        r.register(self.flush_seconds)
        self.events = Counter(
            EVENTS_TOTAL,
            "Consumed events by outcome: applied, stale, duplicate, dead_lettered.",
            ["outcome"],
            registry=r,
        )
        # Every outcome exists from the start, so rate() and ratios see 0 and not "absent".
        self._outcome_counters = {o: self.events.labels(outcome=o) for o in OUTCOMES}
        self.producer_records = Counter(
            PRODUCER_RECORDS_TOTAL, "Records handed to the Kafka producer.", registry=r
        )
        self.producer_errors = Counter(
            PRODUCER_ERRORS_TOTAL, "Records the Kafka producer failed to deliver.", registry=r
        )
        self.partition_distribution_variance = Gauge(
            PARTITION_DISTRIBUTION_VARIANCE,
            "Coefficient of variation of events per partition over the last window "
            "(fraction; NaN when too few events).",
            ["topic"],
            registry=r,
        )
        self.idempotency_hits = Counter(
            IDEMPOTENCY_HITS_TOTAL,
            "Events the idempotency ring recognised as already seen.",
            registry=r,
        )
        self.idempotency_lookups = Counter(
            IDEMPOTENCY_LOOKUPS_TOTAL, "Events looked up in the idempotency ring.", registry=r
        )
        self.paused_partitions = Gauge(
            PAUSED_PARTITIONS, "Partitions currently paused by backpressure.", registry=r
        )
        self.stalled_partitions = Gauge(
            STALLED_PARTITIONS,
            "Partitions with lag whose position stopped moving while spr did not hold them "
            "(a bug or a broker problem; spr seeks and resumes them).",
            registry=r,
        )
        self.rebalances = Counter(
            REBALANCES_TOTAL, "Rebalance callbacks (assign, revoke, lost).", registry=r
        )
        self.offset_gaps = Counter(
            OFFSET_GAPS_TOTAL,
            "Retention gaps skipped (on_offset_gap earliest or latest): the stored offset "
            "was below the log start.",
            registry=r,
        )
        self.offset_gap_events = Counter(
            OFFSET_GAP_EVENTS_TOTAL,
            "Events deleted by retention before being applied, skipped with the gaps.",
            registry=r,
        )
        self.misrouted_events = Counter(
            MISROUTED_EVENTS_TOTAL,
            "Events on a partition their key does not map to (partition_for(key, n)), per "
            "topic: a producer that does not route like spr.",
            ["topic"],
            registry=r,
        )
        self.circuit_state = Gauge(
            CIRCUIT_STATE, "Circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r
        )

    def outcome(self, outcome: str) -> Counter:
        """The ``spr_events_total`` child of one outcome (raises KeyError for others)."""
        return self._outcome_counters[outcome]


class MetricsPublisher:
    """Folds :class:`LocalStats` deltas into :class:`SprMetrics`, at most every ``interval_s``.

    Call :meth:`maybe_publish` from the loop as often as convenient (it costs one clock
    read when it is not yet time) and :meth:`publish` once more on shutdown. Both run in the
    thread that owns the stats and never block on I/O. The clock is injectable.
    """

    def __init__(
        self,
        metrics: SprMetrics,
        *,
        interval_s: float = 1.0,
        variance_window_s: float = 60.0,
        min_events_per_partition: int = 400,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s < 0 or variance_window_s <= 0 or min_events_per_partition < 1:
            raise ConfigError(
                "metrics publisher needs interval_s >= 0, variance_window_s > 0 and "
                "min_events_per_partition >= 1"
            )
        self.metrics = metrics
        self.interval_s = interval_s
        self.variance_window_s = variance_window_s
        self.min_events_per_partition = min_events_per_partition
        self._clock = clock
        self._last_publish = clock()
        self._window_start = self._last_publish
        self._window: dict[tuple[str, int], int] = {}
        self._lag_labels: set[tuple[str, int]] = set()
        self._lag_seconds_labels: set[tuple[str, int]] = set()
        self._retention_labels: set[str] = set()
        self._variance_topics: set[str] = set()
        self.publishes = 0

    def maybe_publish(self, stats: LocalStats) -> bool:
        """Publish if ``interval_s`` has passed since the last publish; True if it did."""
        if self._clock() - self._last_publish < self.interval_s:
            return False
        self.publish(stats)
        return True

    def publish(self, stats: LocalStats) -> None:
        """Fold every delta of ``stats`` into the metrics, set the gauges, zero the deltas."""
        now = self._clock()
        m = self.metrics
        for outcome in OUTCOMES:
            delta = getattr(stats, outcome)
            if delta:
                m.outcome(outcome).inc(delta)
        for counter, delta in (
            (m.idempotency_lookups, stats.idempotency_lookups),
            (m.idempotency_hits, stats.idempotency_hits),
            (m.producer_records, stats.producer_records),
            (m.producer_errors, stats.producer_errors),
            (m.rebalances, stats.rebalances),
            (m.offset_gaps, stats.offset_gaps),
            (m.offset_gap_events, stats.offset_gap_events),
        ):
            if delta:
                counter.inc(delta)
        for topic, events in stats.misrouted.items():
            # A topic present with 0 is exposed at 0, so that rate() sees it from start.
            m.misrouted_events.labels(topic=topic).inc(events)
        m.processor_latency.fold(stats.latency)
        m.flush_seconds.fold(stats.flush)
        m.paused_partitions.set(stats.paused_partitions)
        m.stalled_partitions.set(stats.stalled_partitions)
        m.circuit_state.set(stats.circuit_state)
        self._lag_labels = _sync_partition_gauge(m.consumer_lag, stats.lag, self._lag_labels)
        self._lag_seconds_labels = _sync_partition_gauge(
            m.consumer_lag_seconds, stats.lag_seconds, self._lag_seconds_labels
        )
        for topic in self._retention_labels - stats.retention_seconds.keys():
            m.topic_retention_seconds.remove(topic)
        for topic, seconds in stats.retention_seconds.items():
            m.topic_retention_seconds.labels(topic=topic).set(seconds)
        self._retention_labels = set(stats.retention_seconds)
        self._fold_window(stats, now)
        stats.clear_deltas()
        self._last_publish = now
        self.publishes += 1

    def _fold_window(self, stats: LocalStats, now: float) -> None:
        window = self._window
        for key, events in stats.partition_events.items():
            window[key] = window.get(key, 0) + events
        for key in stats.lag:  # assigned partitions count even when they saw nothing
            window.setdefault(key, 0)
        if now - self._window_start < self.variance_window_s:
            return
        per_topic: dict[str, list[int]] = {}
        for (topic, _partition), events in window.items():
            per_topic.setdefault(topic, []).append(events)
        gauge = self.metrics.partition_distribution_variance
        for topic in self._variance_topics - per_topic.keys():
            gauge.remove(topic)
        for topic, counts in per_topic.items():
            enough = sum(counts) >= self.min_events_per_partition * len(counts)
            value = partition_distribution_variance(counts) if enough else math.nan
            gauge.labels(topic=topic).set(value)
        self._variance_topics = set(per_topic)
        window.clear()
        self._window_start = now


def _sync_partition_gauge(
    gauge: Gauge, values: Mapping[tuple[str, int], float], published: set[tuple[str, int]]
) -> set[tuple[str, int]]:
    for topic, partition in published - values.keys():
        gauge.remove(topic, str(partition))
    for (topic, partition), value in values.items():
        gauge.labels(topic=topic, partition=str(partition)).set(value)
    return set(values)
