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

from spr.metrics.local import (
    BucketCounts,
    LocalStats,
    fold_engine_counters,
    partition_distribution_variance,
)
from spr.metrics.names import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    CIRCUIT_STATE,
    CIRCUIT_STATES,
    CONSUMER_LAG,
    CONSUMER_LAG_SECONDS,
    DESIGN_METRIC_NAMES,
    EVENTS_TOTAL,
    EXTRA_METRIC_NAMES,
    FLUSH_BUCKETS,
    FLUSH_SECONDS,
    IDEMPOTENCY_HITS_TOTAL,
    IDEMPOTENCY_LOOKUPS_TOTAL,
    LATENCY_BUCKETS,
    METRIC_NAMES,
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
)
from spr.metrics.prometheus import MetricsPublisher, SprMetrics
from spr.metrics.server import MetricsServer, serve

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
    "MISROUTED_EVENTS_TOTAL",
    "OFFSET_GAPS_TOTAL",
    "OFFSET_GAP_EVENTS_TOTAL",
    "OUTCOMES",
    "PARTITION_DISTRIBUTION_VARIANCE",
    "PAUSED_PARTITIONS",
    "PROCESSOR_LATENCY_SECONDS",
    "PRODUCER_ERRORS_TOTAL",
    "PRODUCER_RECORDS_TOTAL",
    "REBALANCES_TOTAL",
    "STALLED_PARTITIONS",
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
