"""``spr replay``: rewind a group, or rebuild state into a fresh table.

Without ``--into`` the group's stored positions (database and Kafka) are set back; its
next ``spr run`` processes the events again, and the sequence guard keeps rows that are
already newer. ``--into TABLE`` sets up a rebuild: a table like the state table is
created empty and the derived group ``<group>.replay.<TABLE>`` is positioned; the
command then prints the ``spr run`` command that performs the replay. With ``--run`` it
performs it here instead, through ``spr run``'s code path (the engine), until the group
has no lag and nothing new arrived for ``--idle-exit`` seconds, and then exits.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import psycopg

from spr.cli.options import (
    add_kafka_options,
    add_verbose_option,
    kafka_settings,
    resolve_bootstrap,
)
from spr.config.defaults import default_dsn
from spr.config.loading import check_dsn
from spr.errors import ConfigError
from spr.logs import redact
from spr.ops.replay import ReplayPlan, parse_timestamp_ms, rewind

__all__ = ["register"]

_DEFAULT_IDLE_EXIT_S = 2.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "replay",
        help="rewind a group's offsets (database and Kafka), or rebuild state into a new table",
        description="Rewind a stopped consumer group so that its next run processes the "
        "events again. With --into, set up a rebuild of the state into a new, empty "
        "table and print the spr run command that performs it; with --into and --run, "
        "perform it here, to the end of the topics, and then exit.",
    )
    p.add_argument("--group", required=True, metavar="G", help="consumer group id")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--to-offset", type=int, metavar="N", help="next offset to process, per partition"
    )
    where.add_argument(
        "--to-timestamp",
        metavar="TIME",
        help="epoch ms or ISO 8601 time: replay from the first event at or after it",
    )
    p.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="T",
        help="topic (repeatable; default: every topic the group has stored offsets for)",
    )
    p.add_argument(
        "--partition",
        type=int,
        default=None,
        metavar="P",
        help="only this partition (default: all)",
    )
    p.add_argument(
        "--dsn",
        default=None,
        metavar="D",
        help="PostgreSQL DSN (default $SPR_DSN or the local dev stack)",
    )
    p.add_argument(
        "--bootstrap",
        default=None,
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092; "
        "-X bootstrap.servers wins)",
    )
    p.add_argument("--table", default="spr_entity_state", metavar="X", help="the state table")
    p.add_argument("--offsets-table", default="spr_offsets", metavar="X", help="the offsets table")
    p.add_argument(
        "--into",
        default=None,
        metavar="TABLE",
        help="set up a rebuild into this new table (created empty, like --table) under the "
        "group <group>.replay.TABLE and print the spr run command that performs it "
        "(default: rewind the group itself)",
    )
    p.add_argument(
        "--run",
        action="store_true",
        help="with --into: perform the rebuild here, through spr run's engine, and exit "
        "once it reached the end (default: only print the spr run command)",
    )
    p.add_argument(
        "--idle-exit",
        type=float,
        default=_DEFAULT_IDLE_EXIT_S,
        metavar="SECONDS",
        help="with --run: finish once the replay group has no lag and nothing arrived "
        "for this long",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the new positions, change nothing (default: apply them)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")
    add_kafka_options(p)
    add_verbose_option(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.to_offset is not None and args.to_offset < 0:
        raise ConfigError(f"--to-offset must be >= 0, got {args.to_offset}")
    if args.partition is not None and args.partition < 0:
        raise ConfigError(f"--partition must be >= 0, got {args.partition}")
    if not args.idle_exit > 0:
        raise ConfigError(f"--idle-exit must be a positive number of seconds, got {args.idle_exit}")
    if args.into is None and args.run:
        raise ConfigError("--run only applies to --into (a rebuild into a new table)")
    to_timestamp_ms = None if args.to_timestamp is None else parse_timestamp_ms(args.to_timestamp)
    dsn = check_dsn(args.dsn or default_dsn())
    settings = kafka_settings(args)
    bootstrap = resolve_bootstrap(args.bootstrap, settings)
    try:
        plan = rewind(
            args.group,
            to_offset=args.to_offset,
            to_timestamp_ms=to_timestamp_ms,
            topics=args.topic,
            partition=args.partition,
            dsn=dsn,
            bootstrap=bootstrap,
            kafka=settings,
            table=args.table,
            offsets_table=args.offsets_table,
            into=args.into,
            dry_run=args.dry_run,
        )
    except psycopg.Error as exc:
        raise ConfigError(
            f"PostgreSQL refused the replay: {redact(str(exc).splitlines()[0])}"
        ) from exc
    run_it = plan.into is not None and not plan.dry_run and args.run
    if args.json:
        document = plan.as_dict()
        if run_it:
            document["stats"] = _replay(plan, args, dsn=dsn, bootstrap=bootstrap, kafka=settings)
        print(json.dumps(document, indent=2))
        return 0
    verb = "would set" if plan.dry_run else "set"
    for (topic, partition), offset in sorted(plan.positions.items()):
        before = plan.previous.get((topic, partition))
        was = "none" if before is None else str(before)
        print(f"{verb} {plan.target_group} {topic}[{partition}]: {was} -> {offset}")
    for note in plan.notes:
        print(f"note: {note}")
    if run_it:
        _replay(plan, args, dsn=dsn, bootstrap=bootstrap, kafka=settings)
        print(f"replayed into {plan.into} as group {plan.target_group}")
    elif plan.command:
        print(f"{'then run' if not plan.dry_run else 'would then run'}: {plan.command}")
    return 0


def _replay(
    plan: ReplayPlan,
    args: argparse.Namespace,
    *,
    dsn: str,
    bootstrap: str,
    kafka: Mapping[str, str],
) -> dict[str, Any]:
    """Run the replay ``plan`` set up: ``spr run``'s engine on the derived group, into the
    new table, until it is idle with no lag. Returns the final counters; the summary line
    goes to stderr. Raises SprError with one sentence."""
    from spr.cli.run import check_engine_servers, run_engine
    from spr.config import EngineConfig, TableMapping

    assert plan.into is not None
    topics = tuple(dict.fromkeys(topic for topic, _ in sorted(plan.positions)))
    config = EngineConfig(
        group_id=plan.target_group,
        topics=topics,
        bootstrap=bootstrap,
        dsn=dsn,
        mapping=TableMapping(table=plan.into, offsets_table=args.offsets_table),
        kafka=dict(kafka),
        idle_exit_s=args.idle_exit,
    )
    check_engine_servers(config)
    stats: dict[str, Any] = {}
    run_engine(config, command="replay", stats_sink=stats)
    return stats
