"""Issue 11, data risk 4: schema-qualified table names, on the real broker and database.

``--table myschema.t`` must land in ``myschema.t`` (with the offsets and gaps tables in
``myschema``), not in ``public."myschema.t"``; a name PostgreSQL would truncate, and a
view or other non-table used as a table, get one sentence instead.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from helpers import end_offsets, produce_raw
from psycopg import sql

from spr.kafka.admin import KafkaAdmin

Pg = psycopg.Connection[tuple[Any, ...]]


def _spr(
    *args: str, bootstrap: str, dsn: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "SPR_BOOTSTRAP": bootstrap, "SPR_DSN": dsn}, check=False,
    )  # fmt: skip


@pytest.fixture
def schemas(pg: Pg) -> Iterator[Callable[[], str]]:
    """Unique schema names for one test; each is dropped with its contents afterwards,
    and so is any ``public."<schema>.*"`` table a wrong parse would have made."""
    made: list[str] = []

    def _schema() -> str:
        made.append(f"zq_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield _schema
    for name in made:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        stray = pg.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relname LIKE %s AND relkind = 'r'",
            (f"{name}.%",),
        ).fetchall()
        for (table,) in stray:
            pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("public", table)))


def _regclass(pg: Pg, *parts: str) -> Any:
    row = pg.execute("SELECT to_regclass(%s)", (sql.Identifier(*parts).as_string(pg),)).fetchone()
    return None if row is None else row[0]


def _state(pg: Pg, schema: str, table: str) -> list[tuple[Any, ...]]:
    return pg.execute(
        sql.SQL(
            "SELECT entity_type, entity_id, sequence, state FROM {} ORDER BY entity_type, entity_id"
        ).format(sql.Identifier(schema, table))
    ).fetchall()


def _offsets(pg: Pg, schema: str, group: str) -> dict[tuple[str, int], int]:
    rows = pg.execute(
        sql.SQL("SELECT topic, partition, next_offset FROM {} WHERE group_id = %s").format(
            sql.Identifier(schema, "spr_offsets")
        ),
        (group,),
    ).fetchall()
    return {(str(t), int(p)): int(o) for t, p, o in rows}


def test_run_and_replay_use_the_schema_of_a_qualified_name(
    bootstrap: str,
    dsn: str,
    pg: Pg,
    make_topic: Callable[..., str],
    schemas: Callable[[], str],
) -> None:
    schema, other = schemas(), schemas()
    topic = make_topic(partitions=2, prefix="qualified")
    events = [
        {"entity_type": "order", "entity_id": f"o{n}", "sequence": s, "state": f"s{s}"}
        for s in range(3)
        for n in range(15)
    ]
    produce_raw(bootstrap, topic, events)
    group = f"qualified-{uuid.uuid4().hex[:8]}"

    run = _spr("run", "--topic", topic, "--group", group, "--table", f"{schema}.t",
               "--auto-create-schema", "--idle-exit", "2", bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert run.returncode == 0, run.stderr

    expected = [("order", f"o{n}", 2, "s2") for n in sorted(range(15), key=lambda n: f"o{n}")]
    assert _state(pg, schema, "t") == expected
    ends = {k: v for k, v in end_offsets(bootstrap, topic).items() if v > 0}
    assert _offsets(pg, schema, group) == ends
    assert _regclass(pg, schema, "spr_offsets_gaps") is not None
    assert _regclass(pg, "public", f"{schema}.t") is None

    # Replay into a table of another schema: created there, with the replay group's
    # positions in that schema's offsets table, rebuilt to the same state.
    replay = _spr("replay", "--group", group, "--to-offset", "0", "--table", f"{schema}.t",
                  "--into", f"{other}.t2", bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    derived = f"{group}.replay.{other}.t2"
    assert f"set {derived} {topic}[0]: none -> 0" in replay.stdout
    assert _regclass(pg, other, "t2") is not None
    printed = re.search(r"^then run: (spr run .*)$", replay.stdout, re.MULTILINE)
    if printed:  # set up only: the printed command performs the replay
        argv = shlex.split(printed.group(1))
        assert argv[argv.index("--table") + 1] == f"{other}.t2"
        assert argv[argv.index("--group") + 1] == derived
        assert set(_offsets(pg, other, derived).values()) == {0}
        argv[argv.index("--idle-exit") + 1] = "2"
        rebuilt = _spr(*argv[1:], bootstrap=bootstrap, dsn=dsn)
        assert rebuilt.returncode == 0, rebuilt.stderr
    assert _state(pg, other, "t2") == expected
    assert _offsets(pg, other, derived) == ends
    assert _regclass(pg, "public", f"{other}.t2") is None
    assert _offsets(pg, schema, derived) == {}

    # Rewind in place, naming the offsets table explicitly (qualified).
    rewind = _spr("replay", "--group", group, "--to-offset", "0", "--table", f"{schema}.t",
                  "--offsets-table", f"{schema}.spr_offsets", bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert rewind.returncode == 0, rewind.stderr
    assert set(_offsets(pg, schema, group).values()) == {0}
    kafka = KafkaAdmin.for_bootstrap(bootstrap).group_offsets(group)
    assert {o for (t, _), o in kafka.items() if t == topic} == {0}


def test_a_name_postgresql_would_truncate_is_refused(
    dsn: str, pg: Pg, schemas: Callable[[], str]
) -> None:
    schema = schemas()
    long = "t" * 64
    for name, sentence in (
        (
            f"{schema}.{long}",
            f"spr db: table name '{schema}.{long}' is too long: its part '{long}' has 64 "
            "bytes, and PostgreSQL would cut it to 63; choose a shorter name\n",
        ),
        (
            long,
            f"spr db: table name '{long}' is too long (64 bytes), and PostgreSQL would cut "
            "it to 63; choose a shorter name\n",
        ),
    ):
        done = _spr("db", "init", "--table", name, bootstrap="", dsn=dsn)
        assert done.returncode == 2
        assert done.stderr == sentence
    assert pg.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None
    assert _regclass(pg, "public", long[:63]) is None


@pytest.mark.parametrize(
    ("kind", "ddl"),
    [
        ("view", "CREATE VIEW {} AS SELECT 1 AS x"),
        ("materialized view", "CREATE MATERIALIZED VIEW {} AS SELECT 1 AS x"),
        ("sequence", "CREATE SEQUENCE {}"),
        ("composite type", "CREATE TYPE {} AS (x int)"),
    ],
)
def test_a_non_table_used_as_a_table_is_one_sentence(
    bootstrap: str,
    dsn: str,
    pg: Pg,
    make_topic: Callable[..., str],
    schemas: Callable[[], str],
    kind: str,
    ddl: str,
) -> None:
    schema = schemas()
    pg.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    pg.execute(sql.SQL(ddl).format(sql.Identifier(schema, "v")))
    sentence = f"state table {schema}.v is a {kind}, not a table; name a table, or a new name for spr to create"
    init = _spr("db", "init", "--table", f"{schema}.v", bootstrap=bootstrap, dsn=dsn)
    assert init.returncode == 2
    assert init.stderr == f"spr db: {sentence}\n"
    if kind != "view":
        return
    topic = make_topic(partitions=1, prefix="qualified")
    for auto in ((), ("--auto-create-schema",)):
        run = _spr("run", "--topic", topic, "--group", f"g-{uuid.uuid4().hex[:6]}",
                   "--table", f"{schema}.v", "--idle-exit", "1", *auto,
                   bootstrap=bootstrap, dsn=dsn)  # fmt: skip
        assert run.returncode == 2
        assert run.stderr == f"spr run: {sentence}\n"
    # Nothing else was created beside it.
    assert pg.execute(
        "SELECT count(*) FROM pg_class WHERE relnamespace = to_regnamespace(%s)", (schema,)
    ).fetchone() == (1,)


def test_replay_into_a_bad_name_is_one_sentence(bootstrap: str, dsn: str) -> None:
    done = _spr("replay", "--group", "g", "--to-offset", "0", "--into", "a.b.c",
                bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "spr replay: --into table name 'a.b.c' has more than one dot; write TABLE or SCHEMA.TABLE\n"
    )
