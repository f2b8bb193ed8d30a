"""``spr run`` (the consumer engine) and ``spr db init`` (the tables), design §8.

``spr run --topic T [--topic T2 ...] --group G`` consumes into PostgreSQL until SIGTERM
or SIGINT (then it flushes, commits and exits 0), until ``--max-events`` messages, or,
with ``--idle-exit S``, until nothing new arrived for S seconds and every partition of
its topics is applied up to its end offset. ``--workers N`` runs N engine processes in
the same group; the parent forwards signals and exits non-zero if any worker failed.

Invalid events, and rows PostgreSQL rejects for their content, go to the dead-letter
topic ``<topic>.dlq`` (``--dlq-topic``; ``--no-dlq`` turns dead letters off explicitly).
When it cannot be written the command stops with exit code 2, and no offset is
committed past the event. ``--metrics-port P`` serves Prometheus metrics on
``http://127.0.0.1:P/metrics`` (``--metrics-addr`` to change the address); ``--log-json``
writes one JSON object per log line.

Settings come from ``--config FILE.toml``, then ``SPR_*`` variables, then flags (flags
win); ``-X key=value`` passes librdkafka settings through to the consumer. A missing
server or a bad setting ends the command with one sentence and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from spr.cli.options import add_table_options, parse_kafka_overrides
from spr.config import load_engine_config
from spr.logs import configure_logging

__all__ = ["register"]

log = logging.getLogger("spr.cli.run")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        help="consume topics into PostgreSQL, exactly once",
        description="Consume entity state changes from Kafka into PostgreSQL, exactly once.",
    )
    run.add_argument(
        "--topic", action="append", dest="topics", metavar="T", help="topic to consume (repeatable)"
    )
    run.add_argument("--group", dest="group_id", metavar="G", help="consumer group id")
    add_table_options(run)
    run.add_argument(
        "--workers", type=int, metavar="N", help="engine processes to run in the group (default 1)"
    )
    run.add_argument(
        "--idle-exit",
        dest="idle_exit_s",
        type=float,
        metavar="SECONDS",
        help="exit 0 once idle this long with every partition applied",
    )
    run.add_argument(
        "--max-events", type=int, metavar="N", help="stop after consuming N messages (per worker)"
    )
    run.add_argument(
        "--bootstrap",
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)",
    )
    run.add_argument(
        "--auto-create-schema",
        action="store_true",
        default=None,
        help="create the tables when missing instead of failing",
    )
    run.add_argument(
        "-X",
        dest="kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka consumer setting (repeatable; wins over spr's defaults)",
    )
    run.add_argument("--batch-max-rows", type=int, metavar="N", help="flush at N rows")
    run.add_argument("--batch-max-age-ms", type=int, metavar="MS", help="flush at this age")
    run.add_argument("--stats", metavar="FILE", help="write the final counters as JSON")
    run.add_argument(
        "--dlq-topic",
        metavar="T",
        help="dead-letter topic (default <topic>.dlq; {topic} is replaced by the source topic)",
    )
    run.add_argument(
        "--no-dlq",
        dest="dead_letters",
        action="store_false",
        default=None,
        help="turn dead letters off: invalid events are only counted, rejected rows stop the run",
    )
    run.add_argument(
        "--on-offset-gap",
        choices=("fail", "earliest", "latest"),
        help="when retention deleted unapplied events: stop (default) or skip the gap",
    )
    run.add_argument(
        "--metrics-port", type=int, metavar="P", help="serve Prometheus metrics on this port"
    )
    run.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default 127.0.0.1)",
    )
    run.add_argument("--log-json", action="store_true", help="log JSON lines (INFO and up)")
    run.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    run.set_defaults(func=_run)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "topics": tuple(args.topics) if args.topics else None,
        "group_id": args.group_id,
        "dsn": args.dsn,
        "bootstrap": args.bootstrap,
        "table": args.table,
        "mapping_preset": args.mapping_preset,
        "workers": args.workers,
        "idle_exit_s": args.idle_exit_s,
        "max_events": args.max_events,
        "auto_create_schema": args.auto_create_schema,
        "batch_max_rows": args.batch_max_rows,
        "batch_max_age_ms": args.batch_max_age_ms,
        "dlq_topic": args.dlq_topic,
        "dead_letters": args.dead_letters,
        "on_offset_gap": args.on_offset_gap,
    }


def _run(args: argparse.Namespace) -> int:
    configure_logging(
        json=args.log_json,
        level=logging.INFO if args.verbose or args.log_json else logging.WARNING,
    )
    # The client logs every failed connection attempt; the engine reports what matters.
    logging.getLogger("spr.kafka").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    config = load_engine_config(
        file=args.config, flags=_flags(args), kafka_flags=parse_kafka_overrides(args.kafka)
    )
    if config.workers > 1:
        return _run_workers(args, config.workers)

    from spr.engine import Engine
    from spr.metrics import MetricsPublisher, SprMetrics, serve

    server = None
    publisher = None
    if args.metrics_port is not None:
        metrics = SprMetrics()
        server = serve(args.metrics_port, args.metrics_addr, registry=metrics.registry)
        publisher = MetricsPublisher(metrics)
        log.info("metrics on %s", server.url)
    from spr.dlq import dead_letter_sink

    engine = Engine(config, dead_letters=dead_letter_sink(config), metrics=publisher)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        engine.stop()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    try:
        stats = engine.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    elapsed = time.monotonic() - start
    if args.stats:
        Path(args.stats).write_text(json.dumps({**stats.as_dict(), "elapsed_s": elapsed}))
    rate = stats.consumed / elapsed if elapsed > 0 else 0.0
    print(
        f"spr run: consumed {stats.consumed} event(s) in {elapsed:.1f} s ({rate:,.0f}/s): "
        f"{stats.applied} applied, {stats.stale} stale, {stats.collapsed} collapsed, "
        f"{stats.duplicate} duplicate, {stats.invalid} invalid, {stats.rejected} rejected by "
        f"the database; {stats.flushes} flush(es)",
        file=sys.stderr,
    )
    return 0


def _child_argv(args: argparse.Namespace, index: int) -> list[str]:
    argv = [sys.executable, "-m", "spr", "run", "--workers", "1"]
    for topic in args.topics or []:
        argv += ["--topic", topic]
    options = {
        "--group": args.group_id,
        "--dsn": args.dsn,
        "--bootstrap": args.bootstrap,
        "--table": args.table,
        "--mapping": args.mapping_preset,
        "--config": args.config,
        "--idle-exit": args.idle_exit_s,
        "--max-events": args.max_events,
        "--batch-max-rows": args.batch_max_rows,
        "--batch-max-age-ms": args.batch_max_age_ms,
        "--stats": f"{args.stats}.{index}" if args.stats else None,
        "--dlq-topic": args.dlq_topic,
        "--on-offset-gap": args.on_offset_gap,
        # One endpoint per worker: consecutive ports (0 lets each pick a free one).
        "--metrics-port": (
            None
            if args.metrics_port is None
            else args.metrics_port + index
            if args.metrics_port
            else 0
        ),
        "--metrics-addr": args.metrics_addr if args.metrics_port is not None else None,
    }
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if args.auto_create_schema:
        argv.append("--auto-create-schema")
    if args.verbose:
        argv.append("-v")
    if args.log_json:
        argv.append("--log-json")
    if args.dead_letters is False:
        argv.append("--no-dlq")
    for item in args.kafka:
        argv += ["-X", item]
    return argv


def _run_workers(args: argparse.Namespace, workers: int) -> int:
    """Run ``workers`` engine processes in one group; forward SIGTERM/SIGINT to them.

    Returns 0 when every worker exited 0, else the first non-zero exit code (a worker
    killed by a signal counts as failed)."""
    children = [subprocess.Popen(_child_argv(args, i)) for i in range(workers)]

    def _forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in codes if c != 0]
    if failed:
        print(f"spr run: {len(failed)} of {workers} worker(s) failed", file=sys.stderr)
        return failed[0] if failed[0] > 0 else 1
    return 0
