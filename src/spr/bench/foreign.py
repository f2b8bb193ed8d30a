"""The transform scenario's workload: events the way foreign producers write them, and
the check of an output topic against them.

Every entity belongs to one producing service, chosen by its type, and each service
writes its own shape (design §2 aliases; the field report's producers):

=========  ==============================================================  ==========
type       fields                                                          sequence
=========  ==============================================================  ==========
order      ``event_type, entity_id, state, timestamp`` (the Go producer)   none
payment    ``eventId, entityType, entityId, seq, status, ts`` (kafkajs)    ``seq``
shipment   ``id, type, entityId, seq, status, ts``                         ``seq``
invoice    the canonical names (a librdkafka service)                      ``sequence``
=========  ==============================================================  ==========

Every message is keyed by the bare entity id (not spr's partition key) and placed by
librdkafka's default partitioner (``consistent_random``: CRC32 of the key), so an
entity stays on one source partition, in order, but on the wrong partition for spr.
Each value carries ``"ref": n``, its position in the generated stream (0 .. count-1),
which the output keeps (spr's canonical ``payload`` is the original value; the other
contenders copy or embed it): that is how an output record is traced to its source
event, whoever wrote it. There are no duplicates: every source event must appear in
the output exactly once.

:func:`produce_foreign` sends a :class:`ForeignSpec` (optionally at a steady rate,
recording every event's broker append time); :func:`verify_output` reads an output topic
with ``read_committed`` and checks it. Both block on Kafka.
"""

from __future__ import annotations

import random
import re
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from spr.errors import ConfigError, ServerUnavailable

__all__ = [
    "REF",
    "SHAPES",
    "Expected",
    "ForeignProduced",
    "ForeignSpec",
    "generate",
    "produce_foreign",
    "ref_of",
    "verify_output",
]

#: Where an output record names its source event (spr's compact JSON and orjson alike).
REF = re.compile(rb'"ref":\s*(\d+)')

_STATES = ("created", "pending", "authorized", "captured", "packed", "shipped", "delivered")
_BASE_TIMESTAMP_MS = 1_700_000_000_000
_FILLER = "foreign producer payload, field names of its own, keyed its own way " * 64
_TAIL = ',"amount":%d.%02d,"note":"%s"}'

#: (entity type, value template before the tail, carries a sequence) per service.
SHAPES: tuple[tuple[str, str, bool], ...] = (
    ("order", '{"event_type":"order","entity_id":"%s","state":"%s","timestamp":%d,"ref":%d',
     False),
    ("payment", '{"eventId":"%s","entityType":"payment","entityId":"%s","seq":%d,'
     '"status":"%s","ts":%d,"ref":%d', True),
    ("shipment", '{"id":"%s","type":"shipment","entityId":"%s","seq":%d,"status":"%s",'
     '"ts":%d,"ref":%d', True),
    ("invoice", '{"event_id":"%s","entity_type":"invoice","entity_id":"%s","sequence":%d,'
     '"state":"%s","timestamp":%d,"ref":%d', True),
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ForeignSpec:
    """``count`` events over ``entities`` entities, each value about ``value_size`` bytes;
    the same spec gives the same events."""

    count: int
    entities: int = 100_000
    seed: int = 0
    value_size: int = 200

    def __post_init__(self) -> None:
        if self.count < 1 or self.entities < 1:
            raise ConfigError("the transform workload needs at least one event and entity")


def _entity_id(entity: int) -> str:
    return f"{entity:08d}"


def generate(spec: ForeignSpec) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield ``(entity, key, value)`` for refs 0 .. count-1, deterministically."""
    rng = random.Random(spec.seed)
    next_sequence = [1] * spec.entities
    shapes = len(SHAPES)
    filled = []
    for _, head, sequenced in SHAPES:
        # The note pads a typical value to value_size bytes (numbers vary in width).
        sample: tuple[Any, ...] = ("00000000", "authorized", _BASE_TIMESTAMP_MS, 100_000)
        if sequenced:
            sample = ("evt-0-000000000", "00000000", 10, *sample[1:])
        pad = max(0, spec.value_size - len((head + _TAIL) % (*sample, 1000, 0, "")))
        filled.append(head + _TAIL.replace("%s", _FILLER[:pad].replace("%", "%%"), 1))
    entities = spec.entities
    for ref in range(spec.count):
        entity = int(rng.random() * entities)
        shape = entity % shapes
        entity_id = _entity_id(entity)
        sequence = next_sequence[entity]
        next_sequence[entity] = sequence + 1
        state = _STATES[(sequence - 1) % len(_STATES)]
        stamp = _BASE_TIMESTAMP_MS + ref
        amount = (ref * 7919 + entity * 104729) % 1_000_000
        if SHAPES[shape][2]:
            event_id = f"evt-{spec.seed:x}-{ref:09d}"
            fields: tuple[Any, ...] = (event_id, entity_id, sequence, state, stamp, ref)
        else:
            fields = (entity_id, state, stamp, ref)
        value = filled[shape] % (*fields, amount // 100, amount % 100)
        yield entity, entity_id.encode(), value.encode()


class Expected:
    """What the output must hold: the entity of every ref, and per entity its source
    key, spr's partition key and ``partition_for`` that key."""

    def __init__(self, entities: int, partitions: int) -> None:
        self.entity_of = array("I")
        self.entities = entities
        self.partitions = partitions
        self._spr: tuple[list[bytes], list[int]] | None = None

    def __len__(self) -> int:
        return len(self.entity_of)

    def source_keys(self) -> list[bytes]:
        return [_entity_id(e).encode() for e in range(self.entities)]

    def spr_routing(self) -> tuple[list[bytes], list[int]]:
        """(partition key, output partition) per entity, as spr computes them."""
        if self._spr is None:
            from spr.routing import route_many

            names = [f"{SHAPES[e % len(SHAPES)][0]}:{_entity_id(e)}" for e in range(self.entities)]
            keys, partitions = route_many(names, self.partitions)
            self._spr = ([k.encode("ascii") for k in keys], partitions)
        return self._spr


@dataclass(frozen=True, kw_only=True)
class ForeignProduced:
    """What :func:`produce_foreign` did; ``append_ms[ref]`` is the broker's append time
    of each event when asked for (-1 where unknown)."""

    events: int
    errors: int
    first_error: str
    seconds: float
    events_per_s: float
    expected: Expected
    append_ms: array[int] | None


def produce_foreign(
    spec: ForeignSpec,
    *,
    topic: str,
    bootstrap: str,
    partitions: int,
    rate: float | None = None,
    append_times: bool = False,
) -> ForeignProduced:
    """Send ``spec`` to ``topic`` (which exists) with a plain librdkafka producer and its
    default partitioner; ``rate`` caps events/s. Blocks until every event is acknowledged
    or failed. Raises ServerUnavailable when nothing could be sent."""
    from confluent_kafka import Producer

    expected = Expected(spec.entities, partitions)
    stamps = array("q", [-1]) * spec.count if append_times else None
    failed = [0]
    first_error = [""]

    def delivered(err: Any, message: Any) -> None:
        if err is not None:
            if not failed[0]:
                first_error[0] = str(err)
            failed[0] += 1
        elif stamps is not None:
            found = REF.search(message.value())
            if found is not None:
                stamps[int(found.group(1))] = message.timestamp()[1]

    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,  # keeps each entity's order through retries
        "compression.type": "lz4",
        "linger.ms": 1 if rate is not None else 20,
        "queue.buffering.max.messages": 500_000,
        "on_delivery": delivered,
        "log_level": 3,
    }
    if stamps is None:
        conf["delivery.report.only.error"] = True
    producer = Producer(conf)
    entity_of = expected.entity_of
    produce = producer.produce
    started = time.monotonic()
    step = max(1, min(1000, int(rate / 100))) if rate is not None else 1000
    for ref, (entity, key, value) in enumerate(generate(spec)):
        entity_of.append(entity)
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        if ref % step == 0:
            producer.poll(0)
            if rate is not None:
                ahead = started + ref / rate - time.monotonic()
                while ahead > 0:
                    producer.poll(ahead)
                    ahead = started + ref / rate - time.monotonic()
    left = producer.flush(60)
    seconds = max(time.monotonic() - started, 1e-9)
    errors = failed[0] + left
    if errors >= spec.count:
        raise ServerUnavailable(f"no event reached {topic} at {bootstrap}: {first_error[0]}")
    return ForeignProduced(
        events=spec.count,
        errors=errors,
        first_error=first_error[0],
        seconds=round(seconds, 3),
        events_per_s=round(spec.count / seconds, 1),
        expected=expected,
        append_ms=stamps,
    )


def ref_of(value: bytes | None) -> int | None:
    """The source ref an output value carries, or None."""
    if not value:
        return None
    found = REF.search(value)
    return None if found is None else int(found.group(1))


def verify_output(
    *,
    bootstrap: str,
    topic: str,
    partitions: int,
    expected: Expected,
    keys: Sequence[bytes],
    placement: Sequence[int] | None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Read all of ``topic`` with ``read_committed`` and check it against ``expected``:
    every ref exactly once (``missing``, ``duplicated``, ``unexpected``, ``unreadable``),
    keyed ``keys[entity]`` (``wrong_key``), on ``placement[entity]`` when given
    (``wrong_partition``), and each entity's events in source order (``out_of_order``).
    ``ok`` when all of them are 0."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    total = len(expected)
    entity_of = expected.entity_of
    seen = bytearray(total)
    last = array("q", [-1]) * expected.entities
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "spr-bench-verify",
         "isolation.level": "read_committed", "enable.auto.commit": False,
         "enable.partition.eof": True, "fetch.max.bytes": 16 * 2**20,
         "max.partition.fetch.bytes": 4 * 2**20, "log_level": 0}
    )  # fmt: skip
    consumer.assign([TopicPartition(topic, p, -2) for p in range(partitions)])
    remaining = set(range(partitions))
    deadline = time.monotonic() + timeout_s
    search = REF.search
    eof = KafkaError._PARTITION_EOF
    records = duplicated = unexpected = unreadable = wrong_key = wrong_partition = disorder = 0
    try:
        while remaining and time.monotonic() < deadline:
            for m in consumer.consume(10_000, 0.5):
                error = m.error()
                if error is not None:
                    if error.code() == eof:
                        remaining.discard(m.partition())
                    continue
                records += 1
                value = m.value()
                found = search(value) if value else None
                if found is None:
                    unreadable += 1
                    continue
                ref = int(found.group(1))
                if ref >= total:
                    unexpected += 1
                    continue
                if seen[ref]:
                    duplicated += 1
                    continue
                seen[ref] = 1
                entity = entity_of[ref]
                if m.key() != keys[entity]:
                    wrong_key += 1
                if placement is not None and m.partition() != placement[entity]:
                    wrong_partition += 1
                if ref < last[entity]:
                    disorder += 1
                else:
                    last[entity] = ref
    finally:
        consumer.close()
    result: dict[str, Any] = {
        "expected": total, "records": records, "missing": seen.count(0),
        "duplicated": duplicated, "unexpected": unexpected, "unreadable": unreadable,
        "wrong_key": wrong_key, "wrong_partition": wrong_partition, "out_of_order": disorder,
        "unread_partitions": sorted(remaining),
    }  # fmt: skip
    result["ok"] = not remaining and not any(
        result[k] for k in ("missing", "duplicated", "unexpected", "unreadable", "wrong_key",
                            "wrong_partition", "out_of_order")
    )  # fmt: skip
    return result
