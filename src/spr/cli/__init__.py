"""The ``spr`` command line.

Each command has its module in this package, which adds its sub-parser through a
``register(subparsers)`` function listed in ``_COMMAND_MODULES`` and turns the parsed
arguments into one call of the library; the chosen
sub-command's ``func(args) -> int`` runs and its return value is the exit code.

Errors, the contract of design §8: an :class:`spr.errors.SprError` is printed as one
plain sentence (exit 2), never as a traceback. A PostgreSQL or Kafka client error that
escapes a command anyway is turned into one sentence here too, with any password
masked, as a last resort. A wrong argument prints the usage of the sub-command it
belongs to and one ``error:`` line (exit 2). librdkafka's own log lines stay quiet
unless the command was given ``-v``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence

from spr._impl import IMPL
from spr._version import __version__
from spr.cli.options import SprHelpFormatter
from spr.errors import SprError

__all__ = ["build_parser", "main"]

# Modules that contribute sub-commands, in the order ``spr --help`` lists them.
_COMMAND_MODULES = (
    "spr.cli.dev",
    "spr.cli.route",
    "spr.cli.produce",
    "spr.cli.dlq",
    "spr.cli.run",
    "spr.cli.transform",
    "spr.cli.db",
    "spr.cli.lag",
    "spr.cli.replay",
    "spr.cli.plan",
    "spr.cli.bench",
)

_KAFKA_LOG = "spr.kafka"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spr",
        description="Stateful Partition Routing: Kafka entity state changes into "
        "exactly-once, ordered state in PostgreSQL.",
        formatter_class=SprHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spr {__version__} ({IMPL})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in _sub_parsers(parser):
        # Every option shows its default; a wrong argument is reported by the
        # sub-command that owns it (its usage, not the top level's).
        sub.formatter_class = SprHelpFormatter
        sub.set_defaults(_usage_parser=sub)
    return parser


def _sub_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield sub
                yield from _sub_parsers(sub)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        owner: argparse.ArgumentParser = getattr(args, "_usage_parser", parser)
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _quiet_kafka(args: argparse.Namespace) -> None:
    """librdkafka logs every failed connection attempt (``%3|...|FAIL|``); the command
    reports what matters in one sentence. ``-v`` shows its lines."""
    kafka_log = logging.getLogger(_KAFKA_LOG)
    if getattr(args, "verbose", False):
        kafka_log.setLevel(logging.INFO)
        if not logging.getLogger("spr").handlers:
            from spr.logs import configure_logging

            configure_logging(json=False, level=logging.INFO)
    else:
        kafka_log.setLevel(logging.CRITICAL + 1)


def _last_resort(exc: BaseException) -> str | None:
    """One sentence for a database or Kafka client error no command turned into one;
    None for anything else (a bug, which keeps its traceback)."""
    from spr.logs import redact

    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, psycopg.OperationalError):
            return f"PostgreSQL is not usable: {redact(first)}"
        if isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None:
            # Raised before any server is involved: libpq could not parse the DSN.
            return f"the PostgreSQL DSN is not valid: {redact(first)}"
        return f"PostgreSQL refused: {redact(first)}"
    kafka = sys.modules.get("confluent_kafka")
    if kafka is not None and isinstance(exc, kafka.KafkaException):
        error = exc.args[0] if exc.args else exc
        text = error.str() if hasattr(error, "str") else str(error)
        return f"Kafka refused: {redact(text)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    _quiet_kafka(args)
    try:
        return int(func(args) or 0)
    except SprError as exc:
        print(f"spr {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        sentence = _last_resort(exc)
        if sentence is None:
            raise
        print(f"spr {args.command}: {sentence}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
