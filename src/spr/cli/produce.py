"""``spr produce: the load generator.``"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from spr.cli.options import parse_kafka_overrides
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
    cmd.add_argument("--topic", required=True)
    cmd.add_argument("--count", type=int, required=True, help="messages to send")
    cmd.add_argument("--entities", type=int, default=10_000, help="distinct entities")
    cmd.add_argument("--seed", type=int, default=0, help="same seed, same events")
    cmd.add_argument("--rate", type=float, default=None, help="max messages per second")
    cmd.add_argument(
        "--partitions",
        type=int,
        default=DEFAULT_PARTITIONS,
        help=f"partitions when the topic is created (default {DEFAULT_PARTITIONS})",
    )
    cmd.add_argument(
        "--bootstrap",
        default=None,
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)",
    )
    cmd.add_argument("--duplicates", type=float, default=0.0, metavar="FRACTION")
    cmd.add_argument("--stale", type=float, default=0.0, metavar="FRACTION")
    cmd.add_argument("--aliases", type=float, default=0.0, metavar="FRACTION")
    cmd.add_argument("--value-size", type=int, default=200, metavar="BYTES")
    cmd.add_argument("--manifest", type=Path, default=None, metavar="FILE")
    cmd.add_argument(
        "-X",
        "--producer-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka producer setting; overrides spr's defaults (repeatable)",
    )
    cmd.add_argument("--progress", action="store_true", help="progress bar even without a TTY")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
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
    from spr.config.defaults import default_bootstrap

    bootstrap = args.bootstrap or default_bootstrap()
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
    show = args.progress or sys.stderr.isatty()
    report = produce(
        spec,
        topic=args.topic,
        bootstrap=bootstrap,
        partitions=args.partitions,
        rate=args.rate,
        producer_config=parse_kafka_overrides(args.producer_config),
        manifest_path=args.manifest,
        progress=_progress_bar(sys.stderr) if show else None,
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
