"""Hot-loop cost of metrics: plain LocalStats fields against prometheus-client objects.

One "batch" is what the engine does per consume() call of 500 events: count outcomes
and ring lookups, and record each event's latency. spr does it on LocalStats and
publishes once a second; the alternative is calling prometheus-client per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from spr.metrics import LATENCY_BUCKETS, LocalStats, MetricsPublisher, SprMetrics

EVENTS = 500
LATENCIES = [0.0005 * (i % 40) for i in range(EVENTS)]


def _local_batch(stats: LocalStats) -> Callable[[], None]:
    def run() -> None:
        stats.idempotency_lookups += EVENTS
        stats.idempotency_hits += 3
        stats.duplicate += 3
        stats.applied += EVENTS - 3
        stats.latency.observe_many(LATENCIES)

    return run


def _prometheus_batch() -> Callable[[], None]:
    registry = CollectorRegistry()
    lookups = Counter("lookups", "l", registry=registry)
    hits = Counter("hits", "h", registry=registry)
    outcomes = Counter("events", "e", ["outcome"], registry=registry)
    latency = Histogram("latency", "l", buckets=LATENCY_BUCKETS, registry=registry)
    applied, duplicate = outcomes.labels("applied"), outcomes.labels("duplicate")

    def run() -> None:
        for i, value in enumerate(LATENCIES):
            lookups.inc()
            if i < 3:
                hits.inc()
                duplicate.inc()
            else:
                applied.inc()
            latency.observe(value)

    return run


def test_local_stats_batch(benchmark: Any) -> None:
    stats = LocalStats()
    benchmark(_local_batch(stats))
    assert stats.latency.count > 0


def test_prometheus_per_event_batch(benchmark: Any) -> None:
    benchmark(_prometheus_batch())


def test_publish_once(benchmark: Any) -> None:
    metrics = SprMetrics()
    publisher = MetricsPublisher(metrics)
    stats = LocalStats()
    for partition in range(12):
        stats.set_lag("orders", partition, 100, 0.5)

    def run() -> None:
        _local_batch(stats)()
        publisher.publish(stats)

    benchmark(run)


def _best_of(fn: Callable[[], None], repeats: int = 7, loops: int = 50) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / loops


def test_local_stats_are_much_cheaper_than_per_event_prometheus() -> None:
    local = _best_of(_local_batch(LocalStats()))
    direct = _best_of(_prometheus_batch())
    print(
        f"per event: LocalStats {local / EVENTS * 1e9:.0f} ns, prometheus {direct / EVENTS * 1e9:.0f} ns"
    )
    assert local * 3 < direct
