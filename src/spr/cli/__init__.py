"""The ``spr`` command line.

Each command has its module in this package, which adds its sub-parser through a
``register(subparsers)`` function listed in ``_COMMAND_MODULES`` and turns the parsed
arguments into one call of the library; the chosen
sub-command's ``func(args) -> int`` runs and its return value is the exit code.
An :class:`spr.errors.SprError` is printed as one plain sentence (exit 2), never as a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from spr._impl import IMPL
from spr._version import __version__
from spr.errors import SprError

# Modules that contribute sub-commands, in the order ``spr --help`` lists them.
_COMMAND_MODULES = (
    "spr.cli.dev",
    "spr.cli.route",
    "spr.cli.produce",
    "spr.cli.dlq",
    "spr.cli.run",
    "spr.cli.db",
    "spr.cli.lag",
    "spr.cli.replay",
    "spr.cli.plan",
    "spr.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spr",
        description="Stateful Partition Routing: Kafka entity state changes into "
        "exactly-once, ordered state in PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"spr {__version__} ({IMPL})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except SprError as exc:
        print(f"spr {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
