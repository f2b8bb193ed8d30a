"""Canonical decoding (design §2): Kafka message bytes to an :class:`Event`.

Producers disagree on field names, so every accepted spelling is decoded in one msgspec
pass and the first present one wins (canonical spelling first). Size, byte order mark,
UTF-8 and nesting depth are checked before JSON parsing, so a hostile value costs one
linear scan. Every invalid input raises :class:`spr.errors.InvalidEvent` with a reason,
never another exception. Pure computation: nothing blocks.

Fallbacks: a missing ``sequence`` is the Kafka offset; a missing ``timestamp`` is the
broker timestamp (never the consumer's clock); a missing or empty event id is the
idempotency key ``f"{entity_type}:{entity_id}:{sequence}"``, so it is deterministic
across replays.
"""

from __future__ import annotations

from collections.abc import Sequence

from spr._event import DEFAULT_LIMITS, DecodeLimits, Event
from spr._impl import core

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "Event", "decode_batch", "decode_event"]


def decode_event(
    value: bytes | None,
    *,
    offset: int,
    timestamp_ms: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Event:
    """Decode one message value read at ``offset`` with broker time ``timestamp_ms``.

    Raises InvalidEvent for: a null, empty or non-bytes value; more than
    ``limits.max_bytes``; a UTF-8 byte order mark; invalid UTF-8; nesting deeper than
    ``limits.max_depth``; invalid JSON (NaN and Infinity included); not an object; a
    field of the wrong type (a sequence must be an int in [0, 2**63-1], a timestamp an
    int of epoch ms up to year 9999); a missing or empty entity_type, entity_id or state.
    """
    result: Event = core.decode_event(
        value, offset=offset, timestamp_ms=timestamp_ms, limits=limits
    )
    return result


def decode_batch(
    values: Sequence[bytes | None],
    offsets: Sequence[int],
    timestamps_ms: Sequence[int],
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[list[Event | None], list[tuple[int, str]]]:
    """Decode many values in one call. Returns the events aligned with the input (None
    where invalid) and ``(index, reason)`` for each invalid one. Raises ValueError only
    when the three sequences differ in length."""
    result: tuple[list[Event | None], list[tuple[int, str]]] = core.decode_batch(
        values, offsets, timestamps_ms, limits
    )
    return result
