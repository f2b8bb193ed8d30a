"""Routing (design §3): the partition key of a routing key and Kafka's murmur2 partitioner.

Twin of ``src/spr/_core/routing.pxi``. Pure computation: nothing blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from spr._core_py.ints import _INT32_MAX

_MASK32 = 0xFFFFFFFF


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
