"""Options several commands share, defined once: where the servers are, the table, -X."""

from __future__ import annotations

import argparse
import sys

from spr.errors import ConfigError

__all__ = [
    "add_kafka_options",
    "add_table_options",
    "kafka_settings",
    "parse_kafka_overrides",
    "print_usage",
]


def add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", metavar="D", help="PostgreSQL DSN (default $SPR_DSN or the local dev stack)"
    )
    parser.add_argument("--table", metavar="X", help="state table name")
    parser.add_argument(
        "--mapping",
        dest="mapping_preset",
        choices=("default", "orders"),
        help="column layout preset (orders: the field report's orders table)",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="settings file")


def print_usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def parse_kafka_overrides(items: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-X expects KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    """``-X key=value``: librdkafka settings, as ``spr run`` takes them (with
    ``SPR_KAFKA_*`` below them), so that every command connects the same way."""
    parser.add_argument(
        "-X",
        dest="kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka setting, e.g. security.protocol or sasl.* (repeatable)",
    )


def kafka_settings(args: argparse.Namespace) -> dict[str, str]:
    """The librdkafka settings of a command with :func:`add_kafka_options`."""
    from spr.config import load_kafka_settings

    return load_kafka_settings(kafka_flags=parse_kafka_overrides(args.kafka))
