"""Issue 11, data risk 1: an existing table that is not spr's, on the real broker and
database.

``spr db init`` and ``spr run --auto-create-schema`` must not turn somebody else's table
into spr's (11 new columns and a unique index), and a batch that every row fails on a
column spr does not write is a schema problem (design §6: FATAL, nothing committed),
never a reason to dead-letter every event and move the offsets on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import end_offsets, produce_raw
from psycopg import sql

from spr.batch import STATE_COLUMNS, Batch
from spr.config import TableMapping
from spr.decode import Event
from spr.errors import SchemaMismatch
from spr.kafka.admin import KafkaAdmin
from spr.sink import PostgresSink
from spr.sink.postgres import RejectedRow

Pg = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def names(pg: Pg) -> Iterator[Callable[[str], str]]:
    """Unique table names for one test; every table of that name is dropped after it."""
    made: list[str] = []

    def _name(prefix: str) -> str:
        made.append(f"{prefix}_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield _name
    for name in made:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _config(tmp_path: Path, table: str, offsets: str) -> str:
    """A settings file that keeps this test's offsets out of the shared spr_offsets."""
    path = tmp_path / "spr.toml"
    path.write_text(f'[table]\nname = "{table}"\noffsets_table = "{offsets}"\n')
    return str(path)


def _spr(
    *args: str, bootstrap: str, dsn: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "SPR_BOOTSTRAP": bootstrap, "SPR_DSN": dsn}, check=False,
    )  # fmt: skip


def _users_table(pg: Pg, name: str) -> None:
    """Another application's table: its own key and a NOT NULL column spr never writes."""
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} (id serial PRIMARY KEY, email text NOT NULL, "
            "created timestamptz DEFAULT now())"
        ).format(sql.Identifier(name))
    )
    pg.execute(
        sql.SQL("INSERT INTO {} (email) VALUES ('ada@example.org')").format(sql.Identifier(name))
    )


def _layout(pg: Pg, name: str) -> list[tuple[Any, ...]]:
    """Columns and indexes: what an ALTER would change."""
    columns = pg.execute(
        "SELECT attname, atttypid::regtype::text, attnotnull FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (sql.Identifier(name).as_string(pg),),
    ).fetchall()
    indexes = pg.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = to_regclass(%s) "
        "ORDER BY 1",
        (sql.Identifier(name).as_string(pg),),
    ).fetchall()
    return columns + indexes


def _exists(pg: Pg, name: str) -> bool:
    row = pg.execute("SELECT to_regclass(%s)", (sql.Identifier(name).as_string(pg),)).fetchone()
    return row is not None and row[0] is not None


def _events(count: int) -> list[dict[str, Any]]:
    return [
        {"entity_type": "user", "entity_id": f"u{n}", "sequence": 1, "state": "active"}
        for n in range(count)
    ]


def _letters(bootstrap: str, dlq: str) -> int:
    return sum(end_offsets(bootstrap, dlq).values())


def _foreign_sentence(table: str) -> str:
    return (
        f"table {table} already exists and has no column entity_type, entity_id (the "
        "mapping's key), so spr left it unchanged; choose a new --table name, map the "
        "table's own columns in the config file's [table] section, or run `spr db init "
        "--fit-existing-table` to add spr's columns to it"
    )


def test_run_with_auto_create_refuses_an_unrelated_table_and_commits_nothing(
    bootstrap: str,
    dsn: str,
    pg: Pg,
    tmp_path: Path,
    make_topic: Callable[..., str],
    names: Callable[[str], str],
) -> None:
    topic = make_topic(partitions=2, prefix="risk1")
    dlq = make_topic(partitions=1, prefix="risk1-dlq")
    users, offsets = names("users"), names("offsets")
    names(f"{offsets}_gaps")
    _users_table(pg, users)
    before = _layout(pg, users)
    produce_raw(bootstrap, topic, _events(20))
    group = f"risk1-{uuid.uuid4().hex[:8]}"

    run = _spr("run", "--topic", topic, "--group", group, "--auto-create-schema",
               "--config", _config(tmp_path, users, offsets), "--dlq-topic", dlq,
               "--idle-exit", "3", bootstrap=bootstrap, dsn=dsn)  # fmt: skip

    assert run.returncode == 2, run.stderr
    assert run.stderr == f"spr run: {_foreign_sentence(users)}\n"
    assert "Traceback" not in run.stderr
    assert _layout(pg, users) == before  # no column, no index added
    assert pg.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(users))
    ).fetchone() == (1,)
    assert not _exists(pg, offsets) and not _exists(pg, f"{offsets}_gaps")  # one transaction
    assert KafkaAdmin.for_bootstrap(bootstrap).group_offsets(group) == {}
    assert _letters(bootstrap, dlq) == 0


def test_db_init_refuses_an_unrelated_table_unless_told_to_fit_it(
    dsn: str, pg: Pg, tmp_path: Path, names: Callable[[str], str]
) -> None:
    users, offsets = names("users"), names("offsets")
    names(f"{offsets}_gaps")
    _users_table(pg, users)
    before = _layout(pg, users)
    config = _config(tmp_path, users, offsets)

    refused = _spr("db", "init", "--config", config, bootstrap="", dsn=dsn)
    assert refused.returncode == 2
    assert refused.stderr == f"spr db: {_foreign_sentence(users)}\n"
    assert _layout(pg, users) == before
    assert not _exists(pg, offsets) and not _exists(pg, f"{offsets}_gaps")

    fitted = _spr("db", "init", "--config", config, "--fit-existing-table", bootstrap="", dsn=dsn)
    assert fitted.returncode == 0, fitted.stderr
    columns = {row[0] for row in _layout(pg, users) if len(row) == 3}
    assert {"id", "email", "created", *STATE_COLUMNS, "processed_at"} == columns
    assert _exists(pg, offsets) and _exists(pg, f"{offsets}_gaps")
    # The field report's case is unaffected: a table with the key column is fitted
    # without the flag (tests/integration/test_sink.py::test_db_init_command and
    # test_orders_table_is_fitted_and_mapped cover that path).


def test_a_fitted_table_whose_not_null_column_rejects_every_row_stops_the_run(
    bootstrap: str,
    dsn: str,
    pg: Pg,
    tmp_path: Path,
    make_topic: Callable[..., str],
    names: Callable[[str], str],
) -> None:
    topic = make_topic(partitions=2, prefix="risk1")
    dlq = make_topic(partitions=1, prefix="risk1-dlq")
    users, offsets = names("users"), names("offsets")
    names(f"{offsets}_gaps")
    _users_table(pg, users)
    config = _config(tmp_path, users, offsets)
    fitted = _spr("db", "init", "--config", config, "--fit-existing-table", bootstrap="", dsn=dsn)
    assert fitted.returncode == 0, fitted.stderr
    produce_raw(bootstrap, topic, _events(30))
    group = f"risk1-{uuid.uuid4().hex[:8]}"

    run = _spr("run", "--topic", topic, "--group", group, "--config", config,
               "--dlq-topic", dlq, "--idle-exit", "3", bootstrap=bootstrap, dsn=dsn)  # fmt: skip

    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"spr run: table {users} rejects every row because its "
        "column email is NOT NULL and spr does not write it, so nothing was committed; give "
        "email a default or drop its NOT NULL, or choose a table made for spr with --table\n"
    )
    assert pg.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(users))
    ).fetchone() == (1,)
    assert pg.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(offsets))
    ).fetchone() == (0,)
    assert KafkaAdmin.for_bootstrap(bootstrap).group_offsets(group) == {}
    assert _letters(bootstrap, dlq) == 0


# ----------------------------------------------------------- the sink's decision


def _event(n: int, state: str = "active", **payload: Any) -> Event:
    body = {"entity_type": "user", "entity_id": f"u{n}", "sequence": 1, "state": state, **payload}
    return Event(
        event_id=f"user:u{n}:1", entity_type="user", entity_id=f"u{n}", sequence=1,
        state=state, timestamp_ms=1_700_000_000_000, payload=json.dumps(body).encode(),
    )  # fmt: skip


def _batch(events: Sequence[Event]) -> Batch:
    batch = Batch(STATE_COLUMNS)
    for offset, event in enumerate(events):
        batch.add(event, "t", 0, offset)
    return batch


class _Letters:
    def __init__(self) -> None:
        self.rows: list[RejectedRow] = []

    def __call__(self, rows: Sequence[RejectedRow]) -> None:
        self.rows.extend(rows)


@pytest.fixture
def make_sink(
    dsn: str, pg: Pg, names: Callable[[str], str]
) -> Iterator[Callable[..., tuple[PostgresSink, _Letters]]]:
    """A sink on a fresh spr table, altered by the ``ddl`` statements (``{t}`` is the
    table, ``{f}`` a trigger function dropped afterwards), with a dead-letter recorder."""
    functions: list[str] = []
    sinks: list[PostgresSink] = []

    def _make(*ddl: str) -> tuple[PostgresSink, _Letters]:
        table, offsets = names("fit"), names("offsets")
        names(f"{offsets}_gaps")
        functions.append(f"{table}_fill")
        letters = _Letters()
        mapping = TableMapping(table=table, offsets_table=offsets)
        sink = PostgresSink(dsn, group_id="g", mapping=mapping, dead_letter=letters)
        sinks.append(sink)
        sink.init_schema()
        for statement in ddl:
            pg.execute(
                sql.SQL(statement).format(t=sql.Identifier(table), f=sql.Identifier(functions[-1]))
            )
        return sink, letters

    yield _make
    for sink in sinks:
        sink.close()
    for name in functions:
        pg.execute(sql.SQL("DROP FUNCTION IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _stored(sink: PostgresSink) -> tuple[int, dict[tuple[str, int], int]]:
    row = (
        sink.connect()
        .execute(sql.SQL("SELECT count(*) FROM {}").format(sink.schema.table))
        .fetchone()
    )
    assert row is not None
    return int(row[0]), sink.load_offsets("g", ["t"])


# A BEFORE trigger may compute the column from the row, so the first rejection proves
# nothing: the batch is bisected, and only "every row failed alone, for this same reason"
# makes it a schema problem.
_TRIGGER = (
    "ALTER TABLE {t} ADD COLUMN email text NOT NULL",
    "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "NEW.email := NEW.payload->>'email'; RETURN NEW; END $$",
    "CREATE TRIGGER fill BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()",
)


@pytest.mark.parametrize("rows", [1, 7])
def test_every_row_failing_on_an_unwritten_column_is_fatal_even_after_bisection(
    make_sink: Callable[..., tuple[PostgresSink, _Letters]], rows: int
) -> None:
    sink, letters = make_sink(*_TRIGGER)
    with pytest.raises(SchemaMismatch, match=r"rejects every row because its column email"):
        sink.flush(_batch([_event(n) for n in range(rows)]))
    assert letters.rows == []  # nothing dead-lettered
    assert _stored(sink) == (0, {})  # nothing committed


def test_some_rows_failing_on_an_unwritten_column_are_data(
    make_sink: Callable[..., tuple[PostgresSink, _Letters]],
) -> None:
    sink, letters = make_sink(*_TRIGGER)
    events = [_event(n, email=f"u{n}@example.org") if n % 3 else _event(n) for n in range(9)]
    result = sink.flush(_batch(events))
    assert (result.applied, result.rejected) == (6, 3)
    assert sorted(r.offset for r in letters.rows) == [0, 3, 6]
    assert _stored(sink) == (6, {("t", 0): 9})


def test_a_check_on_unwritten_columns_is_fatal_without_bisecting(
    make_sink: Callable[..., tuple[PostgresSink, _Letters]],
) -> None:
    sink, letters = make_sink(
        "ALTER TABLE {t} ADD COLUMN legacy int DEFAULT 0 CONSTRAINT legacy_set CHECK (legacy > 0)"
    )
    with pytest.raises(SchemaMismatch) as caught:
        sink.flush(_batch([_event(n) for n in range(2000)]))
    assert str(caught.value) == (
        f"table {sink.mapping.table} rejects every row on constraint legacy_set, which "
        "involves only column(s) legacy that spr does not write, so nothing was "
        "committed; change or drop the constraint, or choose a table made for spr with "
        "--table"
    )
    assert letters.rows == []
    assert _stored(sink) == (0, {})


def test_a_check_on_a_written_column_rejecting_every_row_is_still_data(
    make_sink: Callable[..., tuple[PostgresSink, _Letters]],
) -> None:
    sink, letters = make_sink("ALTER TABLE {t} ADD CONSTRAINT no_banned CHECK (state <> 'banned')")
    result = sink.flush(_batch([_event(n, state="banned") for n in range(5)]))
    assert (result.applied, result.rejected) == (0, 5)
    assert len(letters.rows) == 5
    assert _stored(sink) == (0, {("t", 0): 5})
