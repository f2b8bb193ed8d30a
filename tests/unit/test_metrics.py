"""Metrics: the names of design §7, batched publishing, the variance definition, /metrics."""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from spr import metrics as m
from spr.engine import EngineStats
from spr.errors import ConfigError

# Design §7, copied by hand: a rename in metrics.py must fail here.
DESIGN_7 = (
    "spr_consumer_lag",
    "spr_processor_latency_seconds",
    "spr_flush_seconds",
    "spr_events_total",
    "spr_producer_records_total",
    "spr_producer_errors_total",
    "spr_partition_distribution_variance",
    "spr_idempotency_hits_total",
    "spr_idempotency_lookups_total",
    "spr_paused_partitions",
    "spr_rebalances_total",
    "spr_circuit_state",
    "spr_consumer_lag_seconds",
    "spr_topic_retention_seconds",
    "spr_offset_gaps_total",
    "spr_offset_gap_events_total",
    "spr_misrouted_events_total",
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exposed(metrics: m.SprMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def _types(text: str) -> dict[str, str]:
    found = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    return {k: v for k, v in found.items() if not k.endswith("_created")}


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not exposed:\n{text}")


def test_declared_names_are_exactly_design_section_7() -> None:
    assert m.DESIGN_METRIC_NAMES == DESIGN_7
    extra = ("spr_stalled_partitions",)
    assert extra == m.EXTRA_METRIC_NAMES
    assert (*DESIGN_7, *extra) == m.METRIC_NAMES
    assert len(set(m.METRIC_NAMES)) == len(m.METRIC_NAMES)


def test_registry_exposes_every_name_once_with_its_type() -> None:
    types = _types(_exposed(m.SprMetrics()))
    assert set(types) == set(m.METRIC_NAMES)
    assert types["spr_processor_latency_seconds"] == "histogram"
    assert types["spr_flush_seconds"] == "histogram"
    for name in m.METRIC_NAMES:
        if name.endswith("_total"):
            assert types[name] == "counter", name
    for name in ("spr_consumer_lag", "spr_paused_partitions", "spr_circuit_state"):
        assert types[name] == "gauge"


def test_each_instance_has_its_own_registry() -> None:
    a, b = m.SprMetrics(), m.SprMetrics()
    stats = m.LocalStats()
    stats.applied = 3
    m.MetricsPublisher(a).publish(stats)
    assert _value(_exposed(a), 'spr_events_total{outcome="applied"}') == 3
    assert _value(_exposed(b), 'spr_events_total{outcome="applied"}') == 0


def test_every_outcome_is_exposed_from_the_start() -> None:
    text = _exposed(m.SprMetrics())
    for outcome in ("applied", "stale", "duplicate", "dead_lettered"):
        assert _value(text, f'spr_events_total{{outcome="{outcome}"}}') == 0


def test_publish_folds_deltas_and_zeroes_them() -> None:
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics)
    stats = m.LocalStats()
    for round_ in (1, 2):
        stats.applied += 10
        stats.stale += 2
        stats.duplicate += 3
        stats.dead_lettered += 1
        stats.idempotency_lookups += 15
        stats.idempotency_hits += 3
        stats.producer_records += 100
        stats.producer_errors += 1
        stats.rebalances += 1
        stats.offset_gaps += 1
        stats.offset_gap_events += 7
        stats.observe_flush(0.02)
        stats.observe_latency(0.004, weight=5)
        stats.paused_partitions = round_
        stats.circuit_state = m.CIRCUIT_OPEN if round_ == 2 else m.CIRCUIT_CLOSED
        publisher.publish(stats)
        assert stats.applied == stats.idempotency_hits == stats.rebalances == 0
        assert stats.offset_gaps == stats.offset_gap_events == 0
        assert stats.latency.count == stats.flush.count == 0
    text = _exposed(metrics)
    assert _value(text, 'spr_events_total{outcome="applied"}') == 20
    assert _value(text, 'spr_events_total{outcome="stale"}') == 4
    assert _value(text, 'spr_events_total{outcome="duplicate"}') == 6
    assert _value(text, 'spr_events_total{outcome="dead_lettered"}') == 2
    assert _value(text, "spr_idempotency_lookups_total") == 30
    assert _value(text, "spr_idempotency_hits_total") == 6
    assert _value(text, "spr_producer_records_total") == 200
    assert _value(text, "spr_producer_errors_total") == 2
    assert _value(text, "spr_rebalances_total") == 2
    assert _value(text, "spr_offset_gaps_total") == 2
    assert _value(text, "spr_offset_gap_events_total") == 14
    assert _value(text, "spr_paused_partitions") == 2
    assert _value(text, "spr_circuit_state") == 2
    assert _value(text, "spr_flush_seconds_count") == 2
    assert _value(text, 'spr_flush_seconds_bucket{le="0.025"}') == 2
    assert _value(text, 'spr_flush_seconds_bucket{le="0.01"}') == 0
    assert _value(text, "spr_processor_latency_seconds_count") == 10
    assert _value(text, "spr_processor_latency_seconds_sum") == pytest.approx(0.04)


def test_engine_counter_snapshots_fold_into_outcomes() -> None:
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics)
    stats = m.LocalStats()
    zero: dict[str, float] = {}
    first = {"consumed": 100, "applied": 60, "collapsed": 20, "stale": 5, "duplicate": 10,
             "invalid": 5, "rebalances": 1, "paused_partitions": 2}  # fmt: skip
    second = {**first, "consumed": 150, "applied": 100, "duplicate": 12, "paused_partitions": 0}
    m.fold_engine_counters(stats, zero, first)
    publisher.publish(stats)
    assert _value(_exposed(metrics), "spr_paused_partitions") == 2
    m.fold_engine_counters(stats, first, second)
    publisher.publish(stats)
    text = _exposed(metrics)
    assert _value(text, 'spr_events_total{outcome="applied"}') == 120  # 100 applied + 20 collapsed
    assert _value(text, 'spr_events_total{outcome="stale"}') == 5
    assert _value(text, 'spr_events_total{outcome="duplicate"}') == 12
    assert _value(text, 'spr_events_total{outcome="dead_lettered"}') == 5
    assert _value(text, "spr_idempotency_lookups_total") == 145  # consumed - invalid
    assert _value(text, "spr_idempotency_hits_total") == 12
    assert _value(text, "spr_rebalances_total") == 1
    assert _value(text, "spr_paused_partitions") == 0
    assert _value(text, "spr_offset_gaps_total") == 0
    assert _value(text, "spr_offset_gap_events_total") == 0


def test_skipped_retention_gaps_fold_from_engine_stats() -> None:
    """EngineStats' offset_gaps / offset_gap_events reach the two counters as deltas:
    each gap counted once however often the snapshots are folded, the events summed."""
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics)
    stats = m.LocalStats()
    text = _exposed(metrics)
    assert _value(text, "spr_offset_gaps_total") == 0  # exposed before any gap
    assert _value(text, "spr_offset_gap_events_total") == 0
    # Two partitions assigned with gaps of 40 and 25 events, then a later one of 3.
    snapshots: list[dict[str, float]] = [
        {},
        {"consumed": 10, "offset_gaps": 2, "offset_gap_events": 65},
        {"consumed": 20, "offset_gaps": 2, "offset_gap_events": 65},  # nothing new
        {"consumed": 30, "offset_gaps": 3, "offset_gap_events": 68},
    ]
    expected = [(2, 65), (2, 65), (3, 68)]
    for (previous, current), (gaps, lost) in zip(pairwise(snapshots), expected, strict=True):
        m.fold_engine_counters(stats, previous, current)
        publisher.publish(stats)
        assert stats.offset_gaps == stats.offset_gap_events == 0
        text = _exposed(metrics)
        assert _value(text, "spr_offset_gaps_total") == gaps
        assert _value(text, "spr_offset_gap_events_total") == lost
    assert _types(text)["spr_offset_gap_events_total"] == "counter"
    assert "# HELP spr_offset_gap_events_total Events deleted by retention" in text


def test_engine_stats_names_the_gap_counters_the_fold_reads() -> None:
    """A rename in EngineStats would silently fold zeros: the keys must exist there."""
    snapshot = EngineStats(offset_gaps=1, offset_gap_events=40).as_dict()
    stats = m.LocalStats()
    m.fold_engine_counters(stats, {}, snapshot)
    assert (stats.offset_gaps, stats.offset_gap_events) == (1, 40)


def test_latency_buckets_are_inclusive_like_prometheus() -> None:
    metrics = m.SprMetrics()
    stats = m.LocalStats()
    stats.observe_latency(0.05)  # exactly on the 50 ms bound: le="0.05"
    stats.observe_latency(0.0500001)
    stats.observe_latency(20.0)  # beyond 10 s: only +Inf
    stats.observe_event_latencies(1_000_000, [999_998, 1_000_001])  # 2 ms, clock skew -> 0
    m.MetricsPublisher(metrics).publish(stats)
    text = _exposed(metrics)
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="0.001"}') == 1
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="0.0025"}') == 2
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="0.05"}') == 3
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="0.1"}') == 4
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="10.0"}') == 4
    assert _value(text, 'spr_processor_latency_seconds_bucket{le="+Inf"}') == 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.integers(1, 5)),
        max_size=40,
    )
)
def test_bucket_folding_agrees_with_prometheus_histogram(obs: list[tuple[float, int]]) -> None:
    reference = Histogram(
        "ref", "reference", buckets=m.LATENCY_BUCKETS, registry=CollectorRegistry()
    )
    metrics = m.SprMetrics()
    stats = m.LocalStats()
    for value, weight in obs:
        stats.observe_latency(value, weight)
        for _ in range(weight):
            reference.observe(value)
    m.MetricsPublisher(metrics).publish(stats)
    ours = {
        s.labels["le"]: s.value
        for fam in metrics.processor_latency.collect()
        for s in fam.samples
        if s.name.endswith("_bucket")
    }
    theirs = {
        s.labels["le"]: s.value
        for fam in reference.collect()
        for s in fam.samples
        if s.name.endswith("_bucket")
    }
    assert ours == theirs


def test_maybe_publish_waits_for_the_interval() -> None:
    clock = FakeClock()
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics, interval_s=1.0, clock=clock)
    stats = m.LocalStats()
    stats.applied = 1
    clock.now += 0.5
    assert not publisher.maybe_publish(stats)
    assert stats.applied == 1
    clock.now += 0.5
    assert publisher.maybe_publish(stats)
    assert stats.applied == 0
    assert publisher.publishes == 1


def test_lag_series_follow_the_assignment() -> None:
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics)
    stats = m.LocalStats()
    stats.set_lag("orders", 0, 12, seconds=3.5)
    stats.set_lag("orders", 1, 0, seconds=0.0)
    stats.retention_seconds["orders"] = 604_800.0
    publisher.publish(stats)
    text = _exposed(metrics)
    assert _value(text, 'spr_consumer_lag{partition="0",topic="orders"}') == 12
    assert _value(text, 'spr_consumer_lag_seconds{partition="0",topic="orders"}') == 3.5
    assert _value(text, 'spr_topic_retention_seconds{topic="orders"}') == 604_800
    stats.forget_partition("orders", 0)
    publisher.publish(stats)
    text = _exposed(metrics)
    assert 'spr_consumer_lag{partition="0"' not in text
    assert 'spr_consumer_lag_seconds{partition="0"' not in text
    assert _value(text, 'spr_consumer_lag{partition="1",topic="orders"}') == 0


def test_variance_is_the_coefficient_of_variation() -> None:
    assert m.partition_distribution_variance([100, 100, 100]) == 0.0
    assert m.partition_distribution_variance([50, 150]) == pytest.approx(0.5)
    # std of (10, 20, 30) is sqrt(200/3); mean 20
    assert m.partition_distribution_variance([10, 20, 30]) == pytest.approx(math.sqrt(200 / 3) / 20)
    assert m.partition_distribution_variance([7]) == 0.0
    assert math.isnan(m.partition_distribution_variance([]))
    assert math.isnan(m.partition_distribution_variance([0, 0, 0]))
    # Scale-free: the same shape at ten times the traffic has the same value.
    assert m.partition_distribution_variance([115, 100, 85]) == pytest.approx(
        m.partition_distribution_variance([1150, 1000, 850])
    )


def test_variance_gauge_uses_tumbling_windows_and_counts_idle_partitions() -> None:
    clock = FakeClock()
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(
        metrics, variance_window_s=60.0, min_events_per_partition=100, clock=clock
    )
    stats = m.LocalStats()
    stats.set_lag("t", 2, 0)  # assigned, never receives an event
    for _ in range(6):
        stats.count_partition_events("t", 0, 100)
        stats.count_partition_events("t", 1, 100)
        clock.now += 10
        publisher.publish(stats)
    # window: t[0]=600, t[1]=600, t[2]=0 -> mean 400, std sqrt(80000)
    value = _value(_exposed(metrics), 'spr_partition_distribution_variance{topic="t"}')
    assert value == pytest.approx(math.sqrt(80_000) / 400)
    # Next window: too few events per partition to judge -> NaN, which never alerts.
    stats.count_partition_events("t", 0, 10)
    clock.now += 60
    publisher.publish(stats)
    text = _exposed(metrics)
    assert math.isnan(_value(text, 'spr_partition_distribution_variance{topic="t"}'))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        m.MetricsPublisher(m.SprMetrics(), interval_s=-1)
    with pytest.raises(ConfigError):
        m.BucketCounts([0.1, 0.05])
    with pytest.raises(ConfigError):
        m.serve(70_000, registry=CollectorRegistry())


def test_serve_exposes_the_published_values_over_http() -> None:
    metrics = m.SprMetrics()
    publisher = m.MetricsPublisher(metrics)
    stats = m.LocalStats()
    stats.applied = 41
    stats.duplicate = 7
    stats.set_lag("orders", 3, 1234)
    publisher.publish(stats)
    with m.serve(0, registry=metrics.registry) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            text = response.read().decode()
        assert _value(text, 'spr_events_total{outcome="applied"}') == 41
        assert _value(text, 'spr_events_total{outcome="duplicate"}') == 7
        assert _value(text, 'spr_consumer_lag{partition="3",topic="orders"}') == 1234
        # A busy port is a plain ConfigError, not a traceback.
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            m.serve(server.port, registry=metrics.registry)
        url = server.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
