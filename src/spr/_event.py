"""The canonical event and the fixed table columns, shared by both cores.

This module is pure Python with no spr imports, so ``spr._core`` and ``spr._core_py``
can both import it without a cycle through :mod:`spr._impl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgspec

from spr.errors import ConfigError

__all__ = [
    "COLUMN_TYPES",
    "DEFAULT_LIMITS",
    "MISROUTED_APPLY",
    "MISROUTED_BY_SEQUENCE",
    "MISROUTED_DEAD_LETTER",
    "OUTPUT_ENCODER",
    "STATE_COLUMNS",
    "CanonicalOutput",
    "DecodeLimits",
    "Event",
    "IngestResult",
    "RekeyResult",
]


class Event(msgspec.Struct, frozen=True, gc=False):
    """One entity state change in canonical form (design §2).

    ``payload`` is the original JSON value, byte for byte, for the ``payload jsonb``
    column. ``timestamp_ms`` is epoch milliseconds: the producer's ``timestamp`` when
    present, otherwise the broker timestamp (a negative broker timestamp means "not
    available" and is written as NULL).
    """

    event_id: str
    entity_type: str
    entity_id: str
    sequence: int
    state: str
    timestamp_ms: int
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Bounds applied to every message before it is parsed.

    ``max_bytes`` caps the size of a value; ``max_depth`` caps the nesting of arrays and
    objects (the top-level object counts as 1). Both are checked before JSON parsing.
    """

    max_bytes: int = 1_048_576
    max_depth: int = 64

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.max_depth < 1:
            raise ConfigError(f"max_depth must be at least 1, got {self.max_depth}")


DEFAULT_LIMITS = DecodeLimits()

STATE_COLUMNS: tuple[str, ...] = (
    "entity_type",
    "entity_id",
    "sequence",
    "state",
    "event_id",
    "payload",
    "event_ts",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)

COLUMN_TYPES: dict[str, str] = {
    "entity_type": "text",
    "entity_id": "text",
    "sequence": "bigint",
    "state": "text",
    "event_id": "text",
    "payload": "jsonb",
    "event_ts": "timestamptz",
    "kafka_topic": "text",
    "kafka_partition": "integer",
    "kafka_offset": "bigint",
}


# -- decoding helpers shared by both cores --------------------------------------------

MAX_INT64 = 2**63 - 1
# 9999-12-31T23:59:59.999Z: the last instant a Python datetime can hold.
MAX_TIMESTAMP_MS = 253_402_300_799_999

_Sequence = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
_Timestamp = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMESTAMP_MS)]


class CanonicalEvent(msgspec.Struct, gc=False):
    """The canonical spellings only: what a well-behaved producer writes.

    Decoding into this is as fast as a plain msgspec decode. It is tried first when a
    value starts with a canonical key; if any of its fields is missing the value is
    decoded again as a :class:`RawEvent`. A JSON ``null`` counts as missing.
    """

    event_id: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    sequence: _Sequence | None = None
    state: str | None = None
    timestamp: _Timestamp | None = None


class RawEvent(msgspec.Struct, gc=False):
    """Every accepted spelling of every field, each optional; unknown keys are skipped.

    The canonical spellings are typed, so a wrong type there is reported by msgspec. The
    other spellings are decoded as any JSON value and checked only when one is actually
    used (the first present one, in the order of design §2, after the canonical one), so
    a spelling that loses is never an error: ``{"entity_type": "order", "type": 3}`` is
    valid in every decoding path.
    """

    event_id: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    sequence: _Sequence | None = None
    state: str | None = None
    timestamp: _Timestamp | None = None
    eventId: Any = None
    entityType: Any = None
    entityId: Any = None
    seq: Any = None
    status: Any = None
    ts: Any = None
    id: Any = None
    type: Any = None
    event_type: Any = None


CANONICAL_DECODER = msgspec.json.Decoder(CanonicalEvent)
RAW_DECODER = msgspec.json.Decoder(RawEvent)
# Values that start like this are tried with the canonical decoder first.
CANONICAL_PREFIXES = (b'{"event_id"', b'{"entity_type"')

UTF8_BOM = b"\xef\xbb\xbf"

REASON_NULL = "value is null (a tombstone), not an event"
REASON_EMPTY = "value is empty"
REASON_NOT_BYTES = "value is not bytes"
REASON_BOM = "value starts with a UTF-8 byte order mark"
REASON_NOT_UTF8 = "value is not valid UTF-8"
REASON_MISSING_TYPE = "missing entity_type (entity_type, entityType, type or event_type)"
REASON_MISSING_ID = "missing entity_id (entity_id or entityId)"
REASON_MISSING_STATE = "missing state (state or status)"
REASON_EMPTY_TYPE = "entity_type is empty"
REASON_EMPTY_ID = "entity_id is empty"
REASON_EMPTY_STATE = "state is empty"


def reason_too_big(size: int, limit: int) -> str:
    return f"value is {size} bytes, over the limit of {limit}"


def reason_too_deep(limit: int) -> str:
    return f"value nests arrays or objects deeper than the limit of {limit}"


_JSON_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
_JSON_TYPE_NAMES |= {list: "an array", dict: "an object"}


def reason_alias_type(spelling: str, expected: str, value: object) -> str:
    got = _JSON_TYPE_NAMES.get(type(value), "another value")
    if type(value) is int:
        got = f"the integer {value}"
    return f"wrong field type: `{spelling}` must be {expected}, got {got}"


EXPECT_STRING = "a string"
EXPECT_SEQUENCE = f"an integer from 0 to {MAX_INT64}"
EXPECT_TIMESTAMP = f"an integer from 0 to {MAX_TIMESTAMP_MS} (epoch ms)"


def reason_from_msgspec(exc: Exception) -> str:
    """Turn a msgspec error into a one-line reason (the message names the JSON path)."""
    message = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if message.startswith("Expected `object`"):
            return f"not a JSON object: {message}"
        return f"wrong field type: {message}"
    return f"not valid JSON: {message}"


def reason_key_missing(entity_type: str, entity_id: str, expected: str) -> str:
    """Why an event without a Kafka key is invalid (as spr.classify.check_key says)."""
    return f"message has no key; expected the partition key {expected} of {entity_type}:{entity_id}"


def reason_key_mismatch(actual: bytes, entity_type: str, entity_id: str, expected: str) -> str:
    """Why an event keyed for another entity is invalid (as spr.classify.check_key says)."""
    shown = actual[:40].decode("utf-8", "backslashreplace")
    return (
        f"message key {shown!r} does not match entity {entity_type}:"
        f"{entity_id}, whose partition key is {expected}"
    )


class IngestResult(NamedTuple):
    """What ``Batch.ingest`` did with one ``consume()`` result.

    ``errors``: the messages whose ``error()`` is set, in order, for the caller to
    classify (never data). ``invalid``: ``(message, reason)`` for each data message that
    failed decoding or the key check; its offset is already advanced in the batch.
    ``duplicates``: messages the idempotency ring had seen (offset advanced, no row).
    ``consumed``: data messages of assigned partitions (valid, invalid and duplicate);
    ``partition_counts``: the same per ``(topic, partition)``. ``misrouted``: events
    per topic whose partition is not ``partition_for(key, partitions[topic])`` (only
    when ``partitions`` was given), and ``misrouted_letters``: ``(message, reason)`` for
    those of them held back by ``on_misrouted`` (their offsets are advanced).
    """

    errors: list[Any]
    invalid: list[tuple[Any, str]]
    duplicates: int
    consumed: int
    partition_counts: dict[tuple[str, int], int]
    misrouted: dict[str, int]
    misrouted_letters: list[tuple[Any, str]]


#: ``Batch.ingest(on_misrouted=...)``: an event on a partition its key does not map to
#: is applied when it carries a sequence (the guard orders it) and held back without
#: one (design §10); or always applied; or always held back.
MISROUTED_BY_SEQUENCE = 0
MISROUTED_APPLY = 1
MISROUTED_DEAD_LETTER = 2


def reason_misrouted(
    topic: str, partition: int, routing_key: str, key: str, expected: int, count: int, why: str
) -> str:
    """Why a misrouted event is held back (design §10)."""
    return (
        f"misrouted: {topic}[{partition}] holds {routing_key}, whose partition key {key} "
        f"belongs on partition {expected} of {count}; {why}"
    )


REASON_MISROUTED_NO_SEQUENCE = (
    "without a sequence, its offset cannot order it against the entity's other events"
)
REASON_MISROUTED_HELD = "--on-misrouted holds every misrouted event back"


def reason_unorderable(routing_key: str, earlier: str, source: str) -> str:
    """Why a second source's event without a sequence is held back (design §10)."""
    return (
        f"unorderable: {routing_key} has events without a sequence from {earlier} already; "
        f"this one from {source} has no order against them (only offsets of one partition "
        "order each other)"
    )


class CanonicalOutput(msgspec.Struct, omit_defaults=True, gc=False):
    """The canonical event as ``spr transform`` writes it (design §2 names, JSON).

    ``payload`` is the original value, byte for byte; ``timestamp`` is the event's own
    or its broker timestamp, left out when neither is known. The first key is
    ``event_id``, so ``spr run`` decodes it on its fast path.
    """

    event_id: str
    entity_type: str
    entity_id: str
    sequence: int
    state: str
    timestamp: int | None = None
    payload: msgspec.Raw = msgspec.Raw(b"null")


OUTPUT_ENCODER = msgspec.json.Encoder()


class RekeyResult(NamedTuple):
    """What ``rekey`` did with one ``consume()`` result (the routing stage, design §10).

    ``records``: ``(key, value, partition, headers)`` to produce, in consumption order:
    the partition key (16 ASCII hex bytes), the :class:`CanonicalOutput` JSON, the output
    partition ``partition_for(key, output_partitions)`` and the headers
    (``idempotency-key``, ``schema-version``, ``spr-source-topic``,
    ``spr-source-partition``, ``spr-source-offset``). ``errors``, ``invalid``,
    ``duplicates``, ``consumed`` and ``partition_counts`` are as in
    :class:`IngestResult`; ``unorderable``: ``(message, reason)`` for events without a
    sequence whose entity already had such events from another source partition.
    ``positions``: per ``(topic, partition)``, the next offset after every data message
    taken (the input position to commit with these records).
    """

    errors: list[Any]
    invalid: list[tuple[Any, str]]
    unorderable: list[tuple[Any, str]]
    duplicates: int
    consumed: int
    partition_counts: dict[tuple[str, int], int]
    records: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]]
    positions: dict[tuple[str, int], int]
