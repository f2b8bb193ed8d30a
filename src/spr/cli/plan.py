"""``spr plan: partitions for a target throughput.``"""

from __future__ import annotations

import argparse
import json

from spr.config.defaults import default_bootstrap, default_dsn
from spr.ops.plan import (
    DEFAULT_HEADROOM,
    Measurement,
    measure_partition_throughput,
    plan_partitions,
)

# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="partition count for a target throughput: ceil(X / Y) plus headroom",
        description="Partition count for a target throughput, with the reasoning.",
    )
    p.add_argument(
        "--target-throughput", type=float, required=True, help="events/s the topic must carry"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--partition-throughput", type=float, help="events/s one partition sustains"
    )
    source.add_argument(
        "--measure",
        action="store_true",
        help="measure the partition throughput on the local stack (about 10 s)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        help="spare capacity as a fraction (default 0.3)",
    )
    p.add_argument("--bootstrap", default=None, help="Kafka for --measure ($SPR_BOOTSTRAP)")
    p.add_argument("--dsn", default=None, help="PostgreSQL for --measure ($SPR_DSN)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    measurement: Measurement | None = None
    if args.measure:
        # Validate the cheap arguments before spending ten seconds measuring.
        plan_partitions(args.target_throughput, 1.0, headroom=args.headroom)
        measurement = measure_partition_throughput(
            bootstrap=args.bootstrap or default_bootstrap(),
            dsn=args.dsn or default_dsn(),
        )
        partition_throughput = measurement.events_per_second
    else:
        partition_throughput = args.partition_throughput
    plan = plan_partitions(
        args.target_throughput,
        partition_throughput,
        headroom=args.headroom,
        measurement=measurement,
    )
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        for line in plan.reasoning:
            print(f"- {line}")
        print(f"partitions: {plan.partitions}")
    return 0
