"""``spr bench``: the end-to-end benchmark, with verification."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spr.cli.options import add_verbose_option, require_database, require_kafka, require_writable


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from spr.bench.options import SCENARIOS, SKIPPABLE

    cmd = subparsers.add_parser(
        "bench",
        help="end-to-end benchmark with verification, against the alternatives",
        description="Produce N events once, run spr and the alternatives on them, verify "
        "each table against the expected state, and report events/s, ratios, latency "
        "and peak RSS. --scenario transform does the same for spr transform against a "
        "plain consume -> produce loop and Quix Streams' exactly-once mode, verifying "
        "each output topic.",
    )
    cmd.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="state",
        help="backlog: spr run against the alternatives on a backlog that collapses; "
        "live: one event per entity (nothing to collapse) against the ceilings on the same "
        "rows; latency: a steady --latency-rate, broker append -> commit percentiles; "
        "state: backlog, then latency; transform: spr transform against its ceiling and "
        "Quix's exactly-once mode; soak: --latency-rate for --soak-minutes, spr's RSS over "
        "time; all: every scenario but soak (default: state)",
    )
    cmd.add_argument(
        "--events", type=int, default=1_000_000, metavar="N", help="events to produce and consume"
    )
    cmd.add_argument("--entities", type=int, default=100_000, metavar="K", help="distinct entities")
    cmd.add_argument(
        "--partitions", type=int, default=12, metavar="P", help="partitions of the bench topic"
    )
    cmd.add_argument(
        "--duplicates",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="share of events sent twice (the idempotency ring drops them)",
    )
    cmd.add_argument(
        "--stale",
        type=float,
        default=0.02,
        metavar="FRACTION",
        help="share of events re-sent with an older sequence (the guard ignores them)",
    )
    cmd.add_argument("--seed", type=int, default=0, help="same seed, same events")
    cmd.add_argument("--workers", type=int, default=1, metavar="N", help="spr processes")
    cmd.add_argument(
        "--flush-connections",
        type=int,
        metavar="N",
        help="flush connections per spr process (default: spr run's, see "
        "spr run --flush-connections)",
    )
    cmd.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="latency mode only: produce a steady R events/s while spr consumes "
        "(default: the full comparison)",
    )
    cmd.add_argument(
        "--latency-rate",
        type=float,
        default=10_000.0,
        metavar="R",
        help="rate of the latency phase of a full run, events/s",
    )
    cmd.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="how long the latency phase produces",
    )
    cmd.add_argument(
        "--soak-minutes",
        type=float,
        default=30.0,
        metavar="M",
        help="how long --scenario soak produces at --latency-rate, sampling spr's RSS",
    )
    cmd.add_argument(
        "--skip",
        default="",
        metavar="LIST",
        help=f"comma-separated contenders to leave out: {', '.join(SKIPPABLE)} (default: none)",
    )
    cmd.add_argument(
        "--skip-quix", action="store_true", help="same as --skip quix (default: run it)"
    )
    cmd.add_argument(
        "--antipattern-events",
        type=int,
        default=10_000,
        metavar="N",
        help="events the one-insert-per-message anti-pattern processes (it is slow)",
    )
    cmd.add_argument(
        "--batch-max-rows",
        type=int,
        default=None,
        metavar="N",
        help="spr's batch row cap (default: the engine's, 40,000)",
    )
    cmd.add_argument(
        "--batch-max-age-ms",
        type=int,
        default=None,
        metavar="MS",
        help="spr's batch age cap (default: the engine's, 200)",
    )
    cmd.add_argument(
        "--bootstrap",
        default=None,
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)",
    )
    cmd.add_argument(
        "--dsn",
        default=None,
        metavar="D",
        help="PostgreSQL DSN (default $SPR_DSN or the local dev stack)",
    )
    cmd.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the report as JSON (default: none)",
    )
    cmd.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="draw the rates and latency as PNG (default: none)",
    )
    cmd.add_argument(
        "--keep", action="store_true", help="keep topics and tables (debugging; default: drop)"
    )
    cmd.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines (default: progress)"
    )
    add_verbose_option(cmd)
    cmd.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from spr.bench import harness, report
    from spr.config.defaults import default_bootstrap, default_dsn
    from spr.dev.loadgen import LoadSpec
    from spr.errors import ConfigError

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip_quix:
        skip.add("quix")
    options = harness.BenchOptions(
        bootstrap=args.bootstrap or default_bootstrap(),
        dsn=args.dsn or default_dsn(),
        events=args.events,
        entities=args.entities,
        partitions=args.partitions,
        duplicates=args.duplicates,
        stale=args.stale,
        seed=args.seed,
        workers=args.workers,
        flush_connections=args.flush_connections,
        skip=frozenset(skip),
        latency_only=args.rate is not None,
        latency_rate=args.rate if args.rate is not None else args.latency_rate,
        latency_seconds=args.latency_seconds,
        soak_seconds=args.soak_minutes * 60.0,
        antipattern_events=args.antipattern_events,
        batch_max_rows=args.batch_max_rows,
        batch_max_age_ms=args.batch_max_age_ms,
        keep=args.keep,
        scenario=args.scenario,
    )
    # Every argument, then both servers, before the bench creates anything.
    LoadSpec(
        count=options.events,
        entities=options.entities,
        seed=options.seed,
        duplicates=options.duplicates,
        stale=options.stale,
        value_size=options.value_size,
    )
    if args.plot is not None and not (
        options.runs_backlog or options.runs_latency or options.runs_soak
    ):
        raise ConfigError(
            "--plot draws the backlog scenario's rates and the latency; the "
            f"{options.scenario} scenario has no picture: use --scenario state or all, "
            "or leave --plot out"
        )
    for path in (args.json, args.plot):
        if path is not None:
            require_writable(path)
    require_kafka(options.bootstrap)
    if options.runs_state:  # the transform scenario needs Kafka only
        require_database(options.dsn)

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"spr bench: {text}", file=sys.stderr, flush=True)

    series: dict[str, object] = {}
    document = harness.run_bench(options, progress=progress, series=series)
    document["command"] = "spr bench " + " ".join(sys.argv[2:])
    if args.json is not None:
        harness.write_json(document, args.json)
    if args.plot is not None:
        from spr.bench import plot

        plot.draw(document, series, args.plot)
    print(report.format_report(document))
    return 0 if document["ok"] else 1
