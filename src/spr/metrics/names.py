"""Every metric name and histogram layout of spr, declared once (design §7)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

from spr.errors import ConfigError

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
# The "lag over 80 % of the retention window" alert needs both.
CONSUMER_LAG_SECONDS = "spr_consumer_lag_seconds"
TOPIC_RETENTION_SECONDS = "spr_topic_retention_seconds"
# Retention gaps skipped by on_offset_gap = earliest|latest.
OFFSET_GAPS_TOTAL = "spr_offset_gaps_total"
OFFSET_GAP_EVENTS_TOTAL = "spr_offset_gap_events_total"
# Events on a partition their key does not map to (design §10), per topic.
MISROUTED_EVENTS_TOTAL = "spr_misrouted_events_total"
# Not in design §7: partitions with lag that stopped moving for no reason spr knows
# (spr.engine.stalls).
STALLED_PARTITIONS = "spr_stalled_partitions"

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
    CONSUMER_LAG_SECONDS,
    TOPIC_RETENTION_SECONDS,
    OFFSET_GAPS_TOTAL,
    OFFSET_GAP_EVENTS_TOTAL,
    MISROUTED_EVENTS_TOTAL,
)
EXTRA_METRIC_NAMES: tuple[str, ...] = (STALLED_PARTITIONS,)
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


def check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    result = tuple(float(b) for b in bounds)
    if not result or any(b <= a for a, b in pairwise(result)):
        raise ConfigError(f"histogram bounds must be increasing and non-empty, got {bounds!r}")
    if not all(math.isfinite(b) for b in result):
        raise ConfigError("histogram bounds must be finite; +Inf is always added")
    return result
