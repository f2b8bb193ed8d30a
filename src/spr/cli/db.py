"""``spr db init``: create the state, offsets and gaps tables, or fit an existing table."""

from __future__ import annotations

import argparse

from spr.cli.options import add_table_options, print_usage
from spr.config import load_table_config
from spr.sink.postgres import PostgresSink, redact_dsn

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="database tables", description="Manage spr's tables.")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION")
    init = db_sub.add_parser(
        "init",
        help="create the state and offsets tables",
        description="Create the state, offsets and gaps tables (and their schema), or fit "
        "an existing table that has the mapping's key columns, such as the field report's "
        "orders(order_id, ...): missing mapped columns, e.g. the sequence column, and a "
        "unique key are added. An existing table without the key columns belongs to "
        "something else and is left unchanged unless --fit-existing-table is given. "
        "--table accepts TABLE or SCHEMA.TABLE; the offsets table (spr_offsets) and its "
        "gaps table go in the same schema.",
    )
    add_table_options(init)
    init.add_argument(
        "--fit-existing-table",
        action="store_true",
        help="also fit an existing table that lacks the mapping's key columns: add spr's "
        "columns and a unique index on the key to it (default: refuse and change nothing)",
    )
    init.set_defaults(func=_db_init)
    db.set_defaults(func=lambda args: print_usage(db))


def _db_init(args: argparse.Namespace) -> int:
    dsn, mapping, timeout_ms = load_table_config(
        file=args.config,
        flags={"dsn": args.dsn, "table": args.table, "mapping_preset": args.mapping_preset},
    )
    with PostgresSink(dsn, mapping=mapping, statement_timeout_ms=timeout_ms) as sink:
        sink.init_schema(fit_existing_table=args.fit_existing_table)
    print(
        f"spr db init: tables {mapping.state_name}, {mapping.offsets_name} and "
        f"{mapping.gaps_name} are ready in {redact_dsn(dsn)}"
    )
    return 0
