"""Composite-key routing (design §3): which Kafka key and partition an entity gets.

The routing key is ``f"{entity_type}:{entity_id}"``; the Kafka message key is its
:func:`partition_key`; the partition is what Kafka's Java client (and librdkafka with
``partitioner=murmur2_random``) picks for that key, :func:`partition_for`. The sequence
is never part of the key, so an entity's events stay on one partition, in order.
Everything here is pure computation: nothing blocks or does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from spr._event import Event
from spr._impl import core

__all__ = [
    "DEFAULT_PARTITIONS",
    "check_key",
    "murmur2",
    "partition_for",
    "partition_key",
    "route_many",
]

DEFAULT_PARTITIONS = 12


def partition_key(routing_key: str) -> str:
    """The Kafka message key of a routing key: the first 8 bytes of SHA-256 of its
    UTF-8 form, as 16 lowercase hex characters."""
    result: str = core.partition_key(routing_key)
    return result


def murmur2(data: bytes) -> int:
    """Kafka's Java ``Utils.murmur2`` of ``data``, as the signed 32-bit int Java returns.

    ``confluent_kafka.murmur2(key, n)`` returns a partition, not the hash; it equals
    ``partition_for(key, n)``.
    """
    result: int = core.murmur2(data)
    return result


def partition_for(key: str | bytes, num_partitions: int) -> int:
    """The partition the Java client picks for a message key:
    ``(murmur2(key) & 0x7fffffff) % num_partitions``; a str key is UTF-8 encoded.
    Raises ValueError unless ``1 <= num_partitions <= 2**31-1``."""
    result: int = core.partition_for(key, num_partitions)
    return result


def route_many(routing_keys: Sequence[str], num_partitions: int) -> tuple[list[str], list[int]]:
    """``partition_key`` and the partition of that key for each routing key, in one
    call: ``(keys, partitions)`` aligned with the input."""
    result: tuple[list[str], list[int]] = core.route_many(routing_keys, num_partitions)
    return result


def check_key(message_key: bytes | str | None, event: Event) -> None:
    """Check that a message's Kafka key is the partition key of the entity in its value.

    A key that names another entity means the event was routed by something else and
    may sit on the wrong partition, where its order relative to the entity's other
    events is lost; applying it could move state backwards. Raises
    :class:`spr.errors.InvalidEvent` on a mismatch and on a missing key (design §3 makes
    the partition key the message key). The engine applies the same rule inside
    ``Batch.ingest``.
    """
    core.check_key(message_key, event)
