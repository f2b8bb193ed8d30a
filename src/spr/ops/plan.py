"""``spr plan``: how many partitions a topic needs for a target throughput.

The rule (:func:`plan_partitions`): one partition is consumed by at most one member of a
group, so a topic that must carry ``X`` events/s, where one partition sustains ``Y``
events/s, needs at least ``ceil(X / Y)`` partitions; spr recommends
``ceil(X * (1 + headroom) / Y)`` so that a traffic peak, a rebalance or a catch-up after
downtime does not start with a lag that never shrinks. The arithmetic is exact (fractions,
not floats), so 1000/100 with 20 % headroom is 12, not 13.

``--measure`` takes ``Y`` from a live measurement on the local stack
(:func:`measure_partition_throughput`): a temporary one-partition topic is filled with
synthetic events, then read back through spr's own path, serially (consume, decode,
:class:`spr.batch.Batch`, :meth:`spr.sink.postgres.PostgresSink.flush` into a temporary
table), and timed. The engine overlaps fetching and writing, so the measured ``Y`` is a
conservative (low) estimate and the plan errs towards more partitions. The measurement is
bounded (about 12 s at most) and removes its topic and tables. It writes
:data:`DEFAULT_MEASURE_EVENTS` events unless told otherwise (``--measure-events``; at least
:data:`MIN_MEASURE_EVENTS`); fewer events finish sooner but time more start-up noise.
Its Kafka clients are built by :mod:`spr.kafka.clients` from the user's connection
settings, so librdkafka's log lines stay quiet.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from confluent_kafka import KafkaException

# NewTopic is re-exported without __all__: mypy --strict flags it.
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from spr.batch import STATE_COLUMNS, Batch
from spr.config import TableMapping, connection_settings
from spr.decode import decode_batch
from spr.errors import ConfigError, ServerUnavailable
from spr.kafka import clients

__all__ = [
    "DEFAULT_HEADROOM",
    "DEFAULT_MEASURE_EVENTS",
    "MIN_MEASURE_EVENTS",
    "Measurement",
    "PartitionPlan",
    "check_measure_events",
    "measure_partition_throughput",
    "plan_partitions",
]

DEFAULT_HEADROOM = 0.3
_MAX_HEADROOM = 10.0
#: Events ``--measure`` writes and reads back by default, and the fewest it accepts.
DEFAULT_MEASURE_EVENTS = 200_000
MIN_MEASURE_EVENTS = 1_000


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """What ``--measure`` observed: ``events`` read, decoded and flushed in ``seconds``."""

    events: int
    seconds: float
    flushes: int
    produce_seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class PartitionPlan:
    """The answer of :func:`plan_partitions`, with the reasoning as sentences."""

    target_throughput: float
    partition_throughput: float
    headroom: float
    minimum_partitions: int
    partitions: int
    measurement: Measurement | None = None
    reasoning: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reasoning"] = list(self.reasoning)
        if self.measurement is not None:
            data["measurement"]["events_per_second"] = self.measurement.events_per_second
        return data


def _exact(value: float) -> Fraction:
    # Via the shortest repr, so 0.3 means 3/10 and not the binary float's neighbour.
    return Fraction(repr(float(value)))


def plan_partitions(
    target_throughput: float,
    partition_throughput: float,
    *,
    headroom: float = DEFAULT_HEADROOM,
    measurement: Measurement | None = None,
) -> PartitionPlan:
    """Partitions for ``target_throughput`` events/s when one partition sustains
    ``partition_throughput`` events/s: ``ceil(X * (1 + headroom) / Y)``, at least 1.

    Pure arithmetic; raises ConfigError for a non-positive throughput or a headroom
    outside [0, 10].
    """
    for name, value in (
        ("target throughput", target_throughput),
        ("partition throughput", partition_throughput),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"the {name} must be a positive number of events/s, got {value!r}")
    if not (isinstance(headroom, (int, float)) and 0 <= headroom <= _MAX_HEADROOM):
        raise ConfigError(f"headroom must be between 0 and {_MAX_HEADROOM:g}, got {headroom!r}")
    x, y, h = _exact(target_throughput), _exact(partition_throughput), _exact(headroom)
    minimum = max(1, math.ceil(x / y))
    partitions = max(minimum, math.ceil(x * (1 + h) / y))
    reasoning = [
        f"one partition sustains {partition_throughput:,.0f} events/s"
        + (" (measured)" if measurement is not None else " (given)"),
        f"{target_throughput:,.0f} / {partition_throughput:,.0f} = "
        f"{float(x / y):,.2f} -> at least {minimum} partition(s)",
        f"with {float(h):.0%} headroom: {target_throughput:,.0f} x {float(1 + h):g} / "
        f"{partition_throughput:,.0f} = {float(x * (1 + h) / y):,.2f} -> {partitions} partition(s)",
        f"{partitions} partitions carry up to {float(partitions * y):,.0f} events/s and let up "
        f"to {partitions} consumers of one group work in parallel",
        "partitions can be added but never removed, and adding them moves keys to other "
        "partitions (murmur2 % n changes), which breaks per-entity ordering while old "
        "events drain: size for the peak now",
    ]
    if measurement is not None:
        reasoning.insert(
            1,
            f"measured: {measurement.events:,} events consumed, decoded and flushed to "
            f"PostgreSQL in {measurement.seconds:.2f} s on one partition, serially (the "
            "engine overlaps fetch and write, so this is conservative)",
        )
    return PartitionPlan(
        target_throughput=float(target_throughput),
        partition_throughput=float(partition_throughput),
        headroom=float(headroom),
        minimum_partitions=minimum,
        partitions=partitions,
        measurement=measurement,
        reasoning=tuple(reasoning),
    )


# ----------------------------------------------------------------------- measuring


def check_measure_events(events: int) -> None:
    """ConfigError unless ``events`` is a usable size for ``--measure``."""
    if isinstance(events, bool) or not isinstance(events, int) or events < MIN_MEASURE_EVENTS:
        raise ConfigError(
            f"--measure-events must be at least {MIN_MEASURE_EVENTS:,}, got {events!r}"
        )


def measure_partition_throughput(
    *,
    bootstrap: str,
    dsn: str,
    events: int = DEFAULT_MEASURE_EVENTS,
    produce_budget_s: float = 4.0,
    consume_budget_s: float = 8.0,
    kafka: Mapping[str, Any] | None = None,
) -> Measurement:
    """Time spr's consume, decode, batch and flush path on one partition of a temporary
    topic of ``events`` synthetic events. ``kafka`` holds librdkafka settings whose
    connection part (security protocol, SASL, SSL) every client uses. Blocks for at most
    about ``produce_budget_s + consume_budget_s`` plus setup; cleans up its topic and
    tables. Raises ConfigError for fewer than :data:`MIN_MEASURE_EVENTS` events,
    ServerUnavailable when Kafka or PostgreSQL does not answer."""
    from spr.sink.postgres import PostgresSink  # the sink pulls in psycopg; only here

    check_measure_events(events)
    suffix = uuid.uuid4().hex[:10]
    topic = f"spr-plan-{suffix}"
    mapping = TableMapping(table=f"spr_plan_{suffix}", offsets_table=f"spr_plan_{suffix}_offsets")
    connection = {**connection_settings(kafka or {}), "bootstrap.servers": bootstrap}
    admin = clients.admin_client({**connection, "socket.timeout.ms": 10_000})
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1)])[
            topic
        ].result(timeout=15)
    except KafkaException as exc:
        raise ServerUnavailable(f"cannot create a topic on Kafka at {bootstrap}: {exc}") from exc
    except TimeoutError as exc:
        raise ServerUnavailable(f"Kafka at {bootstrap} did not answer within 15 s") from exc
    sink = PostgresSink(dsn, group_id=f"spr-plan-{suffix}", mapping=mapping)
    try:
        sink.init_schema()
        produced, produce_s = _produce_synthetic(connection, topic, events, produce_budget_s)
        consumed, seconds, flushes = _consume_and_flush(
            connection, topic, sink, produced, consume_budget_s
        )
    finally:
        _drop_tables(sink, mapping)
        sink.close()
        # Cleanup must not hide the measurement's own error.
        with contextlib.suppress(Exception):
            admin.delete_topics([topic])[topic].result(timeout=15)
    if consumed == 0:
        raise ServerUnavailable(f"no events came back from the temporary topic {topic}")
    return Measurement(events=consumed, seconds=seconds, flushes=flushes, produce_seconds=produce_s)


def _produce_synthetic(
    connection: Mapping[str, Any], topic: str, events: int, budget_s: float
) -> tuple[int, float]:
    # Design §3's producer settings; synthetic orders, each entity updated four times
    # far apart, so a batch holds one row per event (no collapsing flatters the result)
    # and the merge sees both inserts and updates.
    bootstrap = connection["bootstrap.servers"]
    producer = clients.producer(
        {
            **connection,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 5,
        }
    )
    entities = max(1, events // 4)
    now_ms = int(time.time() * 1000)
    start = time.monotonic()
    deadline = start + budget_s
    sent = 0
    for i in range(events):
        value = (
            f'{{"event_id":"e{i}","entity_type":"order","entity_id":"o{i % entities}",'
            f'"sequence":{i // entities},"state":"s{i // entities}","timestamp":{now_ms},'
            f'"amount":{i % 997}}}'
        ).encode()
        while True:
            try:
                producer.produce(topic, value, key=f"o{i % entities}".encode())
                break
            except BufferError:
                producer.poll(0.05)
        sent += 1
        if i % 5000 == 0:
            producer.poll(0)
            if time.monotonic() > deadline:
                break
    remaining = producer.flush(max(1.0, deadline - time.monotonic() + 2.0))
    if remaining:
        raise ServerUnavailable(f"Kafka at {bootstrap} did not take {remaining} synthetic events")
    return sent, time.monotonic() - start


def _consume_and_flush(
    connection: Mapping[str, Any], topic: str, sink: Any, expected: int, budget_s: float
) -> tuple[int, float, int]:
    consumer = clients.consumer(
        {
            **connection,
            "group.id": f"spr-plan-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.max.bytes": 10_485_760,
            "max.partition.fetch.bytes": 1_048_576,
            "fetch.queue.backoff.ms": 10,
        }
    )
    batch = Batch(columns=STATE_COLUMNS)
    max_rows = 5_000  # BatchPolicy's default
    consumed = flushes = 0
    try:
        consumer.assign([clients.topic_partition(topic, 0, 0)])
        start = time.monotonic()
        deadline = start + budget_s
        while consumed < expected and time.monotonic() < deadline:
            messages = consumer.consume(num_messages=2_000, timeout=0.2)
            data = [m for m in messages if m.error() is None]
            if not data:
                continue
            # A fetched message always has an offset; -1 only satisfies the type.
            offsets = [o if (o := m.offset()) is not None else -1 for m in data]
            decoded, _invalid = decode_batch(
                [m.value() for m in data], offsets, [m.timestamp()[1] for m in data]
            )
            for offset, event in zip(offsets, decoded, strict=True):
                if event is None:
                    batch.advance(topic, 0, offset)
                else:
                    batch.add(event, topic, 0, offset)
            consumed += len(data)
            if batch.row_count >= max_rows:
                sink.flush(batch)
                batch.clear()
                flushes += 1
        if batch.row_count or batch.next_offsets():
            sink.flush(batch)
            flushes += 1
        seconds = time.monotonic() - start
    finally:
        consumer.close()
    return consumed, seconds, flushes


def _drop_tables(sink: Any, mapping: TableMapping) -> None:
    from psycopg import sql

    try:
        conn = sink.connect()
        for name in (mapping.table, mapping.offsets_table, mapping.gaps_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    except Exception:  # cleanup must not hide the measurement's own error
        pass
