"""The binary COPY encoder (design §4): buffered rows as ``COPY ... FROM STDIN (FORMAT
binary)`` data.

Twin of ``src/spr/_core/copy.pxi``: the same bytes for the same rows and columns. A row
here is the ``(event, topic, partition, offset)`` tuple that :class:`Batch` keeps.
Pure computation: nothing blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from spr._event import MAX_TIMESTAMP_MS, Event

_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, PostgreSQL's binary epoch
COPY_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_BINARY_TRAILER = b"\xff\xff"
_NULL_FIELD = b"\xff\xff\xff\xff"
_pack_i16 = struct.Struct(">h").pack
_pack_text_len = struct.Struct(">i").pack
_pack_int8_field = struct.Struct(">iq").pack
_pack_int4_field = struct.Struct(">ii").pack


def _event_ts_valid(timestamp_ms: int) -> bool:
    return 0 <= timestamp_ms <= MAX_TIMESTAMP_MS


def _text_field(text: str) -> bytes:
    data = text.encode("utf-8")
    return _pack_text_len(len(data)) + data


def _binary_field(column: str, event: Event, topic: str, partition: int, offset: int) -> bytes:
    if column == "entity_type":
        return _text_field(event.entity_type)
    if column == "entity_id":
        return _text_field(event.entity_id)
    if column == "sequence":
        return _pack_int8_field(8, event.sequence)
    if column == "state":
        return _text_field(event.state)
    if column == "event_id":
        return _text_field(event.event_id)
    if column == "payload":
        return _pack_text_len(len(event.payload) + 1) + b"\x01" + event.payload
    if column == "event_ts":
        ts = event.timestamp_ms
        if not _event_ts_valid(ts):
            return _NULL_FIELD
        return _pack_int8_field(8, (ts - _PG_EPOCH_MS) * 1000)
    if column == "kafka_topic":
        return _text_field(topic)
    if column == "kafka_partition":
        return _pack_int4_field(4, partition)
    return _pack_int8_field(8, offset)  # kafka_offset


Row = tuple[Event, str, int, int]


def _copy_data(rows: Sequence[Row], columns: Sequence[str]) -> bytes:
    # Batch.copy_data: header, one tuple per row in ``columns`` order, trailer.
    count = _pack_i16(len(columns))
    parts = [COPY_BINARY_HEADER]
    for event, topic, partition, offset in rows:
        parts.append(count)
        parts.extend(_binary_field(c, event, topic, partition, offset) for c in columns)
    parts.append(COPY_BINARY_TRAILER)
    return b"".join(parts)


def _copy_chunks(rows: Sequence[Row], columns: Sequence[str], chunk_bytes: int) -> Iterator[bytes]:
    # Batch.copy_chunks: the same stream, cut after whole rows. Being a generator, it
    # checks chunk_bytes on the first next(), as the compiled core does.
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    count = _pack_i16(len(columns))
    parts = [COPY_BINARY_HEADER]
    size = 0
    for event, topic, partition, offset in rows:
        row = count + b"".join(_binary_field(c, event, topic, partition, offset) for c in columns)
        if size and size + len(row) > chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(row)
        size += len(row)
    parts.append(COPY_BINARY_TRAILER)
    yield b"".join(parts)
