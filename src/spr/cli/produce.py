"""``spr produce: the load generator.``"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from spr.cli.options import (
    add_verbose_option,
    parse_kafka_overrides,
    require_writable,
    resolve_bootstrap,
)
from spr.cli.tracing import add_otel_options, tracing_options, tracing_session
from spr.dev.loadgen import DEFAULT_PARTITIONS, LoadSpec, produce
from spr.errors import ConfigError

# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = subparsers.add_parser(
        "produce",
        help="generate deterministic entity events onto a topic (load generator)",
        description="Generate deterministic entity state events and send them with "
        "spr's producer (routing key, headers, idempotence). Creates the topic when "
        "it is missing.",
    )
    cmd.add_argument("--topic", required=True, metavar="T", help="topic to produce to")
    cmd.add_argument("--count", type=int, required=True, metavar="N", help="messages to send")
    cmd.add_argument("--entities", type=int, default=10_000, metavar="K", help="distinct entities")
    cmd.add_argument("--seed", type=int, default=0, metavar="S", help="same seed, same events")
    cmd.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="max messages per second (default: as fast as the broker takes them)",
    )
    cmd.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        metavar="P",
        help="partitions when the topic is created (an existing topic keeps its own)",
    )
    cmd.add_argument(
        "--bootstrap",
        default=None,
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092; "
        "-X bootstrap.servers wins)",
    )
    cmd.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of events sent a second time (same identity)",
    )
    cmd.add_argument(
        "--stale",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of events re-sent later with an older sequence",
    )
    cmd.add_argument(
        "--aliases",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of events using the accepted field aliases (entityType, status, ...)",
    )
    cmd.add_argument(
        "--value-size",
        type=int,
        default=200,
        metavar="BYTES",
        help="approximate size of each message value",
    )
    cmd.add_argument(
        "--manifest",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the expected final state per entity as JSON (default: none; the "
        "path is checked before anything is sent)",
    )
    cmd.add_argument(
        "-X",
        "--producer-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka producer setting; overrides spr's defaults (repeatable; default: none)",
    )
    cmd.add_argument(
        "--progress",
        action="store_true",
        help="progress bar even without a TTY (default: only on a TTY)",
    )
    cmd.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    add_otel_options(cmd, links=False)
    add_verbose_option(cmd)
    cmd.set_defaults(func=_main)


def _progress_bar(stream: TextIO) -> Callable[[int, int, float], None]:
    def show(done: int, total: int, elapsed: float) -> None:
        fraction = done / total if total else 1.0
        filled = int(fraction * 30)
        rate = done / elapsed if elapsed > 0 else 0.0
        stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} "
            f"{done:,}/{total:,} events  {rate:,.0f} ev/s"
        )
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show


def _main(args: argparse.Namespace) -> int:
    producer_config = parse_kafka_overrides(args.producer_config)
    bootstrap = resolve_bootstrap(args.bootstrap, producer_config)
    spec = LoadSpec(
        count=args.count,
        entities=args.entities,
        seed=args.seed,
        duplicates=args.duplicates,
        stale=args.stale,
        aliases=args.aliases,
        value_size=args.value_size,
    )
    if args.partitions < 1:
        raise ConfigError(f"--partitions must be >= 1, got {args.partitions}")
    if args.manifest is not None:
        require_writable(args.manifest)
    tracing_options(args)
    show = args.progress or sys.stderr.isatty()
    with tracing_session(args.otel, "spr-produce"):
        report = produce(
            spec,
            topic=args.topic,
            bootstrap=bootstrap,
            partitions=args.partitions,
            rate=args.rate,
            producer_config=producer_config,
            manifest_path=args.manifest,
            progress=_progress_bar(sys.stderr) if show else None,
            tracing=args.otel,
        )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        created = " (created)" if report.topic_created else ""
        print(
            f"topic {report.topic}{created}, {report.partitions} partitions\n"
            f"events      {report.events:,} in {report.elapsed_s:.2f} s "
            f"= {report.events_per_s:,.0f} events/s\n"
            f"delivered   {report.records:,}\n"
            f"errors      {report.errors:,}\n"
            f"new         {report.new:,}\n"
            f"duplicates  {report.duplicates:,}\n"
            f"stale       {report.stale:,}"
        )
    if report.errors:
        print(
            f"spr produce: {report.errors:,} messages were not delivered; the first "
            f"failed with: {report.first_error}",
            file=sys.stderr,
        )
        return 1
    return 0
