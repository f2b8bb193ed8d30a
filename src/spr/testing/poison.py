"""A corpus of poison messages, each with the class spr must give it (design §6).

Every case is a Kafka message (key and value) that a producer could really send. Most
are INVALID: the decoder (or the key check) rejects them, and the engine dead-letters
them at once. A few decode fine but are rejected by PostgreSQL; they are DATA, found by
bisecting the batch. A few look suspicious but are valid on purpose, and are applied.

Decisions this corpus pins down:

* Duplicate JSON keys: **the last one wins**, as in msgspec, PostgreSQL ``jsonb``, and
  most JSON parsers (Python, Go, Jackson, JavaScript). The decoded fields then agree with
  the stored ``payload``. A duplicate ``entity_id`` that makes the event name another
  entity than its key is caught by :func:`spr.routing.check_key`.
* A message key that is not the partition key of the entity in the value is INVALID: the
  event may sit on another partition than its entity's other events, so its order is
  unknown.

Use :func:`evaluate` to run a case through decoding and the key check.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from spr.classify import ErrorClass, classify
from spr.decode import DEFAULT_LIMITS, DecodeLimits, Event, decode_event
from spr.errors import InvalidEvent
from spr.routing import check_key, partition_key

__all__ = ["CORPUS", "PoisonCase", "evaluate", "key_of", "valid_event"]

ENTITY_TYPE = "order"


def key_of(entity_type: str, entity_id: str) -> bytes:
    """The Kafka key spr's producer gives an entity (design §3)."""
    return partition_key(f"{entity_type}:{entity_id}").encode("ascii")


def valid_event(entity_id: str, /, **overrides: Any) -> dict[str, Any]:
    """A valid event of ``order:<entity_id>`` as a dict; ``overrides`` replace or add
    fields (a value of None removes the field)."""
    event: dict[str, Any] = {
        "event_id": f"evt-{entity_id}",
        "entity_type": ENTITY_TYPE,
        "entity_id": entity_id,
        "sequence": 1,
        "state": "created",
        "timestamp": 1_700_000_000_000,
    }
    for name, value in overrides.items():
        if value is None:
            event.pop(name, None)
        else:
            event[name] = value
    return event


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True, kw_only=True)
class PoisonCase:
    """One message of the corpus.

    ``expected`` is the class spr must give it, or None for a message that must be
    applied. ``reason`` is a fragment of the reason spr must give (for INVALID, of the
    InvalidEvent reason, usually the field it names; for DATA, of PostgreSQL's message).
    ``why`` explains the class.
    """

    name: str
    key: bytes | None
    value: bytes | None
    expected: ErrorClass | None
    reason: str
    why: str

    def __repr__(self) -> str:  # the 5 MB value must not flood a test report
        return f"PoisonCase({self.name!r}, expected={self.expected})"


def _case(
    name: str,
    value: bytes | None,
    expected: ErrorClass | None,
    reason: str,
    why: str,
    *,
    entity_id: str | None = None,
    key: bytes | Literal["entity"] | None = "entity",
) -> PoisonCase:
    # By default the key is right for the entity the value means, so that only the value
    # is wrong; an explicit key (None included) overrides it.
    message_key = key_of(ENTITY_TYPE, entity_id or f"poison-{name}") if key == "entity" else key
    return PoisonCase(
        name=name, key=message_key, value=value, expected=expected, reason=reason, why=why
    )


def _incompressible_text(length: int) -> str:
    # PostgreSQL compresses index entries; hex of chained hashes does not compress.
    chunks: list[str] = []
    digest = b"spr"
    while sum(map(len, chunks)) < length:
        digest = hashlib.sha256(digest).digest()
        chunks.append(digest.hex())
    return "".join(chunks)[:length]


def _build() -> tuple[PoisonCase, ...]:
    INVALID, DATA = ErrorClass.INVALID, ErrorClass.DATA
    ok = valid_event
    five_mb_id = "poison-five-mb"
    deep_id = "poison-deep"
    cases = [
        _case(
            "truncated_json",
            _json(ok("poison-truncated"))[:-9],
            INVALID,
            "not valid JSON",
            "a producer crashed mid-write or a value was cut",
        ),
        _case(
            "json_array",
            _json([ok("poison-array")]),
            INVALID,
            "not a JSON object",
            "an event is an object; a batch of events is not an event",
        ),
        _case("json_number", b"42", INVALID, "not a JSON object", "a bare number"),
        _case("json_string", b'"paid"', INVALID, "not a JSON object", "a bare string"),
        _case("json_null", b"null", INVALID, "not a JSON object", "the JSON literal null"),
        _case(
            "missing_entity_id",
            _json(ok("poison-missing-id", entity_id=None)),
            INVALID,
            "missing entity_id",
            "no entity to apply it to",
        ),
        _case(
            "empty_entity_id",
            _json(ok("", entity_id="")),
            INVALID,
            "entity_id is empty",
            "an empty id is no entity",
            entity_id="",
        ),
        _case(
            "missing_entity_type",
            _json(ok("poison-missing-type", entity_type=None)),
            INVALID,
            "missing entity_type",
            "no entity to apply it to",
        ),
        _case(
            "empty_state",
            _json(ok("poison-empty-state", state="")),
            INVALID,
            "state is empty",
            "state is the one thing an event must carry",
            entity_id="poison-empty-state",
        ),
        _case(
            "missing_state",
            _json(ok("poison-missing-state", state=None)),
            INVALID,
            "missing state",
            "state is the one thing an event must carry",
            entity_id="poison-missing-state",
        ),
        _case(
            "sequence_as_string",
            _json(ok("poison-seq-string", sequence="7")),
            INVALID,
            "sequence",
            "a string sequence sorts wrongly ('10' < '9'); no coercion",
            entity_id="poison-seq-string",
        ),
        _case(
            "negative_sequence",
            _json(ok("poison-seq-negative", sequence=-1)),
            INVALID,
            "sequence",
            "sequences are >= 0 (design §2)",
            entity_id="poison-seq-negative",
        ),
        _case(
            "fractional_sequence",
            _json(ok("poison-seq-float", sequence=7.5)),
            INVALID,
            "sequence",
            "a sequence is an integer",
            entity_id="poison-seq-float",
        ),
        _case(
            "sequence_beyond_int64",
            _json(ok("poison-seq-huge", sequence=2**63)),
            INVALID,
            "sequence",
            "the sequence column is bigint",
            entity_id="poison-seq-huge",
        ),
        _case(
            "nan_sequence",
            _json(ok("poison-nan")).replace(b'"sequence":1', b'"sequence":NaN'),
            INVALID,
            "not valid JSON",
            "NaN is not JSON (RFC 8259)",
            entity_id="poison-nan",
        ),
        _case(
            "infinity_sequence",
            _json(ok("poison-inf")).replace(b'"sequence":1', b'"sequence":Infinity'),
            INVALID,
            "not valid JSON",
            "Infinity is not JSON (RFC 8259)",
            entity_id="poison-inf",
        ),
        _case(
            "timestamp_as_string",
            _json(ok("poison-ts-string", timestamp="2024-01-01T00:00:00Z")),
            INVALID,
            "timestamp",
            "timestamps are epoch milliseconds",
            entity_id="poison-ts-string",
        ),
        _case(
            "entity_type_not_a_string",
            _json(ok("poison-type-number", entity_type=None, entityType=5)),
            INVALID,
            "entityType",
            "a number where a string belongs; no coercion",
            entity_id="poison-type-number",
        ),
        _case(
            "invalid_utf8",
            _json(ok("poison-utf8", state="PLACEHOLDER")).replace(b"PLACEHOLDER", b"paid\xff\xfe"),
            INVALID,
            "not valid UTF-8",
            "JSON text is UTF-8 (RFC 8259); PostgreSQL would reject it too",
            entity_id="poison-utf8",
        ),
        _case(
            "utf8_bom",
            b"\xef\xbb\xbf" + _json(ok("poison-bom")),
            INVALID,
            "byte order mark",
            "RFC 8259 forbids a BOM in JSON sent over a network",
            entity_id="poison-bom",
        ),
        _case(
            "five_mb_value",
            _json(ok(five_mb_id, padding="x" * (5 * 1024 * 1024))),
            INVALID,
            "over the limit",
            "larger than the decoder's max_bytes (1 MiB): it would blow the batch memory bound",
            entity_id=five_mb_id,
        ),
        _case(
            "deep_nesting_10000",
            _json(ok(deep_id, extra="PLACEHOLDER")).replace(
                b'"PLACEHOLDER"', b"[" * 10_000 + b"]" * 10_000
            ),
            INVALID,
            "deeper than the limit",
            "deeper than max_depth (64): recursive parsers would overflow their stack",
            entity_id=deep_id,
        ),
        _case(
            "tombstone",
            None,
            INVALID,
            "tombstone",
            "a null value deletes a key in a compacted topic; it carries no state",
        ),
        _case("empty_value", b"", INVALID, "value is empty", "nothing to decode"),
        _case(
            "key_of_another_entity",
            _json(ok("poison-key-a")),
            INVALID,
            "does not match entity",
            "routed by another entity's key: its order relative to its own entity is unknown",
            key=key_of(ENTITY_TYPE, "poison-key-b"),
        ),
        _case(
            "key_is_routing_key",
            _json(ok("poison-key-raw")),
            INVALID,
            "does not match entity",
            "keyed by 'order:id' instead of its partition key: another partitioning",
            key=b"order:poison-key-raw",
        ),
        _case(
            "missing_key",
            _json(ok("poison-no-key")),
            INVALID,
            "no key",
            "unkeyed messages are spread over partitions, so their order is unknown",
            key=None,
        ),
        _case(
            "duplicate_keys_last_wins",
            b'{"entity_type":"order","entity_id":"poison-dup","sequence":1,'
            b'"state":"created","state":"paid"}',
            None,
            "",
            "duplicate keys: the last wins (state 'paid'), exactly as PostgreSQL jsonb "
            "stores the payload",
            entity_id="poison-dup",
        ),
        _case(
            "duplicate_entity_id_changes_entity",
            b'{"entity_type":"order","entity_id":"poison-dup-a","entity_id":"poison-dup-b",'
            b'"sequence":1,"state":"paid"}',
            INVALID,
            "does not match entity",
            "the last entity_id wins, naming another entity than the key: the key check "
            "catches the smuggled entity",
            entity_id="poison-dup-a",
        ),
        _case(
            "nul_character_in_state",
            _json(ok("poison-nul", state="pa\u0000id")),
            DATA,
            "0x00",
            "valid JSON, but PostgreSQL text cannot hold NUL: the database rejects the row",
            entity_id="poison-nul",
        ),
        _case(
            "nul_escape_in_payload",
            _json(ok("poison-nul-payload", note="a\u0000b")),
            DATA,
            "\\u0000",
            "valid JSON, but PostgreSQL jsonb rejects \\u0000: the database rejects the row",
            entity_id="poison-nul-payload",
        ),
        _case(
            "entity_id_too_long_for_index",
            _json(ok(_incompressible_text(10_000))),
            DATA,
            "index row",
            "a 10,000-character id exceeds the btree entry limit of the primary key",
            entity_id=_incompressible_text(10_000),
        ),
        _case(
            "unicode_entity_id",
            _json(ok("订单-ü-🚀")),
            None,
            "",
            "any UTF-8 text is a valid id",
            entity_id="订单-ü-🚀",
        ),
        _case(
            "unknown_fields",
            _json(ok("poison-extra", customer={"tier": "gold"}, tags=["a", "b"])),
            None,
            "",
            "extra fields are kept in the payload and otherwise ignored",
            entity_id="poison-extra",
        ),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "corpus case names must be unique"
    return tuple(cases)


CORPUS: tuple[PoisonCase, ...] = _build()


def evaluate(
    case: PoisonCase,
    *,
    offset: int = 100,
    timestamp_ms: int = 1_700_000_000_000,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[Event | None, ErrorClass | None, str]:
    """Decode ``case`` and check its key, as the engine does before batching.

    Returns ``(event, None, "")`` for a message that passes (it may still be DATA for
    PostgreSQL), or ``(None, class, reason)`` for one that is rejected. Never raises.
    """
    try:
        event = decode_event(case.value, offset=offset, timestamp_ms=timestamp_ms, limits=limits)
        check_key(case.key, event)
    except InvalidEvent as exc:
        return None, classify(exc), exc.reason
    return event, None, ""
