"""``spr replay: rewind a group.``"""

from __future__ import annotations

import argparse
import json

import psycopg

from spr.cli.options import add_kafka_options, kafka_settings
from spr.errors import ConfigError
from spr.logs import redact
from spr.ops.replay import parse_timestamp_ms, rewind


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "replay",
        help="rewind a group's offsets (database and Kafka), or replay into a fresh table",
        description="Rewind a stopped consumer group so its events are processed again.",
    )
    p.add_argument("--group", required=True, help="consumer group id")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-offset", type=int, help="next offset to process, per partition")
    where.add_argument(
        "--to-timestamp",
        help="epoch ms or ISO 8601 time: replay from the first event at or after it",
    )
    p.add_argument(
        "--topic", action="append", default=[], help="topic (repeatable; default: the group's)"
    )
    p.add_argument("--partition", type=int, default=None, help="only this partition")
    p.add_argument("--dsn", default=None, help="PostgreSQL DSN ($SPR_DSN)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers ($SPR_BOOTSTRAP)")
    p.add_argument("--table", default="spr_entity_state", help="the state table")
    p.add_argument("--offsets-table", default="spr_offsets", help="the offsets table")
    p.add_argument(
        "--into",
        default=None,
        metavar="TABLE",
        help="replay into a new table (created like --table) under group <group>.replay.TABLE",
    )
    p.add_argument("--dry-run", action="store_true", help="show the new positions, change nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_kafka_options(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        plan = rewind(
            args.group,
            to_offset=args.to_offset,
            to_timestamp_ms=(
                None if args.to_timestamp is None else parse_timestamp_ms(args.to_timestamp)
            ),
            topics=args.topic,
            partition=args.partition,
            dsn=args.dsn,
            bootstrap=args.bootstrap,
            kafka=kafka_settings(args),
            table=args.table,
            offsets_table=args.offsets_table,
            into=args.into,
            dry_run=args.dry_run,
        )
    except psycopg.Error as exc:
        raise ConfigError(
            f"PostgreSQL refused the replay: {redact(str(exc).splitlines()[0])}"
        ) from exc
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0
    verb = "would set" if plan.dry_run else "set"
    for (topic, partition), offset in sorted(plan.positions.items()):
        before = plan.previous.get((topic, partition))
        was = "none" if before is None else str(before)
        print(f"{verb} {plan.target_group} {topic}[{partition}]: {was} -> {offset}")
    for note in plan.notes:
        print(f"note: {note}")
    if plan.command:
        print(f"{'then run' if not plan.dry_run else 'would then run'}: {plan.command}")
    return 0
