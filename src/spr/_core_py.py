"""Pure-Python reference implementation of spr's per-event core.

This module defines the semantics; ``spr._core`` (Cython) mirrors every public name
here and must give the same results. Nothing in it reads a clock: time enters only as
``now_ms`` arguments.
"""

from __future__ import annotations

import hashlib
import re
import struct
from array import array
from collections.abc import Container, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from typing import Any

import msgspec
import xxhash

from spr._event import (
    CANONICAL_DECODER,
    CANONICAL_PREFIXES,
    DEFAULT_LIMITS,
    EXPECT_SEQUENCE,
    EXPECT_STRING,
    EXPECT_TIMESTAMP,
    MAX_INT64,
    MAX_TIMESTAMP_MS,
    RAW_DECODER,
    REASON_BOM,
    REASON_EMPTY,
    REASON_EMPTY_ID,
    REASON_EMPTY_STATE,
    REASON_EMPTY_TYPE,
    REASON_MISSING_ID,
    REASON_MISSING_STATE,
    REASON_MISSING_TYPE,
    REASON_NOT_BYTES,
    REASON_NOT_UTF8,
    REASON_NULL,
    STATE_COLUMNS,
    UTF8_BOM,
    DecodeLimits,
    Event,
    IngestResult,
    RawEvent,
    reason_alias_type,
    reason_from_msgspec,
    reason_key_mismatch,
    reason_key_missing,
    reason_too_big,
    reason_too_deep,
)
from spr.errors import ConfigError, InvalidEvent

__all__ = [
    "PROBE_WINDOW",
    "ZERO_FINGERPRINT_SUBSTITUTE",
    "Batch",
    "IdempotencyRing",
    "decode_batch",
    "decode_event",
    "event_fingerprint",
    "fingerprint",
    "murmur2",
    "partition_for",
    "partition_key",
    "route_many",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------------------- routing


def partition_key(routing_key: str) -> str:
    """First 8 bytes of SHA-256 of the UTF-8 routing key, as 16 lowercase hex chars."""
    return hashlib.sha256(routing_key.encode("utf-8")).digest()[:8].hex()


_MURMUR_M = 0x5BD1E995
_MURMUR_SEED = 0x9747B28C


def murmur2(data: bytes) -> int:
    """Kafka's Java ``Utils.murmur2`` of ``data``: a signed 32-bit int, as Java returns it."""
    length = len(data)
    m = _MURMUR_M
    h = (_MURMUR_SEED ^ length) & _MASK32
    whole = length & ~3
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * m) & _MASK32
        k ^= k >> 24
        k = (k * m) & _MASK32
        h = ((h * m) & _MASK32) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * m) & _MASK32
    h ^= h >> 13
    h = (h * m) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def _check_partitions(num_partitions: int) -> None:
    if not 0 < num_partitions <= _INT32_MAX:
        raise ValueError(f"num_partitions must be between 1 and 2**31-1, got {num_partitions}")


_INT32_MAX = 2**31 - 1


def partition_for(key: str | bytes, num_partitions: int) -> int:
    """The Java client's partition for a message key: ``(murmur2 & 0x7fffffff) % n``."""
    _check_partitions(num_partitions)
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return (murmur2(data) & 0x7FFFFFFF) % num_partitions


def route_many(routing_keys: Sequence[str], num_partitions: int) -> tuple[list[str], list[int]]:
    """Partition keys and partitions for many routing keys, aligned with the input."""
    _check_partitions(num_partitions)
    keys: list[str] = []
    partitions: list[int] = []
    for routing_key in routing_keys:
        key = partition_key(routing_key)
        keys.append(key)
        partitions.append((murmur2(key.encode("ascii")) & 0x7FFFFFFF) % num_partitions)
    return keys, partitions


# ---------------------------------------------------------------------- idempotency


def fingerprint(idempotency_key: str | bytes) -> int:
    """XXH64 (seed 0) of the UTF-8 idempotency key, as an unsigned 64-bit int."""
    data = idempotency_key.encode("utf-8") if isinstance(idempotency_key, str) else idempotency_key
    return int(xxhash.xxh64_intdigest(data))


def event_fingerprint(entity_type: str, entity_id: str, sequence: int) -> int:
    """Fingerprint of the idempotency key ``entity_type:entity_id:sequence``."""
    return fingerprint(f"{entity_type}:{entity_id}:{sequence}")


# Slots examined per lookup: a fingerprint lives in one of the PROBE_WINDOW slots that
# follow its home slot (wrapping around the end of the table).
PROBE_WINDOW = 8
# Fingerprint 0 marks an empty slot, so a real 0 is stored as this constant instead
# (the two then collide, which is one more 2**-64 chance, like any other pair).
ZERO_FINGERPRINT_SUBSTITUTE = 0x9E3779B97F4A7C15


def _home_slot(fp: int, capacity: int) -> int:
    # murmur3's 64-bit finalizer spreads small or patterned fingerprints over the table;
    # the multiply-shift maps the mixed value onto [0, capacity) without a division.
    fp ^= fp >> 33
    fp = (fp * 0xFF51AFD7ED558CCD) & _MASK64
    fp ^= fp >> 33
    fp = (fp * 0xC4CEB9FE1A85EC53) & _MASK64
    fp ^= fp >> 33
    return (fp * capacity) >> 64


def _check_fingerprint(fp: int) -> int:
    if not 0 <= fp <= _MASK64:
        raise OverflowError(f"fingerprint must be an unsigned 64-bit int, got {fp}")
    return fp or ZERO_FINGERPRINT_SUBSTITUTE


def _check_int64(value: int, name: str) -> None:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise OverflowError(f"{name} must fit in a signed 64-bit int, got {value}")


class IdempotencyRing:
    """A fixed-size window of recently seen event fingerprints, with a time to live.

    The table is open-addressed: ``capacity`` slots, each a 64-bit fingerprint and the
    ``now_ms`` at which it was added (16 bytes a slot, allocated once). A fingerprint
    lives in one of the ``PROBE_WINDOW`` slots from its home slot on, so an operation
    touches at most that many slots and never allocates.

    An entry is live while ``|now_ms - added_ms| < ttl_ms``. The window is symmetric so
    that a clock stepping back a little keeps recent entries, while one stepping far
    (either way) expires them: no entry outlives ``ttl_ms`` of distance from the clock,
    so nothing becomes immortal.

    When every slot of the window holds a live entry, the entry with the smallest added
    time is overwritten (an *eviction*). The ring may therefore forget a fingerprint
    early, letting a duplicate through (the database's sequence guard still stops it);
    it never reports a fingerprint it was not given, except by a 64-bit collision.
    A hit does not refresh an entry's time. Not thread-safe.
    """

    __slots__ = (
        "_capacity",
        "_evictions",
        "_fingerprints",
        "_hits",
        "_last_now_ms",
        "_lookups",
        "_times",
        "_ttl_ms",
        "_window",
    )

    def __init__(self, capacity: int, ttl_ms: int) -> None:
        if not 0 < capacity <= 2**40:
            raise ConfigError(f"ring capacity must be between 1 and 2**40, got {capacity}")
        if not 0 < ttl_ms <= _INT64_MAX:
            raise ConfigError(f"ring ttl_ms must be a positive 64-bit int, got {ttl_ms}")
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self._window = min(PROBE_WINDOW, capacity)
        self._fingerprints = array("Q", bytes(8 * capacity))
        self._times = array("q", bytes(8 * capacity))
        self._lookups = 0
        self._hits = 0
        self._evictions = 0
        self._last_now_ms = 0

    @property
    def capacity(self) -> int:
        """Number of slots (the most fingerprints the ring can hold)."""
        return self._capacity

    @property
    def ttl_ms(self) -> int:
        """How long an entry stays live, in milliseconds of distance from ``now_ms``."""
        return self._ttl_ms

    @property
    def lookups(self) -> int:
        """Number of ``seen_or_add`` operations (single or batched) since creation."""
        return self._lookups

    @property
    def hits(self) -> int:
        """How many of those lookups found a live entry (reported a duplicate)."""
        return self._hits

    @property
    def evictions(self) -> int:
        """How many live entries were overwritten because their probe window was full."""
        return self._evictions

    def __len__(self) -> int:
        """Live entries as of the latest ``now_ms`` given; O(capacity)."""
        now = self._last_now_ms
        ttl = self._ttl_ms
        return sum(
            1
            for fp, t in zip(self._fingerprints, self._times, strict=True)
            if fp and abs(now - t) < ttl
        )

    def clear(self) -> None:
        """Forget every entry (the counters stay); use after a rolled-back flush."""
        capacity = self._capacity
        self._fingerprints = array("Q", bytes(8 * capacity))
        self._times = array("q", bytes(8 * capacity))

    def seen_or_add(self, fingerprint: int, now_ms: int) -> bool:
        """True if ``fingerprint`` is live in the ring; otherwise add it and return False."""
        fp = _check_fingerprint(fingerprint)
        _check_int64(now_ms, "now_ms")
        return self._seen_or_add(fp, now_ms)

    def seen_or_add_many(self, fingerprints: Iterable[int], now_ms: int) -> list[bool]:
        """``seen_or_add`` for each fingerprint in order (a list of ints or a uint64
        buffer such as ``array('Q')``), all at the same ``now_ms``."""
        _check_int64(now_ms, "now_ms")
        if isinstance(fingerprints, memoryview | bytes | bytearray):
            fingerprints = memoryview(fingerprints).cast("B").cast("Q")
        return [self._seen_or_add(_check_fingerprint(fp), now_ms) for fp in fingerprints]

    def _seen_or_add(self, fp: int, now: int) -> bool:
        self._lookups += 1
        self._last_now_ms = now
        fps = self._fingerprints
        times = self._times
        ttl = self._ttl_ms
        capacity = self._capacity
        slot = _home_slot(fp, capacity)
        victim = -1
        victim_kind = 3  # 0 empty, 1 expired, 2 oldest live, 3 none yet
        victim_time = 0
        for _ in range(self._window):
            stored = fps[slot]
            if stored == 0:
                if victim_kind > 1:
                    victim = slot
                    victim_kind = 0
                break
            t = times[slot]
            live = abs(now - t) < ttl
            if stored == fp:
                if live:
                    self._hits += 1
                    return True
                # Reuse the expired copy, so that a fingerprint has one slot at most.
                victim = slot
                victim_kind = 1
                break
            if live:
                if victim_kind == 3 or (victim_kind == 2 and t < victim_time):
                    victim = slot
                    victim_kind = 2
                    victim_time = t
            elif victim_kind > 1:
                victim = slot
                victim_kind = 1
            slot += 1
            if slot == capacity:
                slot = 0
        if victim_kind == 2:
            self._evictions += 1
        fps[victim] = fp
        times[victim] = now
        return False


# ---------------------------------------------------------------------------- decoding

# A string (possibly unterminated, possibly ending in a lone backslash) in JSON text.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET_DELTA = [0] * 256
_BRACKET_DELTA[ord("[")] = _BRACKET_DELTA[ord("{")] = 1
_BRACKET_DELTA[ord("]")] = _BRACKET_DELTA[ord("}")] = -1
_NOT_BRACKETS = bytes(b for b in range(256) if _BRACKET_DELTA[b] == 0)


def _too_deep(value: bytes, max_depth: int) -> bool:
    # Cheap bound first: the depth can't exceed the number of opening brackets.
    if value.count(b"[") + value.count(b"{") <= max_depth:
        return False
    brackets = _JSON_STRING.sub(b"", value).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_DELTA.__getitem__, brackets)), default=0) > max_depth


def decode_event(
    value: bytes | None,
    *,
    offset: int,
    timestamp_ms: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Event:
    """Decode one Kafka message value into the canonical :class:`Event`.

    Checks, in order: not null or empty, size, no byte order mark, UTF-8, nesting
    depth (all before parsing), then JSON, an object, field types, required fields.
    A missing sequence becomes ``offset``, a missing timestamp ``timestamp_ms`` (the
    broker's), and a missing or empty event id ``f"{entity_type}:{entity_id}:{sequence}"``
    (the idempotency key). Raises :class:`InvalidEvent` with a reason, nothing else.
    """
    if value is None:
        raise InvalidEvent(REASON_NULL)
    if type(value) is not bytes:
        raise InvalidEvent(REASON_NOT_BYTES)
    size = len(value)
    if size == 0:
        raise InvalidEvent(REASON_EMPTY)
    if size > limits.max_bytes:
        raise InvalidEvent(reason_too_big(size, limits.max_bytes))
    if value.startswith(UTF8_BOM):
        raise InvalidEvent(REASON_BOM)
    if not value.isascii():
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(REASON_NOT_UTF8) from None
    if _too_deep(value, limits.max_depth):
        raise InvalidEvent(reason_too_deep(limits.max_depth))
    try:
        if value.startswith(CANONICAL_PREFIXES):
            fast = CANONICAL_DECODER.decode(value)
            if (
                fast.event_id
                and fast.entity_type is not None
                and fast.entity_id is not None
                and fast.state is not None
                and fast.sequence is not None
                and fast.timestamp is not None
            ):
                return _build(
                    fast.event_id,
                    fast.entity_type,
                    fast.entity_id,
                    fast.sequence,
                    fast.state,
                    fast.timestamp,
                    value,
                )
        raw = RAW_DECODER.decode(value)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(reason_from_msgspec(exc)) from None

    entity_type = raw.entity_type
    if entity_type is None:
        entity_type = _alias_str(raw, "entityType")
        if entity_type is None:
            entity_type = _alias_str(raw, "type")
            if entity_type is None:
                entity_type = _alias_str(raw, "event_type")
                if entity_type is None:
                    raise InvalidEvent(REASON_MISSING_TYPE)
    entity_id = raw.entity_id
    if entity_id is None:
        entity_id = _alias_str(raw, "entityId")
        if entity_id is None:
            raise InvalidEvent(REASON_MISSING_ID)
    state = raw.state
    if state is None:
        state = _alias_str(raw, "status")
        if state is None:
            raise InvalidEvent(REASON_MISSING_STATE)
    sequence = raw.sequence
    if sequence is None:
        sequence = _alias_int(raw, "seq", MAX_INT64, EXPECT_SEQUENCE)
        if sequence is None:
            sequence = offset
    timestamp = raw.timestamp
    if timestamp is None:
        timestamp = _alias_int(raw, "ts", MAX_TIMESTAMP_MS, EXPECT_TIMESTAMP)
        if timestamp is None:
            timestamp = timestamp_ms
    event_id = raw.event_id
    if not event_id:
        event_id = _alias_str(raw, "eventId")
        if not event_id:
            event_id = _alias_str(raw, "id")
    return _build(event_id, entity_type, entity_id, sequence, state, timestamp, value)


def _build(
    event_id: str | None,
    entity_type: str,
    entity_id: str,
    sequence: int,
    state: str,
    timestamp: int,
    value: bytes,
) -> Event:
    if not entity_type:
        raise InvalidEvent(REASON_EMPTY_TYPE)
    if not entity_id:
        raise InvalidEvent(REASON_EMPTY_ID)
    if not state:
        raise InvalidEvent(REASON_EMPTY_STATE)
    if not event_id:
        event_id = f"{entity_type}:{entity_id}:{sequence}"
    return Event(event_id, entity_type, entity_id, sequence, state, timestamp, value)


def _alias_str(raw: RawEvent, spelling: str) -> str | None:
    value = getattr(raw, spelling)
    if value is None or type(value) is str:
        return value
    raise InvalidEvent(reason_alias_type(spelling, EXPECT_STRING, value))


def _alias_int(raw: RawEvent, spelling: str, maximum: int, expected: str) -> int | None:
    value = getattr(raw, spelling)
    if value is None or (type(value) is int and 0 <= value <= maximum):
        return value
    raise InvalidEvent(reason_alias_type(spelling, expected, value))


def decode_batch(
    values: Sequence[bytes | None],
    offsets: Sequence[int],
    timestamps_ms: Sequence[int],
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[list[Event | None], list[tuple[int, str]]]:
    """Decode many values; returns the events aligned with the input (None where
    invalid) and ``(index, reason)`` for each invalid one. Raises ValueError when the
    three sequences differ in length."""
    if not len(values) == len(offsets) == len(timestamps_ms):
        raise ValueError("values, offsets and timestamps_ms must have the same length")
    events: list[Event | None] = []
    invalid: list[tuple[int, str]] = []
    for index, value in enumerate(values):
        try:
            events.append(
                decode_event(
                    value, offset=offsets[index], timestamp_ms=timestamps_ms[index], limits=limits
                )
            )
        except InvalidEvent as exc:
            events.append(None)
            invalid.append((index, exc.reason))
    return events, invalid


# ------------------------------------------------------------------------------- batch

# Per buffered row, on top of the payload: the Event, its strings and the index entry.
ROW_OVERHEAD_BYTES = 160
_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, PostgreSQL's binary epoch
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
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


def _python_value(column: str, event: Event, topic: str, partition: int, offset: int) -> Any:
    if column == "payload":
        return event.payload.decode("utf-8")
    if column == "event_ts":
        ts = event.timestamp_ms
        if not _event_ts_valid(ts):
            return None
        return _UNIX_EPOCH + timedelta(milliseconds=ts)
    if column == "kafka_topic":
        return topic
    if column == "kafka_partition":
        return partition
    if column == "kafka_offset":
        return offset
    return getattr(event, column)


def check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """Validate a column list against :data:`STATE_COLUMNS`; raises ConfigError."""
    result = tuple(columns)
    if not result:
        raise ConfigError("the column list is empty")
    for column in result:
        if column not in STATE_COLUMNS:
            raise ConfigError(
                f"unknown column {column!r}; expected some of {', '.join(STATE_COLUMNS)}"
            )
    if len(set(result)) != len(result):
        raise ConfigError(f"the column list repeats a column: {', '.join(result)}")
    return result


class Batch:
    """The rows of one flush, collapsed to the newest event per entity.

    ``add`` keeps, per ``(entity_type, entity_id)``, the event with the highest sequence
    (on a tie, the highest offset), so the staging data never carries a key twice
    (design §5). Both ``add`` and ``advance`` move the partition's next offset to
    ``offset + 1`` (never backwards). Rows keep the order in which their entity first
    appeared. ``COPY_FORMAT`` is ``"binary"``: it needs no escaping and no timestamp
    formatting, and measured faster to build than text. Not thread-safe.
    """

    COPY_FORMAT = "binary"

    __slots__ = ("_columns", "_events_added", "_index", "_nbytes", "_next", "_rows")

    def __init__(self, columns: Sequence[str] = STATE_COLUMNS) -> None:
        self._columns = check_columns(columns)
        self._index: dict[tuple[str, str], int] = {}
        self._rows: list[tuple[Event, str, int, int]] = []
        self._next: dict[tuple[str, int], int] = {}
        self._events_added = 0
        self._nbytes = 0

    @property
    def columns(self) -> tuple[str, ...]:
        """The staging columns, in COPY order."""
        return self._columns

    @property
    def events_added(self) -> int:
        """Events passed to ``add`` since creation or the last ``clear``."""
        return self._events_added

    @property
    def row_count(self) -> int:
        """Distinct entities buffered (the rows ``copy_data`` would write)."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the buffered rows, for the memory bound."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, event: Event, topic: str, partition: int, offset: int) -> None:
        """Buffer ``event`` read from ``topic``/``partition`` at ``offset``."""
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        _check_position(partition, offset)
        key = (event.entity_type, event.entity_id)
        index = self._index.get(key)
        if index is None:
            self._index[key] = len(self._rows)
            self._rows.append((event, topic, partition, offset))
            self._nbytes += ROW_OVERHEAD_BYTES + len(event.payload)
        else:
            old, _, _, old_offset = self._rows[index]
            if event.sequence > old.sequence or (
                event.sequence == old.sequence and offset > old_offset
            ):
                self._rows[index] = (event, topic, partition, offset)
                self._nbytes += len(event.payload) - len(old.payload)
        self._events_added += 1
        self._advance(topic, partition, offset)

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """Mark ``offset`` consumed without a row (a duplicate or a dead letter)."""
        _check_position(partition, offset)
        self._advance(topic, partition, offset)

    def ingest(
        self,
        messages: Iterable[Any],
        ring: IdempotencyRing,
        now_ms: int,
        assigned: Container[tuple[str, int]] | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        check_keys: bool = True,
    ) -> IngestResult:
        """Take one ``consume()`` result into the batch, message by message, in order.

        A message whose ``error()`` is set is returned in ``errors`` (never data). A
        message of a partition not in ``assigned`` (when given) is skipped without a
        trace: it was fetched before a revoke, and the next owner reads it. Every other
        message is decoded (``decode_event`` with its offset and broker timestamp);
        then, when ``check_keys``, its Kafka key must be ``partition_key(entity_type:
        entity_id)`` (design §3; a missing key fails too). A message failing either is
        returned in ``invalid`` with its reason. The rest are looked up in ``ring``
        (fingerprint of ``entity_type:entity_id:sequence`` at ``now_ms``): a hit counts
        as a duplicate; a miss is added (collapsed like :meth:`add`). Every data message
        of an assigned partition advances its partition's next offset. Raises only on a
        bad argument (a message that is not a Kafka message, a wrong type).
        """
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
                    _check_message_key(message.key(), event)
            except InvalidEvent as exc:
                invalid.append((message, exc.reason))
                self.advance(topic, partition, offset)
                continue
            fp = event_fingerprint(event.entity_type, event.entity_id, event.sequence)
            if ring.seen_or_add(fp, now_ms):
                duplicates += 1
                self.advance(topic, partition, offset)
                continue
            self.add(event, topic, partition, offset)
        return IngestResult(errors, invalid, duplicates, consumed, counts)

    def _advance(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if self._next.get(key, -1) <= offset:
            self._next[key] = offset + 1

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """``(topic, partition) -> highest offset seen + 1``, for the offsets table."""
        return dict(self._next)

    def rows(self) -> list[tuple[Any, ...]]:
        """The collapsed rows as Python values in ``columns`` order. ``payload`` is the
        JSON text (str); ``event_ts`` an aware UTC datetime, or None when unknown."""
        columns = self._columns
        return [
            tuple(_python_value(c, event, topic, partition, offset) for c in columns)
            for event, topic, partition, offset in self._rows
        ]

    def copy_data(self) -> bytes:
        """The whole ``COPY ... FROM STDIN (FORMAT binary)`` stream for the rows:
        header, one tuple per row in ``columns`` order, trailer."""
        columns = self._columns
        count = _pack_i16(len(columns))
        parts = [COPY_BINARY_HEADER]
        for event, topic, partition, offset in self._rows:
            parts.append(count)
            parts.extend(_binary_field(c, event, topic, partition, offset) for c in columns)
        parts.append(COPY_BINARY_TRAILER)
        return b"".join(parts)

    def copy_chunks(self, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """``copy_data()`` in pieces of about ``chunk_bytes`` (whole rows; a row larger
        than that is a piece of its own): their concatenation is ``copy_data()``. For
        streaming COPY without holding the whole stream in memory at once."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        columns = self._columns
        count = _pack_i16(len(columns))
        parts = [COPY_BINARY_HEADER]
        size = 0
        for event, topic, partition, offset in self._rows:
            row = count + b"".join(
                _binary_field(c, event, topic, partition, offset) for c in columns
            )
            if size and size + len(row) > chunk_bytes:
                yield b"".join(parts)
                parts, size = [], 0
            parts.append(row)
            size += len(row)
        parts.append(COPY_BINARY_TRAILER)
        yield b"".join(parts)

    def clear(self) -> None:
        """Drop every row, offset and counter; the columns stay."""
        self._index.clear()
        self._rows.clear()
        self._next.clear()
        self._events_added = 0
        self._nbytes = 0


def _check_message_key(message_key: Any, event: Event) -> None:
    # The same rule and messages as spr.classify.check_key (which imports the core).
    expected = partition_key(f"{event.entity_type}:{event.entity_id}")
    if message_key is None:
        raise InvalidEvent(reason_key_missing(event.entity_type, event.entity_id, expected))
    actual = message_key.encode("utf-8") if isinstance(message_key, str) else message_key
    if actual != expected.encode("ascii"):
        raise InvalidEvent(
            reason_key_mismatch(bytes(actual), event.entity_type, event.entity_id, expected)
        )


def _check_position(partition: int, offset: int) -> None:
    if not -(2**31) <= partition <= _INT32_MAX:
        raise OverflowError(f"partition must fit in a signed 32-bit int, got {partition}")
    _check_int64(offset, "offset")
