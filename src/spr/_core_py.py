"""Pure-Python reference implementation of spr's per-event core.

``spr._core`` (Cython) mirrors every name here with the same semantics.
"""

from __future__ import annotations

import hashlib

__all__ = ["partition_key"]


def partition_key(routing_key: str) -> str:
    """First 8 bytes of SHA-256 of the UTF-8 routing key, as 16 lowercase hex chars."""
    return hashlib.sha256(routing_key.encode("utf-8")).digest()[:8].hex()
