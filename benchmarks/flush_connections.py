"""One flush connection against two on the same rows: the database's own parallelism.

Run: ``.venv/bin/python -m benchmarks.flush_connections [--dsn DSN] [--rows N]
[--rounds R]`` against a running PostgreSQL (default: the local dev stack).

N unique entities (the ``live`` scenario's shape: nothing collapses) in 12 partitions,
flushed with spr's own :meth:`~spr.sink.postgres.PostgresSink.flush` in 40,000-row
batches on one connection, or each batch split by partition parity over two
connections with spr's own lane split (:class:`~spr.engine.lanes.BatchLane`; one
thread each, so their locks never meet), into fresh tables each round; the modes
alternate. Unlike the engine's lanes, each thread goes on to its next share without
waiting for the other. Only the flushes are timed: the database's rate with an infinitely fast
client, the upper bound of a second flush connection on this machine.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from spr._event import Event
from spr.batch import STATE_COLUMNS, Batch
from spr.config import TableMapping
from spr.config.defaults import default_dsn
from spr.engine.lanes import BatchLane
from spr.sink.postgres import PostgresSink

PARTITIONS = 12
BATCH_ROWS = 40_000
PAYLOAD = b'{"amount":12.34,"currency":"EUR","note":"' + b"x" * 120 + b'"}'

Row = tuple[Event, int, int]


def _rows(n: int) -> list[Row]:
    return [
        (Event(f"e{i}", "order", f"ent-{i}", 1, "created", 1_700_000_000_000 + i, PAYLOAD),
         i % PARTITIONS, i // PARTITIONS)
        for i in range(n)
    ]  # fmt: skip


def _batches(rows: list[Row], size: int) -> list[Batch]:
    out, batch = [], Batch(STATE_COLUMNS)
    for event, partition, offset in rows:
        batch.add(event, "topic", partition, offset)
        if batch.row_count >= size:
            out.append(batch)
            batch = Batch(STATE_COLUMNS)
    if batch.row_count:
        out.append(batch)
    return out


def _run(dsn: str, rows: list[Row], connections: int) -> float:
    tag = uuid.uuid4().hex[:8]
    mapping = TableMapping(table=f"flushconn_{tag}", offsets_table=f"flushconn_off_{tag}")
    sinks = [PostgresSink(dsn, group_id="g", mapping=mapping) for _ in range(connections)]
    sinks[0].init_schema()
    batches = _batches(rows, BATCH_ROWS)
    lanes: list[list[Any]] = (
        [batches]
        if connections == 1
        else [[BatchLane(b, k, connections) for b in batches] for k in range(connections)]
    )
    for sink in sinks:
        sink.connect()

    def work(k: int) -> None:
        for batch in lanes[k]:
            sinks[k].flush(batch)

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(mapping.table))
        ).fetchone()
        assert count is not None and count[0] == len(rows), count
        for table in (mapping.table, mapping.offsets_table, mapping.gaps_table):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    for sink in sinks:
        sink.close()
    return len(rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=default_dsn())
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = _rows(args.rows)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for connections in (1, 2):
            rates[connections].append(_run(args.dsn, rows, connections))
    for connections, samples in rates.items():
        print(f"{connections} connection(s): best {max(samples):,.0f} rows/s, "
              f"all {', '.join(f'{r:,.0f}' for r in samples)}")  # fmt: skip


if __name__ == "__main__":
    main()
