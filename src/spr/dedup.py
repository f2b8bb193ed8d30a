"""The local idempotency window (design §1): drop redelivered events cheaply.

An event's idempotency key is ``entity_type:entity_id:sequence`` (the ``idempotency-key``
header); its :func:`fingerprint` is the 64-bit XXH64 of that key. The
:class:`IdempotencyRing` remembers recent fingerprints for a time to live in fixed
memory. It is an optimisation only: the database's sequence guard keeps effects
exactly-once even when the ring forgets. Nothing here blocks or reads a clock; time
enters as ``now_ms`` arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spr._impl import core

__all__ = ["PROBE_WINDOW", "IdempotencyRing", "event_fingerprint", "fingerprint"]

PROBE_WINDOW: int = core.PROBE_WINDOW


def fingerprint(idempotency_key: str | bytes) -> int:
    """XXH64 (seed 0) of the idempotency key (UTF-8 when a str): an unsigned 64-bit int,
    equal to ``xxhash.xxh64_intdigest(key)``."""
    result: int = core.fingerprint(idempotency_key)
    return result


def event_fingerprint(entity_type: str, entity_id: str, sequence: int) -> int:
    """``fingerprint(f"{entity_type}:{entity_id}:{sequence}")``."""
    result: int = core.event_fingerprint(entity_type, entity_id, sequence)
    return result


if TYPE_CHECKING:
    from spr._core_py import IdempotencyRing as IdempotencyRing
else:
    IdempotencyRing = core.IdempotencyRing
    """Fixed-memory TTL window of fingerprints.

    ``IdempotencyRing(capacity, ttl_ms)``; ``seen_or_add(fp, now_ms) -> bool``,
    ``seen_or_add_many(fps, now_ms) -> list[bool]``, ``clear()``; read-only ``capacity``,
    ``ttl_ms``, ``lookups``, ``hits``, ``evictions``; ``len()`` is the live entries.
    Raises ConfigError for a capacity or ttl that is not positive. At capacity the
    oldest entry of the probe window is overwritten: the ring may forget, but never
    reports a false duplicate beyond the 64-bit collision rate. A fingerprint of 0 is
    stored as ``ZERO_FINGERPRINT_SUBSTITUTE``. An entry is live while
    ``|now_ms - added_ms| < ttl_ms``, so a clock that jumps either way expires entries
    rather than making them immortal.
    """
