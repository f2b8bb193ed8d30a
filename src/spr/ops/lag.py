"""``spr lag``: how far a consumer group is behind, in messages and in retention.

For every partition of the group's topics :func:`measure_lag` reports the group's
committed offset (Kafka's group offsets; the engine commits them to Kafka right after the
database transaction, so they trail the database's ``spr_offsets`` by at most one
asynchronous commit), the log start and end offsets, the lag in messages, and how much of
the topic's retention window that lag has used up.

Retention fraction, the method: ``age / retention.ms``, where ``age`` is the time since
the broker timestamp of the oldest unconsumed message (read at the committed offset by a
throwaway consumer that never commits) and ``retention.ms`` is the topic's effective
setting. At 1.0 the broker may start deleting messages the group has not read. The
estimate errs early, which is the safe side: the broker deletes whole segments, only once
the newest message of a segment is older than ``retention.ms``. It ignores
``retention.bytes`` (size-based deletion has no time scale), and with
``message.timestamp.type=CreateTime`` it trusts producer clocks, as the broker's own
deletion does. Infinite retention (``-1``) gives no fraction. A committed offset below the
log start is a *gap*: messages were deleted unread; it always fails the check.

The command exits 1 when a partition is above ``--max-lag`` or ``--max-retention-fraction``
(default 0.8, the alert threshold) or has a gap, so it can gate a script; 2 when a server
is missing or an argument is wrong.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# OffsetSpec and ResourceType are re-exported without __all__: mypy --strict flags them.
from spr.config.defaults import default_bootstrap
from spr.errors import ConfigError
from spr.kafka.admin import KafkaAdmin

__all__ = [
    "DEFAULT_MAX_RETENTION_FRACTION",
    "LagReport",
    "PartitionLag",
    "measure_lag",
]

DEFAULT_MAX_RETENTION_FRACTION = 0.8
_TIMEOUT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class PartitionLag:
    """One partition's lag. ``committed`` is None when the group never committed there
    (lag is then counted from the log start, as ``auto.offset.reset=earliest`` reads)."""

    topic: str
    partition: int
    committed: int | None
    log_start: int
    end: int
    lag: int
    gap: int
    oldest_age_s: float | None
    retention_s: float | None
    retention_fraction: float | None


@dataclass(frozen=True, kw_only=True)
class LagReport:
    group: str
    partitions: tuple[PartitionLag, ...]
    max_lag: int | None
    max_retention_fraction: float | None

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def violations(self) -> list[str]:
        """One sentence per partition above a threshold or with a gap."""
        out: list[str] = []
        for p in self.partitions:
            where = f"{p.topic}[{p.partition}]"
            if p.gap:
                out.append(f"{where}: {p.gap} messages were deleted by retention before being read")
            if self.max_lag is not None and p.lag > self.max_lag:
                out.append(f"{where}: lag {p.lag} > {self.max_lag}")
            fraction = p.retention_fraction
            limit = self.max_retention_fraction
            if limit is not None and fraction is not None and fraction > limit:
                out.append(f"{where}: lag is {fraction:.0%} of the retention window > {limit:.0%}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "total_lag": self.total_lag,
            "max_lag": self.max_lag,
            "max_retention_fraction": self.max_retention_fraction,
            "violations": self.violations(),
            "partitions": [asdict(p) for p in self.partitions],
        }


def measure_lag(
    group: str,
    *,
    topics: Sequence[str] = (),
    bootstrap: str | None = None,
    max_lag: int | None = None,
    max_retention_fraction: float | None = DEFAULT_MAX_RETENTION_FRACTION,
    now_ms: int | None = None,
    timeout_s: float = _TIMEOUT_S,
    kafka: Mapping[str, str] | None = None,
) -> LagReport:
    """Measure the group's lag on ``topics`` (default: every topic it has offsets for).

    ``kafka`` holds librdkafka settings (their connection part is used: security
    protocol, SASL, SSL), as ``spr run -X`` takes them. Blocks for a few broker round
    trips and, for lagging partitions, one fetch each.
    Raises ConfigError when the group has no offsets and no topic is given, or a topic
    does not exist; ServerUnavailable when Kafka does not answer.
    """
    if not group:
        raise ConfigError("a consumer group is required (--group)")
    if max_lag is not None and max_lag < 0:
        raise ConfigError(f"--max-lag must be >= 0, got {max_lag}")
    if max_retention_fraction is not None and max_retention_fraction <= 0:
        raise ConfigError(f"--max-retention-fraction must be > 0, got {max_retention_fraction}")
    ops = KafkaAdmin.for_bootstrap(
        bootstrap or default_bootstrap(), kafka=kafka, timeout_s=timeout_s
    )
    ops.check_reachable()
    committed = ops.group_offsets(group)
    wanted = list(dict.fromkeys(topics)) or sorted({t for t, _ in committed})
    if not wanted:
        raise ConfigError(f"group {group} has no committed offsets in Kafka; name a --topic")
    partitions = ops.partitions(wanted)
    marks = ops.watermarks(partitions)
    retention = {t: ops.retention_ms(t) for t in wanted}
    # The oldest unconsumed message sits at the committed offset (or the log start).
    positions: dict[tuple[str, int], int] = {}
    for key in partitions:
        low, high = marks[key]
        position = max(committed.get(key, low), low)
        if position < high:
            positions[key] = position
    timestamps = ops.message_timestamps(positions)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    rows: list[PartitionLag] = []
    for key in partitions:
        topic, partition = key
        low, high = marks[key]
        offset = committed.get(key)
        start = low if offset is None else offset
        retention_ms = retention[topic]
        age_s: float | None = None
        if key in positions:
            ts = timestamps.get(key)
            age_s = None if ts is None else max(now - ts, 0) / 1000.0
        elif retention_ms is not None:
            age_s = 0.0
        fraction: float | None = None
        if retention_ms is not None and age_s is not None:
            fraction = age_s / (retention_ms / 1000.0) if retention_ms > 0 else math.inf
        rows.append(
            PartitionLag(
                topic=topic,
                partition=partition,
                committed=offset,
                log_start=low,
                end=high,
                lag=max(high - start, 0),
                gap=max(low - offset, 0) if offset is not None else 0,
                oldest_age_s=age_s,
                retention_s=None if retention_ms is None else retention_ms / 1000.0,
                retention_fraction=fraction,
            )
        )
    return LagReport(
        group=group,
        partitions=tuple(rows),
        max_lag=max_lag,
        max_retention_fraction=max_retention_fraction,
    )
