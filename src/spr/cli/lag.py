"""``spr lag``: a group's lag per partition."""

from __future__ import annotations

import argparse
import json

from spr.cli.options import (
    add_kafka_options,
    add_verbose_option,
    kafka_settings,
    resolve_bootstrap,
)
from spr.ops.lag import DEFAULT_MAX_RETENTION_FRACTION, LagReport, measure_lag


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "lag",
        help="a consumer group's lag per partition, in messages and as a share of retention",
        description="Lag per partition from Kafka's group offsets; exits 1 above a threshold.",
    )
    p.add_argument("--group", required=True, metavar="G", help="consumer group id")
    p.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="T",
        help="topic (repeatable; default: every topic the group has offsets for)",
    )
    p.add_argument(
        "--bootstrap",
        default=None,
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092; "
        "-X bootstrap.servers wins)",
    )
    p.add_argument(
        "--max-lag",
        type=int,
        default=None,
        metavar="N",
        help="fail when a partition lags more than N messages (default: no limit)",
    )
    p.add_argument(
        "--max-retention-fraction",
        type=_fraction_or_none,
        default=DEFAULT_MAX_RETENTION_FRACTION,
        metavar="F",
        help="fail when the oldest unread message is older than this share of retention.ms "
        "(default 0.8; 'none' disables)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    add_kafka_options(p)
    add_verbose_option(p)
    p.set_defaults(func=_main)


def _fraction_or_none(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    settings = kafka_settings(args)
    bootstrap = resolve_bootstrap(args.bootstrap, settings)
    report = measure_lag(
        args.group,
        topics=args.topic,
        bootstrap=bootstrap,
        kafka=settings,
        max_lag=args.max_lag,
        max_retention_fraction=args.max_retention_fraction,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_table(report)
    return 1 if report.violations() else 0


def _print_table(report: LagReport) -> None:
    header = (
        "topic",
        "partition",
        "committed",
        "log_start",
        "end",
        "lag",
        "oldest_age_s",
        "of_retention",
    )
    rows = [header]
    for p in report.partitions:
        rows.append(
            (
                p.topic,
                str(p.partition),
                "-" if p.committed is None else str(p.committed),
                str(p.log_start),
                str(p.end),
                str(p.lag),
                "-" if p.oldest_age_s is None else f"{p.oldest_age_s:.1f}",
                "-" if p.retention_fraction is None else f"{p.retention_fraction:.1%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print(f"group {report.group}: total lag {report.total_lag}")
    for line in report.violations():
        print(f"over threshold: {line}")
