"""``spr run``: the consumer engine, design §8.

``spr run --topic T [--topic T2 ...] --group G`` consumes into PostgreSQL until SIGTERM
or SIGINT (then it flushes, commits and exits 0), until ``--max-events`` messages, or,
with ``--idle-exit S``, until nothing new arrived for S seconds and every partition of
its topics is applied up to its end offset. ``--workers N`` runs N engine processes in
the same group; the parent forwards signals and exits non-zero if any worker failed.

Invalid events, and rows PostgreSQL rejects for their content, go to the dead-letter
topic ``<topic>.dlq`` (``--dlq-topic``; ``--no-dlq`` turns dead letters off explicitly).
When it cannot be written the command stops with exit code 2, and no offset is
committed past the event. ``--synchronous-commit off`` lets each flush's commit return
before PostgreSQL flushes its WAL (never the default): a database crash then loses the
last commits, rows and offsets together, and they are consumed again from Kafka.
``--metrics-port P`` serves Prometheus metrics on
``http://127.0.0.1:P/metrics`` (``--metrics-addr`` to change the address); ``--log-json``
writes one JSON object per log line.

Settings come from ``--config FILE.toml``, then ``SPR_*`` variables, then flags (flags
win); ``-X key=value`` passes librdkafka settings through to the consumer. A missing
server or a bad setting ends the command with one sentence and exit code 2, before
anything is written: the consumer settings and the broker are checked first.

The closing line reports the *active* rate, events over the time from the first message
consumed to the last flush committed (an ``--idle-exit`` wait is not work), and the wall
time separately; a span too short to time says so instead of printing a number.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from spr.cli.options import (
    add_table_options,
    parse_kafka_overrides,
    require_kafka,
    require_writable,
    run_until_stopped,
)
from spr.cli.tracing import add_otel_options, otel_argv, tracing_options, tracing_session
from spr.cli.workers import run_workers
from spr.config import BatchPolicy, EngineConfig, load_engine_config
from spr.errors import ConfigError
from spr.kafka.clients import check_settings
from spr.logs import configure_logging
from spr.tracing import TracingOptions

__all__ = ["check_engine_servers", "register", "run_engine", "summary"]

log = logging.getLogger("spr.cli.run")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser(
        "run",
        help="consume topics into PostgreSQL, exactly once",
        description="Consume entity state changes from Kafka into PostgreSQL, exactly once. "
        "Settings come from --config, then SPR_* variables, then these flags.",
    )
    run.add_argument(
        "--topic",
        action="append",
        dest="topics",
        metavar="T",
        help="topic to consume (repeatable; required unless topics are set in --config "
        "or $SPR_TOPICS)",
    )
    run.add_argument(
        "--group",
        dest="group_id",
        metavar="G",
        help="consumer group id (required unless set in --config or $SPR_GROUP)",
    )
    add_table_options(run)
    run.add_argument(
        "--workers", type=int, metavar="N", help="engine processes to run in the group (default 1)"
    )
    run.add_argument(
        "--idle-exit",
        dest="idle_exit_s",
        type=float,
        metavar="SECONDS",
        help="exit 0 once nothing arrived for this long and the group has no lag on its "
        "topics (default: run until stopped)",
    )
    run.add_argument(
        "--max-events",
        type=int,
        metavar="N",
        help="stop after consuming N messages, per worker (default: no limit)",
    )
    run.add_argument(
        "--bootstrap",
        metavar="B",
        help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092; "
        "-X bootstrap.servers wins)",
    )
    run.add_argument(
        "--auto-create-schema",
        action="store_true",
        default=None,
        help="create the tables when missing instead of failing (default: fail)",
    )
    run.add_argument(
        "-X",
        dest="kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka consumer setting (repeatable; wins over spr's defaults; default: none)",
    )
    run.add_argument(
        "--batch-max-rows",
        type=int,
        metavar="N",
        help=f"flush a batch at N distinct rows (default {BatchPolicy().max_rows:,})",
    )
    run.add_argument(
        "--batch-max-age-ms",
        type=int,
        metavar="MS",
        help=f"flush a batch once its oldest event is MS old (default {BatchPolicy().max_age_ms})",
    )
    run.add_argument(
        "--stats", metavar="FILE", help="write the final counters as JSON (default: none)"
    )
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
        help="turn dead letters off: invalid events are only counted, rejected rows stop "
        "the run (default: dead letters on)",
    )
    run.add_argument(
        "--synchronous-commit",
        metavar="on|off",
        help="PostgreSQL synchronous_commit of the flushes (default: on). off: faster "
        "commits, and a database crash loses the last ones, which are consumed again "
        "from Kafka (its retention must still hold them); also local, remote_write, "
        "remote_apply",
    )
    run.add_argument(
        "--flush-connections",
        type=int,
        metavar="N",
        help="PostgreSQL connections a batch is flushed over at once, each writing the "
        "rows and offsets of its share of the partitions in its own transaction "
        "(default: 2 where this process may run on two cores or more, else 1); the "
        "database merges on one core per connection, and a batch below "
        "flush_split_rows (5,000) rows is never split",
    )
    run.add_argument(
        "--on-offset-gap",
        choices=("fail", "earliest", "latest"),
        help="when retention deleted unapplied events: stop (default: fail) or skip the gap",
    )
    run.add_argument(
        "--on-misrouted",
        choices=("auto", "apply", "dead-letter", "stop"),
        help="an event on a partition its key does not map to: apply it when it has a "
        "sequence and dead-letter it without one (default: auto), or apply, dead-letter "
        "or stop at every one",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics on this port (default: no endpoint)",
    )
    run.add_argument(
        "--metrics-window",
        type=float,
        metavar="SECONDS",
        help="window of the partition-skew gauge, spr_partition_distribution_variance (default 60)",
    )
    run.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default 127.0.0.1)",
    )
    add_otel_options(run, links=True)
    run.add_argument(
        "--log-json", action="store_true", help="log JSON lines, INFO and up (default: text)"
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress at INFO level, with the Kafka client's own lines (default: quiet)",
    )
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
        "on_misrouted": args.on_misrouted,
        "synchronous_commit": args.synchronous_commit,
        "flush_connections": args.flush_connections,
    }


def _run(args: argparse.Namespace) -> int:
    configure_logging(
        json=args.log_json,
        level=logging.INFO if args.verbose or args.log_json else logging.WARNING,
    )
    # The client logs every failed connection attempt; the engine reports what matters.
    logging.getLogger("spr.kafka").setLevel(logging.INFO if args.verbose else logging.CRITICAL + 1)
    if args.dead_letters is False and args.dlq_topic is not None:
        raise ConfigError(
            "--no-dlq turns dead letters off, so --dlq-topic has nowhere to apply; "
            "pass one or the other"
        )
    if args.metrics_window is not None and not args.metrics_window > 0:
        raise ConfigError(
            f"--metrics-window must be a positive number of seconds, got {args.metrics_window:g}"
        )
    tracing = tracing_options(args)
    config = load_engine_config(
        file=args.config, flags=_flags(args), kafka_flags=parse_kafka_overrides(args.kafka)
    )
    if args.stats:
        require_writable(args.stats)
    check_engine_servers(config)
    if config.workers > 1:
        # Each worker would report a missing database or table on its own line: check
        # once here, as every worker's engine will when it opens.
        from spr.sink.postgres import PostgresSink

        with PostgresSink.from_config(config) as sink:
            sink.ensure_schema(auto_create=config.auto_create_schema)
        return run_workers("run", config.workers, lambda i: _child_argv(args, i))
    max_links = None if tracing is None else tracing.max_links
    with tracing_session(tracing is not None, "spr-run", max_links=max_links):
        return run_engine(
            config,
            command="run",
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            metrics_window_s=args.metrics_window,
            stats_path=args.stats,
            tracing=tracing,
        )


def check_engine_servers(config: EngineConfig) -> None:
    """What can be checked before the engine touches anything: the consumer settings
    (ConfigError naming a key librdkafka refuses), that Kafka answers at the address
    the consumer will use (ServerUnavailable, within a fraction of a second when the
    connection is refused) and that the topics exist (ConfigError), so that no table is
    created for a run that cannot start. The database is checked by the engine when it
    opens."""
    from spr.kafka.admin import KafkaAdmin

    consumer_config = config.consumer_config()
    check_settings(consumer_config)
    require_kafka(str(consumer_config["bootstrap.servers"]), config.kafka)
    KafkaAdmin(consumer_config).partitions(config.topics)


def run_engine(
    config: EngineConfig,
    *,
    command: str,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    metrics_window_s: float | None = None,
    stats_path: str | None = None,
    stats_sink: dict[str, Any] | None = None,
    tracing: TracingOptions | None = None,
) -> int:
    """Run one engine until it stops (signal, ``max_events``, ``idle_exit_s``) and print
    its summary on stderr: the active rate (first message to last commit) and the wall
    time, separately. The final counters, with ``wall_s``, ``active_s`` and
    ``events_per_s`` (None when the span was too short to time), go to ``stats_path``
    as JSON and into ``stats_sink``. ``tracing`` makes flush spans (the caller sets up
    the tracer provider). Blocks; raises SprError with one sentence."""
    from spr.dlq import dead_letter_sink
    from spr.engine import Engine
    from spr.metrics import MetricsPublisher, SprMetrics, serve

    server = None
    publisher = None
    if metrics_port is not None:
        metrics = SprMetrics()
        server = serve(metrics_port, metrics_addr, registry=metrics.registry)
        publisher = MetricsPublisher(metrics, variance_window_s=metrics_window_s or 60.0)
        log.info("metrics on %s", server.url)
    engine = Engine(
        config, dead_letters=dead_letter_sink(config), metrics=publisher, tracing=tracing
    )

    stats, wall = run_until_stopped(engine.run, engine.stop, server=server)
    active, rate = stats.active_s, stats.events_per_s
    final = {**stats.as_dict(), "elapsed_s": wall, "wall_s": wall}
    if stats_sink is not None:
        stats_sink.update(final)
    if stats_path:
        Path(stats_path).write_text(json.dumps(final))
    print(
        f"spr {command}: {summary(stats, wall_s=wall, active_s=active, rate=rate)}", file=sys.stderr
    )
    return 0


def summary(stats: Any, *, wall_s: float, active_s: float | None, rate: float | None) -> str:
    """The closing line of a run: what was consumed, the active time and rate (or why
    there is no rate), the wall time, and what became of the events."""
    from spr.engine.telemetry import TOO_SHORT

    if active_s is None:
        timing = f"in {wall_s:.1f} s"
    else:
        speed = f"{TOO_SHORT} a rate" if rate is None else f"{rate:,.0f}/s"
        timing = (
            f"in {active_s:.2f} s from the first message to the last commit ({speed}), "
            f"{wall_s:.1f} s in all"
        )
    return (
        f"consumed {stats.consumed} event(s) {timing}: "
        f"{stats.applied} applied, {stats.stale} stale, {stats.collapsed} collapsed, "
        f"{stats.duplicate} duplicate, {stats.invalid} invalid, {stats.rejected} rejected by "
        f"the database; {stats.flushes} flush(es)"
    )


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
        "--on-misrouted": args.on_misrouted,
        "--synchronous-commit": args.synchronous_commit,
        "--flush-connections": args.flush_connections,
        # One endpoint per worker: consecutive ports (0 lets each pick a free one).
        "--metrics-port": (
            None
            if args.metrics_port is None
            else args.metrics_port + index
            if args.metrics_port
            else 0
        ),
        "--metrics-addr": args.metrics_addr if args.metrics_port is not None else None,
        "--metrics-window": args.metrics_window,
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
    argv += otel_argv(args)
    if args.dead_letters is False:
        argv.append("--no-dlq")
    for item in args.kafka:
        argv += ["-X", item]
    return argv
