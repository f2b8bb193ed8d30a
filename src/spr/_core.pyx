# cython: language_level=3
"""Compiled core of spr; mirrors ``spr._core_py`` name for name."""

import hashlib


def partition_key(str routing_key):
    """First 8 bytes of SHA-256 of the UTF-8 routing key, as 16 lowercase hex chars."""
    return hashlib.sha256(routing_key.encode("utf-8")).digest()[:8].hex()
