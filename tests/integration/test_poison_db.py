"""The poison corpus's DATA cases are rejected by PostgreSQL and classified DATA.

They pass the decoder, so only the database can reject them; this proves the class the
corpus claims, on the same binary COPY path the engine uses (spr.batch.Batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import psycopg
import pytest
from psycopg import sql

from spr.batch import COLUMN_TYPES, STATE_COLUMNS, Batch
from spr.classify import ErrorClass, classify, error_reason
from spr.decode import Event, decode_event
from spr.sink.isolate import isolate_poison
from spr.testing.poison import CORPUS, PoisonCase, evaluate, key_of, valid_event

DECODABLE = [case for case in CORPUS if case.expected in (None, ErrorClass.DATA)]


def _copy(pg: psycopg.Connection[tuple[object, ...]], table: str, case: PoisonCase) -> None:
    event, _, _ = evaluate(case)
    assert event is not None
    batch = Batch(STATE_COLUMNS)
    batch.add(event, "poison", 0, 100)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS)
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
        sql.Identifier(table), columns, sql.SQL(Batch.COPY_FORMAT)
    )
    with pg.transaction(), pg.cursor() as cur, cur.copy(statement) as copy:
        copy.write(batch.copy_data())


@pytest.mark.parametrize("case", DECODABLE, ids=lambda case: case.name)
def test_decodable_cases_meet_postgres(
    case: PoisonCase,
    pg: psycopg.Connection[tuple[object, ...]],
    unique_name: Callable[[str], str],
) -> None:
    table = unique_name("poison")
    definition = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(COLUMN_TYPES[c])) for c in STATE_COLUMNS
    )
    pg.execute(
        sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (entity_type, entity_id))").format(
            sql.Identifier(table), definition
        )
    )
    try:
        if case.expected is None:
            _copy(pg, table, case)
            row = pg.execute(
                sql.SQL("SELECT entity_id, state, payload::text FROM {}").format(
                    sql.Identifier(table)
                )
            ).fetchone()
            assert row is not None
            event, _, _ = evaluate(case)
            assert event is not None and row[0] == event.entity_id and row[1] == event.state
        else:
            with pytest.raises(psycopg.Error) as caught:
                _copy(pg, table, case)
            assert classify(caught.value) is ErrorClass.DATA, error_reason(caught.value)
            assert case.reason in str(caught.value), error_reason(caught.value)
    finally:
        pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))


def test_bisection_in_savepoints_isolates_exactly_the_rejected_rows(
    pg: psycopg.Connection[tuple[object, ...]], unique_name: Callable[[str], str]
) -> None:
    """One transaction; each bisection step in a savepoint; only poison rows left out."""
    table = unique_name("bisect")
    definition = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(COLUMN_TYPES[c])) for c in STATE_COLUMNS
    )
    pg.execute(
        sql.SQL(
            "CREATE TABLE {} ({}, PRIMARY KEY (entity_type, entity_id), "
            "CHECK (state <> 'forbidden'))"
        ).format(sql.Identifier(table), definition)
    )
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS)
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(table), columns
    )
    rows: list[tuple[Event, int]] = []
    for i in range(40):
        state = "forbidden" if i in (7, 30) else "paid"
        value = json.dumps(valid_event(f"ok-{i}", state=state)).encode()
        rows.append((decode_event(value, offset=i, timestamp_ms=0), i))
    data_cases = [case for case in CORPUS if case.expected is ErrorClass.DATA]
    for n, case in enumerate(data_cases):
        event, _, _ = evaluate(case)
        assert event is not None and case.key == key_of(event.entity_type, event.entity_id)
        rows.insert(10 + 9 * n, (event, 100 + n))

    def apply(chunk: Sequence[tuple[Event, int]]) -> None:
        batch = Batch(STATE_COLUMNS)
        for event, offset in chunk:
            batch.add(event, "poison", 0, offset)
        with pg.transaction(), pg.cursor() as cur, cur.copy(statement) as copy:
            copy.write(batch.copy_data())

    try:
        with pg.transaction():  # the flush's one transaction; apply() nests savepoints
            result = isolate_poison(rows, apply)
        rejected = {event.entity_id for (event, _), _ in result.rejected}
        expected = {"ok-7", "ok-30"} | {
            decode_event(c.value, offset=0, timestamp_ms=0).entity_id for c in data_cases
        }
        assert rejected == expected
        assert all(classify(error) is ErrorClass.DATA for _, error in result.rejected)
        stored = {
            row[0]
            for row in pg.execute(
                sql.SQL("SELECT entity_id FROM {}").format(sql.Identifier(table))
            ).fetchall()
        }
        assert stored == {f"ok-{i}" for i in range(40)} - {"ok-7", "ok-30"}
        assert result.applied == 38
    finally:
        pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
