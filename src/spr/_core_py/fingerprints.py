"""Fingerprints (design §1): XXH64 (seed 0) of an idempotency key, as the ring stores it.

Twin of ``src/spr/_core/fingerprints.pxi``. Pure computation: nothing blocks.
"""

from __future__ import annotations

import xxhash


def fingerprint(idempotency_key: str | bytes) -> int:
    """XXH64 (seed 0) of the UTF-8 idempotency key, as an unsigned 64-bit int."""
    data = idempotency_key.encode("utf-8") if isinstance(idempotency_key, str) else idempotency_key
    return int(xxhash.xxh64_intdigest(data))


def event_fingerprint(entity_type: str, entity_id: str, sequence: int) -> int:
    """Fingerprint of the idempotency key ``entity_type:entity_id:sequence``."""
    return fingerprint(f"{entity_type}:{entity_id}:{sequence}")
