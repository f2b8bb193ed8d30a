"""Composite-key routing (design §3): which Kafka key and partition an entity gets.

The routing key is ``f"{entity_type}:{entity_id}"``; the Kafka message key is its
:func:`partition_key`; the partition is what Kafka's Java client (and librdkafka with
``partitioner=murmur2_random``) picks for that key, :func:`partition_for`. The sequence
is never part of the key, so an entity's events stay on one partition, in order.
Everything here is pure computation: nothing blocks or does I/O.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from spr._impl import core
from spr.errors import ConfigError

__all__ = ["murmur2", "partition_for", "partition_key", "register", "route_many"]

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


def register(subparsers: Any) -> None:
    """Add ``spr route [--partitions N] ENTITY_TYPE:ENTITY_ID ...`` to the command line."""
    parser = subparsers.add_parser(
        "route",
        help="print the Kafka key and partition of entities",
        description="Print routing_key<TAB>partition_key<TAB>partition for each "
        "ENTITY_TYPE:ENTITY_ID, as Kafka's Java client and spr's producer place it.",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        metavar="N",
        help=f"number of partitions of the topic (default {DEFAULT_PARTITIONS})",
    )
    parser.add_argument("routing_keys", nargs="+", metavar="ENTITY_TYPE:ENTITY_ID")
    parser.set_defaults(func=_route_command)


def _route_command(args: argparse.Namespace) -> int:
    num_partitions: int = args.partitions
    if not 1 <= num_partitions <= 2**31 - 1:
        raise ConfigError(f"--partitions must be between 1 and 2147483647, got {num_partitions}")
    routing_keys: list[str] = args.routing_keys
    for routing_key in routing_keys:
        entity_type, sep, entity_id = routing_key.partition(":")
        if not sep or not entity_type or not entity_id:
            raise ConfigError(
                f"{routing_key!r} is not a routing key; expected ENTITY_TYPE:ENTITY_ID"
            )
    keys, partitions = route_many(routing_keys, num_partitions)
    for routing_key, key, partition in zip(routing_keys, keys, partitions, strict=True):
        print(f"{routing_key}\t{key}\t{partition}")
    return 0
