"""Decoding (design §2): one Kafka message value to the canonical :class:`Event`.

Twin of ``src/spr/_core/decode.pxi``; :func:`decode_event` states the rules. Pure
computation: nothing blocks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

import msgspec

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
    UTF8_BOM,
    DecodeLimits,
    Event,
    RawEvent,
    reason_alias_type,
    reason_from_msgspec,
    reason_too_big,
    reason_too_deep,
)
from spr.errors import InvalidEvent

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
    return decode_with_sequence(value, offset=offset, timestamp_ms=timestamp_ms, limits=limits)[0]


def decode_with_sequence(
    value: bytes | None,
    *,
    offset: int,
    timestamp_ms: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[Event, bool]:
    """:func:`decode_event`, and whether the event carried its own sequence (False when
    it took ``offset``, which orders it only against events of the same partition)."""
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
                event = _build(
                    fast.event_id,
                    fast.entity_type,
                    fast.entity_id,
                    fast.sequence,
                    fast.state,
                    fast.timestamp,
                    value,
                )
                return event, True
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
    given = sequence is not None
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
    return _build(event_id, entity_type, entity_id, sequence, state, timestamp, value), given


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
