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

import argparse
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)

# OffsetSpec and ResourceType are re-exported without __all__: mypy --strict flags them.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    OffsetSpec,
    ResourceType,
)

from spr.devstack import default_bootstrap
from spr.errors import ConfigError, ServerUnavailable

__all__ = [
    "DEFAULT_MAX_RETENTION_FRACTION",
    "KafkaOps",
    "LagReport",
    "PartitionLag",
    "measure_lag",
    "register",
]

DEFAULT_MAX_RETENTION_FRACTION = 0.8
_TIMEOUT_S = 10.0
_EARLIEST = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]


class KafkaOps:
    """Blocking administrative reads and writes of offsets, shared by ``spr lag`` and
    ``spr replay``. Every call waits at most ``timeout_s``; an unreachable broker raises
    :class:`ServerUnavailable`, a refusal (unknown topic, active group) ConfigError."""

    def __init__(self, bootstrap: str, *, timeout_s: float = _TIMEOUT_S) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10_000})

    def _wait(self, future: Future[Any], what: str) -> Any:
        try:
            return future.result(timeout=self.timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            raise ConfigError(
                f"Kafka refused to {what}: {getattr(err, 'str', lambda: err)()}"
            ) from exc
        except TimeoutError as exc:
            raise ServerUnavailable(
                f"Kafka at {self.bootstrap} did not answer within {self.timeout_s:g} s ({what})"
            ) from exc

    def check_reachable(self) -> None:
        try:
            self.admin.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise ServerUnavailable(f"cannot reach Kafka at {self.bootstrap}") from exc

    def partitions(self, topics: Iterable[str]) -> list[tuple[str, int]]:
        """Every partition of ``topics``; ConfigError naming a topic that does not exist."""
        result: list[tuple[str, int]] = []
        for topic in topics:
            try:
                md = self.admin.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
            except KafkaException as exc:
                raise ServerUnavailable(f"cannot reach Kafka at {self.bootstrap}") from exc
            if md is None or md.error is not None or not md.partitions:
                raise ConfigError(f"topic {topic} does not exist")
            result.extend((topic, p) for p in sorted(md.partitions))
        return result

    def group_offsets(self, group: str) -> dict[tuple[str, int], int]:
        """The group's committed offsets in Kafka (partitions without one are absent)."""
        futures = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        result = self._wait(futures[group], f"list the offsets of group {group}")
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions or []
            if tp.offset >= 0
        }

    def _list_offsets(
        self, specs: Mapping[tuple[str, int], OffsetSpec], what: str
    ) -> dict[tuple[str, int], int]:
        if not specs:
            return {}
        futures = self.admin.list_offsets(
            {TopicPartition(t, p): spec for (t, p), spec in specs.items()},
            request_timeout=self.timeout_s,
        )
        return {
            (tp.topic, tp.partition): int(self._wait(f, what).offset) for tp, f in futures.items()
        }

    def watermarks(
        self, partitions: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[int, int]]:
        """``(log start, end)`` offsets of each partition."""
        low = self._list_offsets({k: _EARLIEST for k in partitions}, "list offsets")
        high = self._list_offsets({k: _LATEST for k in partitions}, "list offsets")
        return {k: (low[k], high[k]) for k in partitions}

    def offsets_for_timestamp(
        self, partitions: Sequence[tuple[str, int]], timestamp_ms: int
    ) -> dict[tuple[str, int], int]:
        """The first offset whose timestamp is >= ``timestamp_ms`` per partition; the end
        offset when every message is older (Kafka answers -1 then)."""
        found = self._list_offsets(
            {k: OffsetSpec.for_timestamp(timestamp_ms) for k in partitions}, "look up a timestamp"
        )
        missing = [k for k, v in found.items() if v < 0]
        if missing:
            ends = self.watermarks(missing)
            found.update({k: ends[k][1] for k in missing})
        return found

    def retention_ms(self, topic: str) -> int | None:
        """The topic's effective ``retention.ms``; None when retention is infinite."""
        resource = ConfigResource(ResourceType.TOPIC, topic)
        futures = self.admin.describe_configs([resource], request_timeout=self.timeout_s)
        entries = self._wait(futures[resource], f"describe topic {topic}")
        entry = entries.get("retention.ms")
        value = int(entry.value) if entry is not None and entry.value is not None else -1
        return value if value >= 0 else None

    def group_members(self, group: str) -> int:
        """How many members the group has now (0 for an empty or unknown group)."""
        futures = self.admin.describe_consumer_groups([group], request_timeout=self.timeout_s)
        description = self._wait(futures[group], f"describe group {group}")
        return len(description.members or [])

    def commit_group_offsets(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        """Set the group's committed offsets in Kafka. Kafka refuses while the group has
        members (ConfigError)."""
        if not offsets:
            return
        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
        )
        futures = self.admin.alter_consumer_group_offsets([request])
        result = self._wait(futures[group], f"set the offsets of group {group}")
        for tp in result.topic_partitions or []:
            if tp.error is not None:
                raise ConfigError(
                    f"Kafka refused the offset of {tp.topic}[{tp.partition}] for group "
                    f"{group}: {tp.error.str()}"
                )

    def message_timestamps(
        self, positions: Mapping[tuple[str, int], int]
    ) -> dict[tuple[str, int], int]:
        """Broker timestamp (epoch ms) of the message at each ``(topic, partition) ->
        offset``, read by a consumer that belongs to no group and never commits.
        Partitions whose message cannot be read within the timeout are absent."""
        if not positions:
            return {}
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"spr-lag-probe-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                "fetch.max.bytes": 1_048_576,
                "max.partition.fetch.bytes": 65_536,
            }
        )
        found: dict[tuple[str, int], int] = {}
        try:
            consumer.assign([TopicPartition(t, p, o) for (t, p), o in positions.items()])
            deadline = time.monotonic() + self.timeout_s
            while len(found) < len(positions) and time.monotonic() < deadline:
                for msg in consumer.consume(num_messages=500, timeout=0.5):
                    if msg.error() is not None:
                        continue
                    key = (str(msg.topic()), int(msg.partition() or 0))
                    if key in positions and key not in found:
                        kind, ts = msg.timestamp()
                        if kind != 0 and ts >= 0:  # 0 = TIMESTAMP_NOT_AVAILABLE
                            found[key] = ts
                        consumer.pause([TopicPartition(*key)])
        finally:
            consumer.close()
        return found


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
) -> LagReport:
    """Measure the group's lag on ``topics`` (default: every topic it has offsets for).

    Blocks for a few broker round trips and, for lagging partitions, one fetch each.
    Raises ConfigError when the group has no offsets and no topic is given, or a topic
    does not exist; ServerUnavailable when Kafka does not answer.
    """
    if not group:
        raise ConfigError("a consumer group is required (--group)")
    if max_lag is not None and max_lag < 0:
        raise ConfigError(f"--max-lag must be >= 0, got {max_lag}")
    if max_retention_fraction is not None and max_retention_fraction <= 0:
        raise ConfigError(f"--max-retention-fraction must be > 0, got {max_retention_fraction}")
    ops = KafkaOps(bootstrap or default_bootstrap(), timeout_s=timeout_s)
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


# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "lag",
        help="a consumer group's lag per partition, in messages and as a share of retention",
        description="Lag per partition from Kafka's group offsets; exits 1 above a threshold.",
    )
    p.add_argument("--group", required=True, help="consumer group id")
    p.add_argument(
        "--topic", action="append", default=[], help="topic (repeatable; default: the group's)"
    )
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers ($SPR_BOOTSTRAP)")
    p.add_argument("--max-lag", type=int, default=None, help="fail when a partition lags more")
    p.add_argument(
        "--max-retention-fraction",
        type=_fraction_or_none,
        default=DEFAULT_MAX_RETENTION_FRACTION,
        help="fail when the oldest unread message is older than this share of retention.ms "
        "(default 0.8; 'none' disables)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _fraction_or_none(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    report = measure_lag(
        args.group,
        topics=args.topic,
        bootstrap=args.bootstrap,
        max_lag=args.max_lag,
        max_retention_fraction=args.max_retention_fraction,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_table(report)
    return 1 if report.violations() else 0


def _print_table(report: LagReport) -> None:
    header = (
        "topic",
        "partition",
        "committed",
        "log_start",
        "end",
        "lag",
        "oldest_age_s",
        "of_retention",
    )
    rows = [header]
    for p in report.partitions:
        rows.append(
            (
                p.topic,
                str(p.partition),
                "-" if p.committed is None else str(p.committed),
                str(p.log_start),
                str(p.end),
                str(p.lag),
                "-" if p.oldest_age_s is None else f"{p.oldest_age_s:.1f}",
                "-" if p.retention_fraction is None else f"{p.retention_fraction:.1%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print(f"group {report.group}: total lag {report.total_lag}")
    for line in report.violations():
        print(f"over threshold: {line}")
