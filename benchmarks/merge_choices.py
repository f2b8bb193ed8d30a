"""The database side's choices, measured on the same rows: the state table's layout and
the merge statement.

Run: ``.venv/bin/python -m benchmarks.merge_choices [--dsn DSN] [--entities N]
[--passes P] [--rounds R] [--only layouts|statements]`` against a running PostgreSQL
(default: the local dev stack).

Each case writes N entities in 40,000-row transactions into a fresh table: one insert
pass, then P update passes (every entity again, one sequence higher, in a new random
order), and reports the merge's rows/s for each pass. Cases alternate within a round.

``layouts``: spr's own :meth:`~spr.sink.postgres.PostgresSink.flush` (binary COPY into
its staging table, its merge, its offsets upsert; the whole flush is timed) on three
tables with spr's columns: the key in the database's collation (a textbook table), the
key in ``COLLATE "C"`` (what ``spr db init`` creates), and that at fillfactor 70 (room
on each page for HOT updates). Then each table's heap and index size.

``statements``: on spr's table, text COPY into a staging table and one statement, only
the statement timed: spr's guarded ``INSERT ... ON CONFLICT``
(:meth:`~spr.sink.schema.TableSchema.merge_statement`), PostgreSQL 15's ``MERGE`` with
the planner's plan, ``MERGE`` held to index probes (hash and merge joins off), and
spr's statement from an unlogged staging table emptied by ``TRUNCATE``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from spr._event import Event
from spr.batch import STATE_COLUMNS, Batch
from spr.bench.ceilings import create_textbook_table
from spr.config import TableMapping
from spr.config.defaults import default_dsn
from spr.sink.postgres import PostgresSink
from spr.sink.schema import STAGING_TABLE, TableSchema, staging_columns

BATCH_ROWS = 40_000
PARTITIONS = 12
PAYLOAD = b'{"amount":12.34,"currency":"EUR","note":"' + b"x" * 120 + b'"}'
_COLUMNS = ", ".join(STATE_COLUMNS)

Pass = list[list[int]]  # one pass: its transactions, each a list of entity numbers


def _passes(entities: int, passes: int, seed: int = 7) -> list[Pass]:
    rng = random.Random(seed)
    out = []
    for _ in range(passes + 1):
        order = list(range(entities))
        rng.shuffle(order)
        out.append([order[i : i + BATCH_ROWS] for i in range(0, entities, BATCH_ROWS)])
    return out


# -- layouts: spr's own flush ---------------------------------------------------------


def _layout_table(dsn: str, layout: str) -> TableMapping:
    tag = uuid.uuid4().hex[:8]
    mapping = TableMapping(table=f"choices_{tag}", offsets_table=f"choices_off_{tag}")
    with PostgresSink(dsn, mapping=mapping) as sink:
        if layout == "textbook":
            create_textbook_table(sink.connect(), mapping.table)
        sink.init_schema(fit_existing_table=layout == "textbook")
        if layout == "fillfactor":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER TABLE {} SET (fillfactor = 70)").format(
                        sql.Identifier(mapping.table)
                    )
                )
    return mapping


def _flush_rates(dsn: str, layout: str, passes: list[Pass]) -> list[float]:
    mapping = _layout_table(dsn, layout)
    rates = []
    offset = 0
    with PostgresSink(dsn, group_id="g", mapping=mapping) as sink:
        for sequence, transactions in enumerate(passes, 1):
            elapsed = 0.0
            for entities in transactions:
                batch = Batch(STATE_COLUMNS)
                for e in entities:
                    event = Event(f"e{e}", "order", f"{e:08d}", sequence, "s", 1_700_000_000_000,
                                  PAYLOAD)  # fmt: skip
                    batch.add(event, "topic", e % PARTITIONS, offset)
                    offset += 1
                started = time.perf_counter()
                sink.flush(batch)
                elapsed += time.perf_counter() - started
            rates.append(sum(map(len, transactions)) / elapsed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_relation_size(%s::regclass), pg_indexes_size(%s::regclass)",
            (mapping.table, mapping.table),
        ).fetchone()
        assert row is not None
        SIZES.setdefault(layout, []).append((row[0] / 2**20, row[1] / 2**20))
    _drop(dsn, mapping)
    return rates


#: Heap and index MB of each layout's table after its last pass, before any vacuum.
SIZES: dict[str, list[tuple[float, float]]] = {}


# -- statements: one statement from the staging table --------------------------------


def _merge_statement(table: sql.Composable, *, staging: str) -> sql.Composed:
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = s.{0}").format(sql.Identifier(c)) for c in STATE_COLUMNS[2:]
    )
    values = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in STATE_COLUMNS)
    return sql.SQL(
        "MERGE INTO {t} t USING {s} s "
        "ON t.entity_type = s.entity_type AND t.entity_id = s.entity_id "
        "WHEN MATCHED AND s.sequence > t.sequence THEN UPDATE SET {u}, processed_at = now() "
        "WHEN NOT MATCHED THEN INSERT ({cols}, processed_at) VALUES ({v}, now())"
    ).format(t=table, s=sql.Identifier(staging), u=updates, cols=sql.SQL(_COLUMNS), v=values)


def _statement_rates(dsn: str, statement: str, passes: list[Pass]) -> list[float]:
    mapping = _layout_table(dsn, "spr")
    schema = TableSchema(mapping)
    unlogged = statement == "unlogged staging"
    staging = f"choices_stage_{uuid.uuid4().hex[:8]}" if unlogged else STAGING_TABLE
    spr_statement = schema.merge_statement().as_string(None)
    merge = (
        _merge_statement(schema.table, staging=staging)
        if statement.startswith("MERGE")
        else sql.SQL(spr_statement.replace(f'"{STAGING_TABLE}"', f'"{staging}"'))
    )
    stamp = datetime.fromtimestamp(1_700_000_000, tz=timezone.utc)
    payload = PAYLOAD.decode()
    rates = []
    with psycopg.connect(dsn) as conn:
        types = staging_columns()  # spr's own staging layout
        if unlogged:
            conn.execute(sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(
                sql.Identifier(staging), types))  # fmt: skip
        else:
            conn.execute(sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DELETE ROWS").format(
                sql.Identifier(staging), types))  # fmt: skip
        if statement == "MERGE, index probes":
            conn.execute("SET enable_hashjoin = off")
            conn.execute("SET enable_mergejoin = off")
        conn.commit()
        copy = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(staging), sql.SQL(_COLUMNS))
        for sequence, transactions in enumerate(passes, 1):
            elapsed = 0.0
            for entities in transactions:
                with conn.cursor() as cur:
                    if unlogged:
                        cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(staging)))
                    with cur.copy(copy) as writer:
                        for e in entities:
                            writer.write_row(("order", f"{e:08d}", sequence, "s", f"e{e}",
                                              payload, stamp, "topic", e % PARTITIONS, e))  # fmt: skip
                    started = time.perf_counter()
                    cur.execute(merge)
                    elapsed += time.perf_counter() - started
                conn.commit()
            rates.append(sum(map(len, transactions)) / elapsed)
        if unlogged:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(staging)))
            conn.commit()
    _drop(dsn, mapping)
    return rates


def _drop(dsn: str, mapping: TableMapping) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (mapping.table, mapping.offsets_table, mapping.gaps_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def _compare(
    title: str, cases: dict[str, Callable[[], list[float]]], rounds: int, passes: int
) -> None:
    found: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            found[name].append(run())
    print(f"{title}: rows/s, median of {rounds} round(s); pass 1 inserts, then updates")
    baseline = [statistics.median(r[k] for r in next(iter(found.values())))
                for k in range(passes + 1)]  # fmt: skip
    for name, runs in found.items():
        medians = [statistics.median(r[k] for r in runs) for k in range(passes + 1)]
        cells = "  ".join(
            f"{m:>9,.0f} ({m / b:4.2f}x)" for m, b in zip(medians, baseline, strict=True)
        )
        print(f"  {name:26} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=default_dsn())
    parser.add_argument("--entities", type=int, default=400_000)
    parser.add_argument("--passes", type=int, default=3, help="update passes after the insert")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("layouts", "statements"))
    args = parser.parse_args()
    passes = _passes(args.entities, args.passes)
    dsn: Any = args.dsn
    if args.only != "statements":
        layouts = {
            "database collation": "textbook",
            'key "C" (spr)': "spr",
            'key "C", fillfactor 70': "fillfactor",
        }
        _compare(
            "spr's flush by table layout",
            {name: (lambda v=v: _flush_rates(dsn, v, passes)) for name, v in layouts.items()},
            args.rounds, args.passes,
        )  # fmt: skip
        print("  after the last pass, before any vacuum (median MB):")
        for name, layout in layouts.items():
            heap = statistics.median(h for h, _ in SIZES[layout])
            index = statistics.median(i for _, i in SIZES[layout])
            print(f"  {name:26} heap {heap:7.1f}  primary key {index:7.1f}")
    if args.only != "layouts":
        statements = ("INSERT ... ON CONFLICT (spr)", "MERGE, planner's plan",
                      "MERGE, index probes", "unlogged staging")  # fmt: skip
        _compare(
            "the merge statement on spr's table (statement time only)",
            {name: (lambda n=name: _statement_rates(dsn, n, passes)) for name in statements},
            args.rounds, args.passes,
        )  # fmt: skip


if __name__ == "__main__":
    main()
