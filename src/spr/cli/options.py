"""Options several commands share, defined once: where the servers are, the table, -X,
``-v``; the help format; and the checks a command makes before it writes anything."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from spr.errors import ConfigError

__all__ = [
    "KAFKA_CHECK_TIMEOUT_S",
    "SprHelpFormatter",
    "add_kafka_options",
    "add_table_options",
    "add_verbose_option",
    "kafka_settings",
    "parse_kafka_overrides",
    "print_usage",
    "require_database",
    "require_kafka",
    "require_writable",
    "resolve_bootstrap",
]

#: How long a command waits for a silent Kafka address before it gives up. A refused
#: connection is known within milliseconds (see :func:`spr.kafka.clients.cluster_problem`).
KAFKA_CHECK_TIMEOUT_S = 5.0


class SprHelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus ``(default: X)`` after every option that has a default
    its help text does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", metavar="D", help="PostgreSQL DSN (default $SPR_DSN or the local dev stack)"
    )
    parser.add_argument(
        "--table",
        metavar="X",
        help="state table, TABLE or SCHEMA.TABLE (default spr_entity_state, or the "
        "preset's table with --mapping, or [table] name in --config)",
    )
    parser.add_argument(
        "--mapping",
        dest="mapping_preset",
        choices=("default", "orders"),
        help="column layout preset (default: default, spr's own columns; orders: the "
        "field report's orders table)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="settings file, below SPR_* variables and flags (default: none)",
    )


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``-v``: show librdkafka's own log lines, which are quiet by default."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the Kafka client's own log lines and spr's progress (default: quiet)",
    )


def print_usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def parse_kafka_overrides(items: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-X expects KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    """``-X key=value``: librdkafka settings, as ``spr run`` takes them (with
    ``SPR_KAFKA_*`` below them), so that every command connects the same way."""
    parser.add_argument(
        "-X",
        dest="kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka setting, e.g. security.protocol or sasl.* (repeatable; default: none)",
    )


def kafka_settings(args: argparse.Namespace) -> dict[str, str]:
    """The librdkafka settings of a command with :func:`add_kafka_options`, checked:
    ConfigError (naming the key) for one librdkafka refuses."""
    from spr.config import load_kafka_settings
    from spr.kafka.clients import check_settings

    settings = load_kafka_settings(kafka_flags=parse_kafka_overrides(args.kafka))
    check_settings(settings)
    return settings


def resolve_bootstrap(flag: str | None, kafka: Mapping[str, Any] | None = None) -> str:
    """The bootstrap servers a command's clients use, as ``spr run``'s consumer does:
    ``bootstrap.servers`` from ``-X`` (or ``SPR_KAFKA_BOOTSTRAP_SERVERS``), since librdkafka
    settings win; else ``--bootstrap``; else ``$SPR_BOOTSTRAP`` or the local stack."""
    from spr.config.defaults import default_bootstrap

    configured = (kafka or {}).get("bootstrap.servers")
    if configured:
        return str(configured)
    return flag or default_bootstrap()


def require_kafka(bootstrap: str, kafka: Mapping[str, Any] | None = None) -> None:
    """ServerUnavailable (one sentence naming ``bootstrap``) unless the cluster answers;
    within a fraction of a second when the connection is refused."""
    from spr.kafka.admin import unreachable
    from spr.kafka.clients import cluster_problem

    problem = cluster_problem(
        {**(kafka or {}), "bootstrap.servers": bootstrap}, timeout_s=KAFKA_CHECK_TIMEOUT_S
    )
    if problem is not None:
        raise unreachable(bootstrap, problem)


def require_database(dsn: str) -> None:
    """ConfigError for a DSN libpq cannot parse, ServerUnavailable (password masked)
    when the server does not accept a connection within 5 s. Writes nothing."""
    import psycopg

    from spr.config.loading import check_dsn
    from spr.errors import ServerUnavailable
    from spr.logs import redact

    check_dsn(dsn)
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServerUnavailable(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {redact(reason)}"
        ) from None


def require_writable(path: str | Path) -> Path:
    """``path`` when a file can be written there; ConfigError naming what is wrong
    otherwise (no such directory, a directory, no permission). Creates nothing, so a
    command can check its output file before it does any work."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise ConfigError(f"cannot write {target}: it is a directory; name a file")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {target}: the directory {parent} does not exist")
    if target.exists():
        writable = os.access(target, os.W_OK)
    else:
        writable = os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ConfigError(f"cannot write {target}: permission denied")
    return target


_Stats = TypeVar("_Stats")


def run_until_stopped(
    run: Callable[[], _Stats], stop: Callable[[], None], *, server: Any = None
) -> tuple[_Stats, float]:
    """``run()`` with SIGTERM and SIGINT asking ``stop()`` (a graceful finish), the
    previous handlers restored and ``server`` (a metrics endpoint) closed afterwards.
    Returns what ``run()`` returned and the wall time it took. The process is spr's
    own, so glibc's heap is kept from hoarding freed buffers (:mod:`spr.memory`)."""
    import signal
    import time

    from spr.memory import bound_malloc_retention

    bound_malloc_retention()

    def on_signal(signum: int, frame: Any) -> None:
        stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    try:
        stats = run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    return stats, time.monotonic() - start
