"""``spr plan``: partitions for a target throughput."""

from __future__ import annotations

import argparse
import json

from spr.cli.options import (
    add_kafka_options,
    add_verbose_option,
    kafka_settings,
    require_database,
    require_kafka,
    resolve_bootstrap,
)
from spr.config.defaults import default_dsn
from spr.ops.plan import (
    DEFAULT_HEADROOM,
    DEFAULT_MEASURE_EVENTS,
    Measurement,
    check_measure_events,
    measure_partition_throughput,
    plan_partitions,
)

# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "plan",
        help="partition count for a target throughput: ceil(X / Y) plus headroom",
        description="Partition count for a target throughput, with the reasoning. "
        "Y is given (--partition-throughput) or measured on the servers (--measure).",
    )
    p.add_argument(
        "--target-throughput",
        type=float,
        required=True,
        metavar="X",
        help="events/s the topic must carry",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--partition-throughput", type=float, metavar="Y", help="events/s one partition sustains"
    )
    source.add_argument(
        "--measure",
        action="store_true",
        help="measure the partition throughput on the servers: writes --measure-events "
        "events to a temporary topic and table, reads them back through spr's path, "
        "then removes both (about 10 s at the default size)",
    )
    p.add_argument(
        "--measure-events",
        type=int,
        default=DEFAULT_MEASURE_EVENTS,
        metavar="N",
        help="how many events --measure writes and reads back (at least 1,000; fewer "
        "finish sooner but time more start-up)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=DEFAULT_HEADROOM,
        metavar="FRACTION",
        help="spare capacity as a fraction",
    )
    p.add_argument(
        "--bootstrap",
        default=None,
        metavar="B",
        help="Kafka for --measure (default $SPR_BOOTSTRAP or 127.0.0.1:9092; "
        "-X bootstrap.servers wins)",
    )
    p.add_argument(
        "--dsn",
        default=None,
        metavar="D",
        help="PostgreSQL for --measure (default $SPR_DSN or the local dev stack)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (default: text)")
    add_kafka_options(p)
    add_verbose_option(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    measurement: Measurement | None = None
    if args.measure:
        # Validate the cheap arguments, then both servers, before measuring.
        plan_partitions(args.target_throughput, 1.0, headroom=args.headroom)
        check_measure_events(args.measure_events)
        settings = kafka_settings(args)
        bootstrap = resolve_bootstrap(args.bootstrap, settings)
        dsn = args.dsn or default_dsn()
        require_kafka(bootstrap, settings)
        require_database(dsn)
        measurement = measure_partition_throughput(
            bootstrap=bootstrap, dsn=dsn, events=args.measure_events, kafka=settings
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
