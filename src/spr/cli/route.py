"""``spr route``: the Kafka key and partition of entities, as every client must place them."""

from __future__ import annotations

import argparse
from typing import Any

from spr.errors import ConfigError
from spr.routing import DEFAULT_PARTITIONS, route_many


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
    parser.add_argument(
        "routing_keys",
        nargs="+",
        metavar="ENTITY_TYPE:ENTITY_ID",
        help="the entities to place, e.g. order:42",
    )
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
