"""Telemetry: the engine's counters as one snapshot, and its metrics, sampled in batches.

The hot loop never touches prometheus-client: the stages keep plain counters, and
:class:`Telemetry` folds them into :class:`~spr.metrics.LocalStats` and publishes about
once a second, from the loop's thread. Lag is read from the consumer (its position and
cached high watermarks, no request); the age of the oldest unconsumed message
(``spr_consumer_lag_seconds``) is the broker timestamp of the message at the consumer's
position, read on a background thread by a reader outside the group, at most every
``lag_probe_interval_s``, and only for partitions with lag.
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from spr.clock import Clock
from spr.kafka.admin import KafkaAdmin
from spr.kafka.clients import topic_partition
from spr.metrics import LocalStats, MetricsPublisher, fold_engine_counters

__all__ = [
    "MIN_RATE_FLUSHES",
    "MIN_RATE_SPAN_S",
    "TOO_SHORT",
    "EngineStats",
    "Telemetry",
    "measured_rate",
]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]

#: The shortest span, in seconds, over which a rate means something.
MIN_RATE_SPAN_S = 0.5
#: The fewest durable units (flushes, committed batches) a rate may rest on.
MIN_RATE_FLUSHES = 3
#: What is printed instead of a rate measured over too short a span.
TOO_SHORT = "too short to measure"


def measured_rate(events: int, seconds: float, flushes: int | None = None) -> float | None:
    """``events / seconds``, or None when the span is too short to time: under
    :data:`MIN_RATE_SPAN_S`, or (when ``flushes`` is given) resting on fewer than
    :data:`MIN_RATE_FLUSHES` durable units, or no events at all."""
    if events <= 0 or seconds < MIN_RATE_SPAN_S:
        return None
    if flushes is not None and flushes < MIN_RATE_FLUSHES:
        return None
    return events / seconds


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """A snapshot of the engine's counters.

    ``consumed`` counts data messages taken from Kafka; each ends as ``duplicate``
    (dropped by the ring), ``invalid`` (offset advanced, handed to the dead-letter hook),
    or a batch event, which the flush turns into ``applied`` rows, ``stale`` rows (the
    guard kept a newer stored sequence), ``rejected`` rows (refused by the database for
    their content, class DATA, and dead-lettered) or ``collapsed`` (superseded within its
    batch by a newer event of the same entity; when that newest event is rejected, the
    events it superseded stay ``collapsed``: only the newest one is dead-lettered).

    ``flush_retries`` counts failed flush attempts that were retried;
    ``circuit_state`` is the breaker's state (0 closed, 1 half-open, 2 open) and
    ``circuit_opens`` how often it opened; ``offset_gaps`` counts retention gaps skipped
    and ``offset_gap_events`` the events lost in them; ``stalled_partitions`` are the
    partitions stalled now and ``stall_recoveries`` the seeks that recovered them
    (:mod:`spr.engine.stalls`); ``misrouted`` counts events on a partition their key
    does not map to and ``misrouted_dead_lettered`` those of them held back and
    dead-lettered (design §10); ``active_s`` is the time from the first message consumed
    to the last flush committed (None before both happened).
    """

    consumed: int = 0
    applied: int = 0
    stale: int = 0
    collapsed: int = 0
    duplicate: int = 0
    invalid: int = 0
    flushes: int = 0
    flush_retries: int = 0
    flush_seconds_total: float = 0.0
    flush_seconds_max: float = 0.0
    flush_seconds_last: float = 0.0
    pauses: int = 0
    resumes: int = 0
    paused_partitions: int = 0
    rebalances: int = 0
    assigned_partitions: int = 0
    partitions_revoked: int = 0
    partitions_lost: int = 0
    rollbacks: int = 0
    kafka_errors: int = 0
    offset_gaps: int = 0
    offset_gap_events: int = 0
    rejected: int = 0
    circuit_state: int = 0
    circuit_opens: int = 0
    buffered_bytes: int = 0
    max_buffered_bytes: int = 0
    stalled_partitions: int = 0
    stall_recoveries: int = 0
    misrouted: int = 0
    misrouted_dead_lettered: int = 0
    active_s: float | None = None

    @property
    def events_per_s(self) -> float | None:
        """The active rate: events consumed over ``active_s``, from the first message
        to the last commit (an idle wait is not work); None when that span is too short
        to time (:func:`measured_rate`)."""
        if self.active_s is None:
            return None
        return measured_rate(self.consumed, self.active_s, self.flushes)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": self.events_per_s}


class Telemetry:
    """Publishes the engine's metrics through ``publisher`` (None: does nothing).

    ``stats`` returns the current :class:`EngineStats`; ``admin`` answers the retention
    and lag-age look-ups. Never raises: metrics must never stop the engine.
    """

    def __init__(
        self,
        publisher: MetricsPublisher | None,
        *,
        clock: Clock,
        topics: tuple[str, ...],
        stats: Callable[[], EngineStats],
        admin: Callable[[], KafkaAdmin],
        lag_probe_interval_s: float = 5.0,
    ) -> None:
        self.publisher = publisher
        self.clock = clock
        self.topics = topics
        self._stats = stats
        self._admin = admin
        self.local = LocalStats()
        self._previous: dict[str, Any] = {}
        self._last_s = clock.monotonic()
        self._retention_checked = False
        self.lag_probe_interval_s = lag_probe_interval_s
        self._probe: threading.Thread | None = None
        self._probe_last_s = -1e18
        self._lag_seconds: dict[TopicPartitionKey, float] = {}
        self._misrouted: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.publisher is not None

    def observe_flush(self, timestamps: array[int], weights: array[int], seconds: float) -> None:
        """A flush committed after ``seconds``; ``timestamps`` (broker time, epoch ms)
        with their ``weights`` stand for the events it applied."""
        if self.publisher is None:
            return
        local = self.local
        local.observe_flush(seconds)
        if timestamps:
            commit_ms = self.clock.time() * 1000.0
            for timestamp, weight in zip(timestamps, weights, strict=True):
                local.observe_latency(max(commit_ms - timestamp, 0.0) / 1000.0, weight)

    def _count_misrouted(self, totals: Mapping[str, int]) -> None:
        # Cumulative totals per topic into this publish's deltas; every topic is there
        # from the first publish, at 0.
        for topic in self.topics:
            self.local.misrouted.setdefault(topic, 0)
        for topic, total in totals.items():
            delta = total - self._misrouted.get(topic, 0)
            if delta:
                self.local.misrouted[topic] = self.local.misrouted.get(topic, 0) + delta
                self._misrouted[topic] = total

    def tick(
        self,
        consumer: Any,
        assigned: set[TopicPartitionKey],
        partition_events: Any,
        misrouted: Mapping[str, int],
    ) -> None:
        """About once a second (the publisher's interval): publish. ``partition_events``
        is called for the events per partition since the last publish; ``misrouted`` is
        the misrouted events per topic so far."""
        publisher = self.publisher
        if publisher is None:
            return
        now = self.clock.monotonic()
        if now - self._last_s < publisher.interval_s:
            return
        self._last_s = now
        self.publish(consumer, assigned, partition_events(), misrouted)

    def publish(
        self,
        consumer: Any,
        assigned: set[TopicPartitionKey],
        partition_events: Mapping[TopicPartitionKey, int],
        misrouted: Mapping[str, int],
    ) -> None:
        """Fold counter deltas, lag, per-partition counts and misrouted events into the
        local stats and publish them."""
        publisher = self.publisher
        if publisher is None:
            return
        local = self.local
        try:
            current = self._stats().as_dict()
            fold_engine_counters(local, self._previous, current)
            self._previous = current
            local.circuit_state = int(current["circuit_state"])
            for (topic, partition), events in partition_events.items():
                local.count_partition_events(topic, partition, events)
            self._count_misrouted(misrouted)
            if consumer is not None and assigned:
                self._update_lag(consumer, assigned)
            publisher.publish(local)
        except Exception as exc:
            log.debug("publishing metrics failed: %s", exc)

    def forget(self, keys: set[TopicPartitionKey]) -> None:
        """Partitions revoked or lost: their lag series disappear at the next publish."""
        for topic, partition in keys:
            self.local.forget_partition(topic, partition)
            self._lag_seconds.pop((topic, partition), None)

    def _update_lag(self, consumer: Any, assigned: set[TopicPartitionKey]) -> None:
        keys = sorted(assigned)
        lagging: dict[TopicPartitionKey, int] = {}
        for tp in consumer.position([topic_partition(t, p) for t, p in keys]):
            key = (tp.topic, tp.partition)
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0 or tp.offset < 0:
                continue
            lag = max(0, high - tp.offset)
            if lag:
                lagging[key] = tp.offset
            else:
                self._lag_seconds[key] = 0.0
            self.local.set_lag(tp.topic, tp.partition, lag, self._lag_seconds.get(key))
        self._probe_lag_age(lagging)
        if not self._retention_checked:
            self._retention_checked = True
            self.local.retention_seconds.update(self._retention_seconds())

    def _probe_lag_age(self, positions: dict[TopicPartitionKey, int]) -> None:
        now = self.clock.monotonic()
        if not positions or (self._probe is not None and self._probe.is_alive()):
            return
        if now - self._probe_last_s < self.lag_probe_interval_s:
            return
        self._probe_last_s = now

        def probe() -> None:
            try:
                timestamps = self._admin().message_timestamps(positions)
            except Exception as exc:
                log.debug("reading the oldest unconsumed messages failed: %s", exc)
                return
            wall_ms = self.clock.time() * 1000.0
            for key, timestamp in timestamps.items():
                self._lag_seconds[key] = max(wall_ms - timestamp, 0.0) / 1000.0

        self._probe = threading.Thread(target=probe, name="spr-lag-probe", daemon=True)
        self._probe.start()

    def _retention_seconds(self) -> dict[str, float]:
        """Each topic's ``retention.ms`` in seconds (absent when infinite)."""
        result: dict[str, float] = {}
        try:
            admin = self._admin()
            for topic in self.topics:
                retention_ms = admin.retention_ms(topic)
                if retention_ms is not None and retention_ms > 0:
                    result[topic] = retention_ms / 1000.0
        except Exception as exc:
            log.debug("topic retention unavailable: %s", exc)
        return result
