"""PostgresSink against the real PostgreSQL: one transaction, sequence guard, offsets
that never move back, the mapped ``orders`` table, and zombies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from spr.batch import STATE_COLUMNS, Batch
from spr.bench.ceilings import create_textbook_table
from spr.classify import ErrorClass, classify
from spr.config import ORDERS_MAPPING, TableMapping
from spr.decode import Event
from spr.errors import ConfigError, ServerUnavailable
from spr.sink import PostgresSink


def event(entity_id: str, sequence: int, state: str, entity_type: str = "order") -> Event:
    payload = json.dumps(
        {"entity_type": entity_type, "entity_id": entity_id, "sequence": sequence, "state": state}
    ).encode()
    return Event(
        event_id=f"{entity_type}:{entity_id}:{sequence}",
        entity_type=entity_type,
        entity_id=entity_id,
        sequence=sequence,
        state=state,
        timestamp_ms=1_700_000_000_000 + sequence,
        payload=payload,
    )


def batch_of(*items: tuple[Event, int], topic: str = "t", partition: int = 0) -> Batch:
    batch = Batch(STATE_COLUMNS)
    for ev, offset in items:
        batch.add(ev, topic, partition, offset)
    return batch


@pytest.fixture
def sink(dsn: str, pg: Any, unique_name: Callable[[str], str]) -> Any:
    mapping = TableMapping(table=unique_name("state"), offsets_table=unique_name("offsets"))
    with PostgresSink(dsn, group_id="g", mapping=mapping, statement_timeout_ms=2_000) as s:
        s.init_schema()
        yield s
    for table in (mapping.table, mapping.offsets_table, mapping.gaps_table):
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def rows(pg: psycopg.Connection[Any], table: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    result = pg.execute(
        sql.SQL("SELECT entity_type, entity_id, sequence, state, kafka_offset FROM {}").format(
            sql.Identifier(table)
        )
    ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in result}


def test_flush_writes_rows_and_offsets_together(sink: PostgresSink, pg: Any) -> None:
    batch = batch_of(
        (event("1", 1, "created"), 0), (event("1", 2, "paid"), 1), (event("2", 1, "x"), 2)
    )
    batch.advance("t", 1, 41)
    result = sink.flush(batch)
    assert (result.rows, result.applied, result.stale) == (2, 2, 0)
    assert rows(pg, sink.mapping.table) == {
        ("order", "1"): (2, "paid", 1),
        ("order", "2"): (1, "x", 2),
    }
    assert sink.load_offsets("g", ["t"]) == {("t", 0): 3, ("t", 1): 42}
    assert sink.load_offsets("other", ["t"]) == {}
    payload = pg.execute(
        sql.SQL(
            "SELECT payload->>'state', event_ts IS NOT NULL, processed_at IS NOT NULL FROM {} "
            "WHERE entity_id = '1'"
        ).format(sql.Identifier(sink.mapping.table))
    ).fetchone()
    assert payload == ("paid", True, True)


def test_zombie_late_flush_neither_regresses_state_nor_moves_offsets_back(
    sink: PostgresSink, pg: Any
) -> None:
    # The stale owner read offsets 0-1; the new owner replayed them and read on to 3.
    stale_owner = batch_of((event("1", 1, "created"), 0), (event("2", 1, "created"), 1))
    new_owner = batch_of(
        (event("1", 1, "created"), 0),
        (event("2", 1, "created"), 1),
        (event("1", 2, "paid"), 2),
        (event("2", 2, "shipped"), 3),
    )
    assert sink.flush(new_owner).applied == 2
    late = sink.flush(stale_owner)  # the zombie's flush lands last
    assert (late.applied, late.stale) == (0, 2)
    assert rows(pg, sink.mapping.table) == {
        ("order", "1"): (2, "paid", 2),
        ("order", "2"): (2, "shipped", 3),
    }
    assert sink.load_offsets("g", ["t"]) == {("t", 0): 4}


def test_duplicates_and_older_after_newer_never_regress(sink: PostgresSink, pg: Any) -> None:
    sink.flush(batch_of((event("1", 5, "five"), 10)))
    # Equal sequence republished (a duplicate) and an older event arriving later.
    result = sink.flush(batch_of((event("1", 5, "five-again"), 11), (event("1", 3, "three"), 12)))
    assert result.applied == 0 and result.stale == 1
    assert rows(pg, sink.mapping.table) == {("order", "1"): (5, "five", 10)}
    assert sink.load_offsets("g", ["t"]) == {("t", 0): 13}
    sink.flush(batch_of((event("1", 6, "six"), 13)))
    assert rows(pg, sink.mapping.table) == {("order", "1"): (6, "six", 13)}


def test_failed_flush_writes_nothing(sink: PostgresSink, dsn: str, pg: Any) -> None:
    table = sink.mapping.table
    sink.flush(batch_of((event("1", 1, "a"), 0)))
    with psycopg.connect(dsn) as locker:
        locker.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
        )
        with pytest.raises(psycopg.errors.QueryCanceled):  # statement_timeout = 2 s
            sink.flush(batch_of((event("1", 2, "b"), 1), (event("9", 1, "c"), 2)))
        locker.rollback()
    assert rows(pg, table) == {("order", "1"): (1, "a", 0)}
    assert sink.load_offsets("g", ["t"]) == {("t", 0): 1}
    # The same batch again succeeds: a flush is idempotent and retryable.
    sink.flush(batch_of((event("1", 2, "b"), 1), (event("9", 1, "c"), 2)))
    assert rows(pg, table)[("order", "1")] == (2, "b", 1)


def test_a_flush_transaction_left_idle_cannot_block_others_for_long(
    sink: PostgresSink, dsn: str, pg: Any
) -> None:
    """A member frozen mid-flush (SIGSTOP, a VM pause) leaves its transaction idle,
    holding row locks; the server ends it, so the other members' flushes wait for a
    bounded time, not until the frozen one comes back."""
    table = sink.mapping.table
    sink.flush(batch_of((event("1", 1, "a"), 0)))
    frozen = sink.connect()
    settings = {
        name: frozen.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        for name in ("statement_timeout", "idle_in_transaction_session_timeout")
    }
    assert settings == {
        "statement_timeout": ("2s",),
        "idle_in_transaction_session_timeout": ("10s",),
    }
    frozen.execute("BEGIN")
    frozen.execute(
        sql.SQL("UPDATE {} SET state = 'frozen' WHERE entity_id = '1'").format(
            sql.Identifier(table)
        )
    )
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SET statement_timeout = '60s'")
        other.execute(  # blocks on the frozen transaction's row lock
            sql.SQL("UPDATE {} SET state = 'moved' WHERE entity_id = '1'").format(
                sql.Identifier(table)
            )
        )
    waited = time.monotonic() - started
    assert 8 < waited < 15, waited
    assert rows(pg, table)[("order", "1")][1] == "moved"
    # The frozen member finds its session gone (a transient error: the engine retries),
    # reconnects and flushes again, harmlessly.
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as ended:
        sink.flush(batch_of((event("1", 2, "b"), 1)))
    assert classify(ended.value) is ErrorClass.TRANSIENT
    sink.flush(batch_of((event("1", 2, "b"), 1)))
    assert rows(pg, table)[("order", "1")] == (2, "b", 1)


def test_cancel_aborts_a_running_flush(sink: PostgresSink, dsn: str, pg: Any) -> None:
    table = sink.mapping.table
    errors: list[BaseException] = []
    with psycopg.connect(dsn) as locker:
        locker.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
        )

        def _flush() -> None:
            try:
                sink.flush(batch_of((event("1", 1, "a"), 0)))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=_flush)
        thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        sink.cancel()
        thread.join(5)
        assert time.monotonic() - started < 1.5
        locker.rollback()
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.QueryCanceled)
    assert rows(pg, table) == {}
    assert sink.load_offsets("g", ["t"]) == {}


def _collations(pg: Any, table: str) -> dict[str, str]:
    """Each column's collation (``default``: the database's, when none was chosen)."""
    rows = pg.execute(
        "SELECT a.attname::text, COALESCE(c.collname::text, '') FROM pg_attribute a "
        "LEFT JOIN pg_collation c ON c.oid = a.attcollation "
        "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (table,),
    ).fetchall()
    return dict(rows)


def test_state_table_compares_keys_bytewise(sink: PostgresSink, pg: Any) -> None:
    collations = _collations(pg, sink.mapping.table)
    assert (collations["entity_type"], collations["entity_id"]) == ("C", "C")
    assert collations["state"] == "default"  # only the key is byte-ordered
    # The staging table's identity compares the same way (the merge's sort).
    staging = (
        sink.connect()
        .execute(
            "SELECT c.collname::text FROM pg_attribute a JOIN pg_collation c "
            "ON c.oid = a.attcollation WHERE a.attrelid = to_regclass('pg_temp.spr_staging') "
            "AND a.attname = 'entity_id'"
        )
        .fetchone()
    )
    assert staging == ("C",)


def test_the_benchmarks_textbook_table_keeps_the_textbook_layout(
    dsn: str, pg: Any, unique_name: Callable[[str], str]
) -> None:
    """``spr bench``'s textbook merge is measured on a table without spr's choices."""
    mapping = TableMapping(table=unique_name("textbook"), offsets_table=unique_name("offsets"))
    with PostgresSink(dsn, group_id="g", mapping=mapping) as sink:
        create_textbook_table(sink.connect(), mapping.table)
        sink.init_schema(fit_existing_table=True)  # adds only the offsets and gaps tables
        collations = _collations(pg, mapping.table)
        assert (collations["entity_type"], collations["entity_id"]) == ("default", "default")
        assert sink.flush(batch_of((event("1", 1, "created"), 0))).applied == 1
    for table in (mapping.table, mapping.offsets_table, mapping.gaps_table):
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def test_orders_table_is_fitted_and_mapped(
    dsn: str, pg: Any, unique_name: Callable[[str], str]
) -> None:
    table = unique_name("orders")
    # The field report's table, as a user already has it (no sequence column).
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (order_id text PRIMARY KEY, status text, payload jsonb, "
            "processed_at timestamptz)"
        ).format(sql.Identifier(table))
    )
    pg.execute(
        sql.SQL("INSERT INTO {} (order_id, status) VALUES ('legacy', 'imported')").format(
            sql.Identifier(table)
        )
    )
    mapping = TableMapping(
        table=table,
        offsets_table=unique_name("offsets"),
        columns=ORDERS_MAPPING.columns,
        key=ORDERS_MAPPING.key,
        now_columns=ORDERS_MAPPING.now_columns,
    )
    with PostgresSink(dsn, group_id="g", mapping=mapping) as sink:
        with pytest.raises(ConfigError, match=r"does not exist|lacks column"):
            sink.verify_schema()
        sink.init_schema()
        sink.init_schema()  # idempotent
        sink.verify_schema()
        batch = batch_of(
            (event("legacy", 7, "paid"), 0),
            (event("o-1", 1, "created"), 1),
            (event("o-1", 2, "paid"), 2),
            # Same id, another entity type: the key (order_id) collapses them in SQL.
            (event("o-2", 4, "newer", entity_type="payment"), 3),
            (event("o-2", 3, "older"), 4),
        )
        result = sink.flush(batch)
        assert result.rows == 4 and result.applied == 3
        sink.flush(batch_of((event("o-1", 1, "created"), 5)))  # older after newer
    # A user's table keeps its own layout: spr sets no collation on it.
    assert _collations(pg, table)["order_id"] == "default"
    got = pg.execute(
        sql.SQL(
            "SELECT order_id, status, sequence, payload->>'state', processed_at IS NOT NULL "
            "FROM {} ORDER BY order_id"
        ).format(sql.Identifier(table))
    ).fetchall()
    assert got == [
        ("legacy", "paid", 7, "paid", True),
        ("o-1", "paid", 2, "paid", True),
        ("o-2", "newer", 4, "newer", True),
    ]


def test_unreachable_database_is_one_sentence(unique_name: Callable[[str], str]) -> None:
    sink = PostgresSink(
        "postgresql://spr:secret@127.0.0.1:1/spr", group_id="g", connect_timeout_s=1
    )
    with pytest.raises(ServerUnavailable) as info:
        sink.connect()
    assert "secret" not in str(info.value) and "***" in str(info.value)


def test_db_init_command(dsn: str, pg: Any, unique_name: Callable[[str], str]) -> None:
    table = unique_name("cli_orders")
    done = subprocess.run(
        [sys.executable, "-m", "spr", "db", "init", "--dsn", dsn, "--table", table,
         "--mapping", "orders"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    columns = {
        r[0]
        for r in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
        ).fetchall()
    }
    assert columns == {"order_id", "status", "payload", "sequence", "processed_at"}
    bad = subprocess.run(
        [sys.executable, "-m", "spr", "db", "init", "--dsn", "postgresql://u:pw@127.0.0.1:1/x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "pw" not in bad.stderr
