"""The routing stage's core (design §10): one ``consume()`` result re-keyed for output.

Twin of ``src/spr/_core/rekey.pxi``. Every data message of an assigned partition is
decoded with the canonical decoder; invalid ones are handed back with their reasons. An
event without a sequence takes its source offset (design §2), which orders it only
against events of the same source partition: the :class:`SourceTable` remembers which
source an entity's such events come from, and one from another source is handed back as
unorderable. Duplicates (the idempotency ring) are dropped. Every other event becomes an
output record: its partition key as the key, the :class:`CanonicalOutput` JSON as the
value, ``partition_for(key, output_partitions)`` as the partition, and the design's
headers. Pure computation: nothing blocks.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, MutableMapping
from typing import Any

import msgspec

from spr._core_py.decode import decode_with_sequence
from spr._core_py.fingerprints import event_fingerprint, fingerprint
from spr._core_py.ring import IdempotencyRing, SourceTable
from spr._core_py.routing import partition_for, partition_key
from spr._event import (
    DEFAULT_LIMITS,
    OUTPUT_ENCODER,
    CanonicalOutput,
    DecodeLimits,
    RekeyResult,
    reason_unorderable,
)
from spr.errors import InvalidEvent

__all__ = ["SCHEMA_VERSION", "rekey", "source_fingerprint"]

SCHEMA_VERSION = b"v2"


def source_fingerprint(topic: str, partition: int) -> int:
    """The :class:`SourceTable` value of one source partition (never 0)."""
    return fingerprint(f"{topic}\x00{partition}") or 1


def rekey(
    messages: Iterable[Any],
    ring: IdempotencyRing,
    sources: SourceTable | None,
    source_names: MutableMapping[int, str],
    now_ms: int,
    output_partitions: int,
    assigned: Container[tuple[str, int]] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> RekeyResult:
    """Re-key one ``consume()`` result; see :class:`RekeyResult` for what comes back.

    ``sources`` (None: no check) is consulted for events without a sequence;
    ``source_names`` maps its values to ``topic[partition]`` for the reasons, and is
    filled here. Messages of partitions not in ``assigned`` are skipped. Raises only on
    a bad argument.
    """
    if not 1 <= output_partitions <= 2**31 - 1:
        raise ValueError(
            f"output_partitions must be between 1 and 2**31-1, got {output_partitions}"
        )
    errors: list[Any] = []
    invalid: list[tuple[Any, str]] = []
    unorderable: list[tuple[Any, str]] = []
    records: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]] = []
    positions: dict[tuple[str, int], int] = {}
    counts: dict[tuple[str, int], int] = {}
    duplicates = 0
    consumed = 0
    for message in messages:
        if message.error() is not None:
            errors.append(message)
            continue
        topic = message.topic()
        partition = message.partition()
        where = (topic, partition)
        if assigned is not None and where not in assigned:
            continue
        counts[where] = counts.get(where, 0) + 1
        consumed += 1
        offset = message.offset()
        positions[where] = offset + 1
        value = message.value()
        try:
            event, given = decode_with_sequence(
                value, offset=offset, timestamp_ms=message.timestamp()[1], limits=limits
            )
        except InvalidEvent as exc:
            invalid.append((message, exc.reason))
            continue
        routing_key = f"{event.entity_type}:{event.entity_id}"
        if not given and sources is not None:
            source = source_fingerprint(topic, partition)
            source_names.setdefault(source, f"{topic}[{partition}]")
            earlier = sources.claim(fingerprint(routing_key), source, now_ms)
            if earlier:
                name = source_names.get(earlier, "another source partition")
                unorderable.append(
                    (message, reason_unorderable(routing_key, name, f"{topic}[{partition}]"))
                )
                continue
        fp = event_fingerprint(event.entity_type, event.entity_id, event.sequence)
        if ring.seen_or_add(fp, now_ms):
            duplicates += 1
            continue
        key = partition_key(routing_key)
        output = CanonicalOutput(
            event_id=event.event_id,
            entity_type=event.entity_type,
            entity_id=event.entity_id,
            sequence=event.sequence,
            state=event.state,
            timestamp=event.timestamp_ms if event.timestamp_ms >= 0 else None,
            payload=msgspec.Raw(value),
        )
        headers = [
            ("idempotency-key", f"{routing_key}:{event.sequence}".encode()),
            ("schema-version", SCHEMA_VERSION),
            ("spr-source-topic", topic.encode()),
            ("spr-source-partition", str(partition).encode()),
            ("spr-source-offset", str(offset).encode()),
        ]
        records.append(
            (
                key.encode("ascii"),
                OUTPUT_ENCODER.encode(output),
                partition_for(key, output_partitions),
                headers,
            )
        )
    return RekeyResult(
        errors, invalid, unorderable, duplicates, consumed, counts, records, positions
    )
