"""The fused ingest (design §3, §4): one ``consume()`` result into a batch.

Twin of ``src/spr/_core/ingest.pxi``. The rules are in the docstring of
:meth:`spr._core_py.Batch.ingest`, which calls :func:`_ingest`; this twin does the same
steps through the public pieces (``decode_event``, the key check, ``seen_or_add``,
``Batch.add``) one message at a time. Pure computation: nothing blocks.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any, Protocol

from spr._core_py.decode import decode_with_sequence
from spr._core_py.fingerprints import event_fingerprint
from spr._core_py.keycheck import check_key
from spr._core_py.ring import IdempotencyRing
from spr._core_py.routing import partition_for, partition_key
from spr._event import (
    MISROUTED_APPLY,
    MISROUTED_BY_SEQUENCE,
    REASON_MISROUTED_HELD,
    REASON_MISROUTED_NO_SEQUENCE,
    DecodeLimits,
    Event,
    IngestResult,
    reason_misrouted,
)
from spr.errors import InvalidEvent


class _BatchLike(Protocol):
    # What _ingest uses of a Batch; a Protocol, so that this module does not import
    # batch.py, which imports it.
    def add(self, event: Event, topic: str, partition: int, offset: int) -> None: ...

    def advance(self, topic: str, partition: int, offset: int) -> None: ...


def _ingest(
    batch: _BatchLike,
    messages: Iterable[Any],
    ring: IdempotencyRing,
    now_ms: int,
    assigned: Container[tuple[str, int]] | None,
    limits: DecodeLimits,
    check_keys: bool,
    partitions: Mapping[str, int] | None = None,
    on_misrouted: int = MISROUTED_BY_SEQUENCE,
) -> IngestResult:
    # The body of Batch.ingest (batch.py), which documents it.
    errors: list[Any] = []
    invalid: list[tuple[Any, str]] = []
    held: list[tuple[Any, str]] = []
    misrouted: dict[str, int] = {}
    counts: dict[tuple[str, int], int] = {}
    duplicates = 0
    consumed = 0
    for message in messages:
        if message.error() is not None:
            errors.append(message)
            continue
        topic = message.topic()
        partition = message.partition()
        if assigned is not None and (topic, partition) not in assigned:
            continue
        counts[(topic, partition)] = counts.get((topic, partition), 0) + 1
        consumed += 1
        offset = message.offset()
        try:
            event, given = decode_with_sequence(
                message.value(),
                offset=offset,
                timestamp_ms=message.timestamp()[1],
                limits=limits,
            )
            if check_keys:
                check_key(message.key(), event)
        except InvalidEvent as exc:
            invalid.append((message, exc.reason))
            batch.advance(topic, partition, offset)
            continue
        count = partitions.get(topic) if partitions is not None else None
        if count:
            routing_key = f"{event.entity_type}:{event.entity_id}"
            key = partition_key(routing_key)
            expected = partition_for(key, count)
            if expected != partition:
                misrouted[topic] = misrouted.get(topic, 0) + 1
                if on_misrouted != MISROUTED_APPLY and not (
                    given and on_misrouted == MISROUTED_BY_SEQUENCE
                ):
                    why = REASON_MISROUTED_HELD if given else REASON_MISROUTED_NO_SEQUENCE
                    reason = reason_misrouted(
                        topic, partition, routing_key, key, expected, count, why
                    )
                    held.append((message, reason))
                    batch.advance(topic, partition, offset)
                    continue
        fp = event_fingerprint(event.entity_type, event.entity_id, event.sequence)
        if ring.seen_or_add(fp, now_ms):
            duplicates += 1
            batch.advance(topic, partition, offset)
            continue
        batch.add(event, topic, partition, offset)
    return IngestResult(errors, invalid, duplicates, consumed, counts, misrouted, held)
