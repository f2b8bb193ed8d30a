"""``spr lag: a group's lag per partition.``"""

from __future__ import annotations

import argparse
import json

from spr.cli.options import add_kafka_options, kafka_settings
from spr.ops.lag import DEFAULT_MAX_RETENTION_FRACTION, LagReport, measure_lag


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "lag",
        help="a consumer group's lag per partition, in messages and as a share of retention",
        description="Lag per partition from Kafka's group offsets; exits 1 above a threshold.",
    )
    p.add_argument("--group", required=True, help="consumer group id")
    p.add_argument(
        "--topic", action="append", default=[], help="topic (repeatable; default: the group's)"
    )
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers ($SPR_BOOTSTRAP)")
    p.add_argument("--max-lag", type=int, default=None, help="fail when a partition lags more")
    p.add_argument(
        "--max-retention-fraction",
        type=_fraction_or_none,
        default=DEFAULT_MAX_RETENTION_FRACTION,
        help="fail when the oldest unread message is older than this share of retention.ms "
        "(default 0.8; 'none' disables)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_kafka_options(p)
    p.set_defaults(func=_main)


def _fraction_or_none(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    report = measure_lag(
        args.group,
        topics=args.topic,
        bootstrap=args.bootstrap,
        kafka=kafka_settings(args),
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
