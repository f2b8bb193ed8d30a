"""Prometheus metrics of spr: every name declared once, published in batches.

The names are design §7's, plus two gauges the retention alert needs
(:data:`CONSUMER_LAG_SECONDS`, :data:`TOPIC_RETENTION_SECONDS`). They live in a
:class:`SprMetrics`, which creates its prometheus-client objects in its *own*
``CollectorRegistry`` (never the process-global one), so tests and several engines in one
process never collide.

The hot loop never touches prometheus-client. It increments plain attributes of a
:class:`LocalStats` (a slotted object of ints and floats; latencies are folded into
preallocated bucket counts with :func:`bisect.bisect_left`, which runs in C). A
:class:`MetricsPublisher` folds those deltas into the prometheus objects at most once per
``interval_s`` (:meth:`MetricsPublisher.maybe_publish`), from the thread that owns the
stats, and zeroes them. The HTTP endpoint (:func:`serve`) runs in its own thread and only
reads the prometheus objects, which are thread-safe.

Definitions the alert rules rely on (deploy/prometheus/spr-alerts.yml):

- ``spr_events_total{outcome}`` counts every consumed event exactly once:
  ``applied`` (written, or superseded by a newer sequence of the same entity in the same
  batch, which is what applying it in order would have left), ``stale`` (the database's
  sequence guard kept a newer or equal stored sequence), ``duplicate`` (dropped by the
  idempotency ring) and ``dead_lettered``.
- ``spr_partition_distribution_variance{topic}`` is the *coefficient of variation*
  (population standard deviation / mean) of events per partition over one tumbling window
  (default 60 s), as a fraction: 0.15 means the partitions' event counts deviate from
  their mean by 15 % (root mean square). Partitions with no events in the window count as
  zeros. The name is the field report's; the value is a CV because a raw variance depends
  on the traffic volume and could not carry a fixed "15 %" threshold. When the window held
  fewer than ``min_events_per_partition`` events per partition on average (default 400,
  where sampling noise alone gives a CV of about 1/sqrt(400) = 5 %) the gauge is NaN:
  too few events to call a skew, and NaN never fires an alert.
- ``spr_circuit_state`` is 0 closed, 1 half-open, 2 open (:data:`CIRCUIT_STATES`).
- ``spr_consumer_lag{topic,partition}`` is the high watermark minus the consumer's
  position, in messages; ``spr_consumer_lag_seconds{topic,partition}`` is the age of the
  oldest unconsumed message (0 without lag), and ``spr_topic_retention_seconds{topic}`` the
  topic's ``retention.ms`` / 1000, so ``lag_seconds / retention_seconds`` is the share of
  the retention window used up before data is lost.
- ``spr_offset_gaps_total`` counts retention gaps the engine skipped (``on_offset_gap``
  ``earliest`` or ``latest``: the stored offset was below the log start) and
  ``spr_offset_gap_events_total`` the events lost in them (log start minus stored
  offset). Both stay 0 with the default ``on_offset_gap = fail``, which stops instead.

OpenTelemetry export is not implemented: the OpenTelemetry SDK is not a dependency. A
collector can scrape ``/metrics`` with its Prometheus receiver instead.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric

from spr.errors import ConfigError

__all__ = [
    "CIRCUIT_CLOSED",
    "CIRCUIT_HALF_OPEN",
    "CIRCUIT_OPEN",
    "CIRCUIT_STATE",
    "CIRCUIT_STATES",
    "CONSUMER_LAG",
    "CONSUMER_LAG_SECONDS",
    "DESIGN_METRIC_NAMES",
    "EVENTS_TOTAL",
    "EXTRA_METRIC_NAMES",
    "FLUSH_BUCKETS",
    "FLUSH_SECONDS",
    "IDEMPOTENCY_HITS_TOTAL",
    "IDEMPOTENCY_LOOKUPS_TOTAL",
    "LATENCY_BUCKETS",
    "METRIC_NAMES",
    "OFFSET_GAPS_TOTAL",
    "OFFSET_GAP_EVENTS_TOTAL",
    "OUTCOMES",
    "PARTITION_DISTRIBUTION_VARIANCE",
    "PAUSED_PARTITIONS",
    "PROCESSOR_LATENCY_SECONDS",
    "PRODUCER_ERRORS_TOTAL",
    "PRODUCER_RECORDS_TOTAL",
    "REBALANCES_TOTAL",
    "TOPIC_RETENTION_SECONDS",
    "BucketCounts",
    "LocalStats",
    "MetricsPublisher",
    "MetricsServer",
    "SprMetrics",
    "fold_engine_counters",
    "partition_distribution_variance",
    "serve",
]

# ---------------------------------------------------------------------------- names

CONSUMER_LAG = "spr_consumer_lag"
PROCESSOR_LATENCY_SECONDS = "spr_processor_latency_seconds"
FLUSH_SECONDS = "spr_flush_seconds"
EVENTS_TOTAL = "spr_events_total"
PRODUCER_RECORDS_TOTAL = "spr_producer_records_total"
PRODUCER_ERRORS_TOTAL = "spr_producer_errors_total"
PARTITION_DISTRIBUTION_VARIANCE = "spr_partition_distribution_variance"
IDEMPOTENCY_HITS_TOTAL = "spr_idempotency_hits_total"
IDEMPOTENCY_LOOKUPS_TOTAL = "spr_idempotency_lookups_total"
PAUSED_PARTITIONS = "spr_paused_partitions"
REBALANCES_TOTAL = "spr_rebalances_total"
CIRCUIT_STATE = "spr_circuit_state"
# Not in design §7: the "lag over 80 % of the retention window" alert needs both.
CONSUMER_LAG_SECONDS = "spr_consumer_lag_seconds"
TOPIC_RETENTION_SECONDS = "spr_topic_retention_seconds"
# Not in design §7 either: retention gaps skipped by on_offset_gap = earliest|latest.
OFFSET_GAPS_TOTAL = "spr_offset_gaps_total"
OFFSET_GAP_EVENTS_TOTAL = "spr_offset_gap_events_total"

DESIGN_METRIC_NAMES: tuple[str, ...] = (
    CONSUMER_LAG,
    PROCESSOR_LATENCY_SECONDS,
    FLUSH_SECONDS,
    EVENTS_TOTAL,
    PRODUCER_RECORDS_TOTAL,
    PRODUCER_ERRORS_TOTAL,
    PARTITION_DISTRIBUTION_VARIANCE,
    IDEMPOTENCY_HITS_TOTAL,
    IDEMPOTENCY_LOOKUPS_TOTAL,
    PAUSED_PARTITIONS,
    REBALANCES_TOTAL,
    CIRCUIT_STATE,
)
EXTRA_METRIC_NAMES: tuple[str, ...] = (
    CONSUMER_LAG_SECONDS,
    TOPIC_RETENTION_SECONDS,
    OFFSET_GAPS_TOTAL,
    OFFSET_GAP_EVENTS_TOTAL,
)
METRIC_NAMES: tuple[str, ...] = DESIGN_METRIC_NAMES + EXTRA_METRIC_NAMES

OUTCOMES: tuple[str, ...] = ("applied", "stale", "duplicate", "dead_lettered")

CIRCUIT_CLOSED = 0
CIRCUIT_HALF_OPEN = 1
CIRCUIT_OPEN = 2
CIRCUIT_STATES: Mapping[str, int] = {
    "closed": CIRCUIT_CLOSED,
    "half_open": CIRCUIT_HALF_OPEN,
    "open": CIRCUIT_OPEN,
}

# 1 ms .. 10 s; 50 ms is a bound so that the "p99 > 50 ms" alert is decided by a bucket
# edge rather than by interpolation inside a wide bucket.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# A flush is one transaction; the backpressure threshold defaults to 50 ms.
FLUSH_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    result = tuple(float(b) for b in bounds)
    if not result or any(b <= a for a, b in pairwise(result)):
        raise ConfigError(f"histogram bounds must be increasing and non-empty, got {bounds!r}")
    if not all(math.isfinite(b) for b in result):
        raise ConfigError("histogram bounds must be finite; +Inf is always added")
    return result


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
        self.bounds: tuple[float, ...] = _check_bounds(bounds)
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
      ``offset_gap_events``, the ``latency`` and ``flush`` bucket counts, and
      ``partition_events`` (events per ``(topic, partition)``);
    - *current state*, kept across publishes: ``lag`` and ``lag_seconds`` per
      ``(topic, partition)``, ``retention_seconds`` per topic, ``paused_partitions`` and
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
        "offset_gap_events",
        "offset_gaps",
        "partition_events",
        "paused_partitions",
        "producer_errors",
        "producer_records",
        "rebalances",
        "retention_seconds",
        "stale",
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
        self.latency = BucketCounts(latency_buckets)
        self.flush = BucketCounts(flush_buckets)
        self.partition_events: dict[tuple[str, int], int] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.lag_seconds: dict[tuple[str, int], float] = {}
        self.retention_seconds: dict[str, float] = {}
        self.paused_partitions = 0
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
    refused, dead-lettered); ring lookups = consumed -
    invalid (every decodable event is looked up) and hits = duplicate; ``rebalances``;
    ``offset_gaps`` and ``offset_gap_events`` (retention gaps skipped, events lost in them).
    ``paused_partitions`` is copied as a current value.
    """

    def delta(key: str) -> int:
        return int(current.get(key, 0)) - int(previous.get(key, 0))

    stats.applied += delta("applied") + delta("collapsed")
    stats.stale += delta("stale")
    stats.duplicate += delta("duplicate")
    stats.dead_lettered += delta("invalid") + delta("rejected")
    stats.idempotency_lookups += delta("consumed") - delta("invalid")
    stats.idempotency_hits += delta("duplicate")
    stats.rebalances += delta("rebalances")
    stats.offset_gaps += delta("offset_gaps")
    stats.offset_gap_events += delta("offset_gap_events")
    stats.paused_partitions = int(current.get("paused_partitions", 0))


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
        self.bounds = _check_bounds(bounds)
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
        m.processor_latency.fold(stats.latency)
        m.flush_seconds.fold(stats.flush)
        m.paused_partitions.set(stats.paused_partitions)
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


# ------------------------------------------------------------------------- endpoint


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread). Close it to stop listening."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}"
            ) from exc
        self.addr = addr
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; blocks until the server thread has ended."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve(port: int, addr: str = "127.0.0.1", *, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    Returns at once. ``port=0`` picks a free port (see :attr:`MetricsServer.port`). The
    default address is loopback only; exposing metrics beyond the host is a deliberate
    choice. Raises :class:`spr.errors.ConfigError` when the address cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be 0..65535, got {port}")
    return MetricsServer(registry, port, addr)
