"""``spr transform``: the routing stage (design §10), exactly once with Kafka transactions.

``spr transform --topic SRC [--topic SRC2 ...] --group G --output-topic DST`` reads any
producer's events from the source topics and writes the canonical event, keyed by its
partition key, to ``partition_for(key, N)`` of DST (created with ``--output-partitions``
partitions when missing), until SIGTERM/SIGINT, ``--max-events`` or ``--idle-exit``.
Invalid and unorderable events go to ``<topic>.dlq`` inside the same transaction. A
missing server, a bad setting or a fenced producer ends it with one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from spr.cli.options import (
    add_kafka_options,
    add_verbose_option,
    kafka_settings,
    require_writable,
    resolve_bootstrap,
    run_until_stopped,
)
from spr.cli.tracing import add_otel_options, otel_argv, tracing_options, tracing_session
from spr.cli.workers import run_workers
from spr.config.transform import TransformConfig
from spr.errors import ConfigError
from spr.logs import configure_logging

__all__ = ["register"]

log = logging.getLogger("spr.cli.transform")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "transform",
        help="re-key any producer's events into a canonical, correctly partitioned topic",
        description="Read any producer's events, normalise them and write each to the "
        "partition its key maps to, exactly once with Kafka transactions.",
    )
    p.add_argument("--topic", action="append", dest="topics", metavar="SRC", required=True,
                   help="source topic (repeatable)")  # fmt: skip
    p.add_argument("--group", required=True, metavar="G", help="consumer group id")
    p.add_argument("--output-topic", required=True, metavar="DST", help="the canonical topic")
    p.add_argument(
        "--output-partitions",
        type=int,
        metavar="N",
        help="partitions of DST: created with N when missing (default 12), must match when "
        "it exists (default: its own count)",
    )
    p.add_argument("--bootstrap", metavar="B",
                   help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)")  # fmt: skip
    p.add_argument("--dlq-topic", metavar="T",
                   help="dead-letter topic (default <topic>.dlq; {topic} is the source topic)")  # fmt: skip
    p.add_argument("--no-dlq", dest="dead_letters", action="store_false",
                   help="no dead letters: stop at the first invalid event (default: dead letters on)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="transform processes in the group (default 1)")  # fmt: skip
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--transactional-id", metavar="ID",
                   help="this worker's transactional.id (default "
                   "spr-transform.<group>.<host>.<worker>)")  # fmt: skip
    p.add_argument("--max-records", type=int, metavar="N",
                   help="commit a transaction at N records (default 20,000)")  # fmt: skip
    p.add_argument("--max-age-ms", type=int, metavar="MS",
                   help="commit a transaction this old (default 100)")  # fmt: skip
    p.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="exit 0 once nothing arrived for this long and the group has "
                   "committed every source partition to its end (default: run until stopped)")  # fmt: skip
    p.add_argument("--max-events", type=int, metavar="N",
                   help="stop after taking N messages, per worker (default: no limit)")  # fmt: skip
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="serve Prometheus metrics on this port (default: no endpoint)")  # fmt: skip
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address of the metrics endpoint (default 127.0.0.1)")  # fmt: skip
    p.add_argument(
        "--stats", metavar="FILE", help="write the final counters as JSON (default: none)"
    )
    add_kafka_options(p)
    add_otel_options(p, links=False)
    add_verbose_option(p)
    p.set_defaults(func=_main)


def _config(args: argparse.Namespace) -> TransformConfig:
    if not args.dead_letters and args.dlq_topic is not None:
        raise ConfigError(
            "--no-dlq turns dead letters off, so --dlq-topic has nowhere to apply; pass one "
            "or the other"
        )
    kafka = kafka_settings(args)
    optional = {
        "output_partitions": args.output_partitions,
        "transactional_id": args.transactional_id,
        "max_records": args.max_records,
        "max_age_ms": args.max_age_ms,
        "idle_exit_s": args.idle_exit,
        "max_events": args.max_events,
        "dlq_topic": args.dlq_topic,
    }
    return TransformConfig(
        group_id=args.group,
        topics=tuple(args.topics),
        output_topic=args.output_topic,
        bootstrap=resolve_bootstrap(args.bootstrap, kafka),
        kafka=kafka,
        dead_letters=args.dead_letters,
        workers=args.workers,
        worker=args.worker or 0,
        **{k: v for k, v in optional.items() if v is not None},
    )


def _main(args: argparse.Namespace) -> int:
    configure_logging(json=False, level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("spr.kafka").setLevel(logging.INFO if args.verbose else logging.CRITICAL + 1)
    args.is_worker = args.worker is not None
    tracing_options(args)
    config = _config(args)
    if args.stats:
        require_writable(args.stats)
    from spr.kafka.clients import check_settings

    check_settings(config.consumer_config())
    if config.workers > 1 and not args.is_worker:
        return run_workers("transform", config.workers, lambda i: _child_argv(args, i))
    return _run(config, args)


def _run(config: TransformConfig, args: argparse.Namespace) -> int:
    from spr.metrics import MetricsPublisher, SprMetrics, serve
    from spr.transform import Transformer

    server = publisher = None
    if args.metrics_port is not None:
        metrics = SprMetrics()
        server = serve(args.metrics_port + config.worker if args.metrics_port else 0,
                       args.metrics_addr, registry=metrics.registry)  # fmt: skip
        publisher = MetricsPublisher(metrics)
    transformer = Transformer(config, metrics=publisher, tracing=args.otel)

    with tracing_session(args.otel, "spr-transform"):
        stats, wall = run_until_stopped(transformer.run, transformer.stop, server=server)
    if args.stats:
        Path(args.stats).write_text(json.dumps({**stats.as_dict(), "wall_s": wall}))
    active = stats.active_s
    timing = (
        f"in {wall:.1f} s" if active is None else f"in {active:.2f} s of work, {wall:.1f} s in all"
    )
    print(
        f"spr transform: took {stats.consumed} event(s) {timing}: {stats.produced} written to "
        f"{config.output_topic}, {stats.duplicate} duplicate, {stats.invalid} invalid, "
        f"{stats.unorderable} unorderable; {stats.transactions} transaction(s), "
        f"{stats.aborts} aborted",
        file=sys.stderr,
    )
    return 0


def _child_argv(args: argparse.Namespace, index: int) -> list[str]:
    argv = [sys.executable, "-m", "spr", "transform", "--worker", str(index)]
    for topic in args.topics:
        argv += ["--topic", topic]
    options = {
        "--group": args.group,
        "--output-topic": args.output_topic,
        "--output-partitions": args.output_partitions,
        "--bootstrap": args.bootstrap,
        "--dlq-topic": args.dlq_topic,
        "--workers": args.workers,
        "--transactional-id": (
            f"{args.transactional_id}.{index}" if args.transactional_id else None
        ),
        "--max-records": args.max_records,
        "--max-age-ms": args.max_age_ms,
        "--idle-exit": args.idle_exit,
        "--max-events": args.max_events,
        # One endpoint per worker: consecutive ports (0 lets each pick a free one).
        "--metrics-port": args.metrics_port,
        "--metrics-addr": args.metrics_addr if args.metrics_port is not None else None,
        "--stats": f"{args.stats}.{index}" if args.stats else None,
    }
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if not args.dead_letters:
        argv.append("--no-dlq")
    if args.verbose:
        argv.append("-v")
    for item in args.kafka:
        argv += ["-X", item]
    argv += otel_argv(args)
    return argv
