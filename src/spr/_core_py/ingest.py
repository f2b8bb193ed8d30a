"""The fused ingest (design §3, §4): one ``consume()`` result into a batch.

Twin of ``src/spr/_core/ingest.pxi``. The rules are in the docstring of
:meth:`spr._core_py.Batch.ingest`, which calls :func:`_ingest`; this twin does the same
steps through the public pieces (``decode_event``, the key check, ``seen_or_add``,
``Batch.add``) one message at a time. Pure computation: nothing blocks.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any, Protocol

from spr._core_py.decode import decode_event
from spr._core_py.fingerprints import event_fingerprint
from spr._core_py.keycheck import check_key
from spr._core_py.ring import IdempotencyRing
from spr._event import DecodeLimits, Event, IngestResult
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
) -> IngestResult:
    # The body of Batch.ingest (batch.py), which documents it.
    errors: list[Any] = []
    invalid: list[tuple[Any, str]] = []
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
            event = decode_event(
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
        fp = event_fingerprint(event.entity_type, event.entity_id, event.sequence)
        if ring.seen_or_add(fp, now_ms):
            duplicates += 1
            batch.advance(topic, partition, offset)
            continue
        batch.add(event, topic, partition, offset)
    return IngestResult(errors, invalid, duplicates, consumed, counts)
