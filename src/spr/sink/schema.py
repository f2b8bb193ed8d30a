"""The tables one mapping needs (design §5): state, offsets and retention gaps.

:class:`TableSchema` holds their quoted names and knows how to create them, fit an
existing state table to the mapping, check that they fit, and tell a schema problem
from bad data when PostgreSQL rejects rows. Every identifier from configuration goes
through :mod:`psycopg.sql`, one quoted part each (``schema``, ``table``), never into the
SQL text. Each method takes the connection to use and blocks on it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from spr._event import COLUMN_TYPES, STATE_COLUMNS
from spr.config import TableMapping
from spr.config.mapping import MAX_NAME_BYTES, TableName
from spr.errors import ConfigError

__all__ = [
    "OFFSETS_COLUMNS_DDL",
    "STAGING_TABLE",
    "TableSchema",
    "column_type",
    "create_schema",
    "existing_table",
    "identifier",
    "qualified",
    "staging_columns",
]

#: The per-connection temporary table a flush COPYs into (``ON COMMIT DELETE ROWS``).
STAGING_TABLE = "spr_staging"

#: How the key's text columns compare: byte order. Entity ids are identifiers, not
#: words, and the database's locale (even C.UTF-8 on PostgreSQL 15) compares through
#: strcoll: spr's flush inserted 4-10% fewer rows/s that way (``python -m
#: benchmarks.merge_choices``). Equality, and so joins with other tables, is the same
#: in either collation; only ORDER BY sees byte order.
KEY_COLLATION = "C"

#: The offsets table's columns (design §5); ``spr replay`` creates the same table.
OFFSETS_COLUMNS_DDL = (
    "group_id text NOT NULL, topic text NOT NULL, partition integer NOT NULL, "
    "next_offset bigint NOT NULL, updated_at timestamptz DEFAULT now(), "
    "PRIMARY KEY (group_id, topic, partition)"
)
_GAPS_COLUMNS_DDL = (
    "group_id text NOT NULL, topic text NOT NULL, partition integer NOT NULL, "
    "stored_offset bigint NOT NULL, log_start bigint NOT NULL, "
    "gap_events bigint NOT NULL, resumed_at text NOT NULL, "
    "resume_offset bigint NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now()"
)
_HINT = "run `spr db init` or pass --auto-create-schema"

# pg_class.relkind: what a name is when it is not a table spr can write.
_RELATION_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "f": "foreign table",
    "c": "composite type",
    "t": "TOAST table",
}
_TABLE_KINDS = frozenset("rp")

# A rejection that depends only on what spr leaves to the table (defaults), never on the
# row's values: NOT NULL and CHECK. Unique and foreign-key checks also depend on rows
# already stored, so only bisection can say whether every row fails.
_ROW_LOCAL_SQLSTATES = frozenset({"23502", "23514"})

_SQL_RELATION = "SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)"
# The columns behind a named constraint, or behind a unique index that is not one;
# attnum 0 (an expression) makes the columns unknowable.
_SQL_CONSTRAINT_COLUMNS = """
SELECT 0 = ANY(k.keys),
    ARRAY(SELECT a.attname::text FROM pg_attribute a
          WHERE a.attrelid = k.relid AND a.attnum = ANY(k.keys) ORDER BY a.attnum),
    EXISTS(SELECT 1 FROM pg_attribute a
           WHERE a.attrelid = k.relid AND a.attnum = ANY(k.keys) AND a.attgenerated <> '')
FROM (
    SELECT c.oid AS relid, COALESCE(con.conkey, '{}'::int2[]) AS keys
    FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE con.conname = %(constraint)s AND c.relname = %(table)s AND n.nspname = %(schema)s
    UNION ALL
    SELECT i.indrelid, i.indkey::int2[]
    FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
    JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE x.relname = %(constraint)s AND c.relname = %(table)s AND n.nspname = %(schema)s
) k LIMIT 1
"""
_SQL_COLUMN = """
SELECT a.attgenerated <> '' FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attname = %(column)s AND c.relname = %(table)s AND n.nspname = %(schema)s
AND a.attnum > 0 AND NOT a.attisdropped
"""
# The rejecting relation is the state table itself, a plain one, and no enabled BEFORE
# ROW INSERT/UPDATE trigger (tgtype bits: ROW 1, BEFORE 2, INSERT 4, UPDATE 16) can
# compute the column from the row: then its value is its default for every row.
_SQL_DEFAULTS_ONLY = """
SELECT c.relkind = 'r' AND NOT EXISTS (
    SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal
    AND t.tgenabled <> 'D' AND (t.tgtype & 3) = 3 AND (t.tgtype & 20) <> 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(state)s) AND c.relname = %(table)s AND n.nspname = %(schema)s
"""


def qualified(schema: str | None, name: str) -> sql.Identifier:
    """``name``, in ``schema`` when given, as a quoted (possibly two-part) identifier."""
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def identifier(name: TableName) -> sql.Identifier:
    """A parsed table name as a quoted identifier: ``"schema"."table"`` or ``"table"``."""
    return qualified(name.schema, name.name)


def existing_table(conn: psycopg.Connection[Any], name: TableName, what: str) -> int | None:
    """The oid of the table ``name``, or None when no relation has that name.

    Raises :class:`ConfigError` (one sentence, ``what`` says which of spr's tables) when
    the name belongs to a view, materialized view, sequence, index or anything else that
    is not a table, instead of the cryptic error a statement on it would give.
    """
    row = conn.execute(_SQL_RELATION, (identifier(name).as_string(conn),)).fetchone()
    if row is None:
        return None
    oid, kind = row
    if kind not in _TABLE_KINDS:
        described = _RELATION_KINDS.get(kind, f"relation of kind {kind!r}")
        raise ConfigError(
            f"{what} {name} is a {described}, not a table; name a table, or a new name "
            "for spr to create"
        )
    return int(oid)


def create_schema(conn: psycopg.Connection[Any], schema: str | None) -> None:
    """Create ``schema`` when it does not exist (no privilege is needed when it does)."""
    if not schema:
        return
    row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    if row is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def _key_index_name(table: str) -> str:
    # PostgreSQL would cut a longer name itself; cutting here keeps it whole characters.
    suffix = "_spr_key"
    room = MAX_NAME_BYTES - len(suffix)
    return table.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix


def column_type(source: str, *, key: bool) -> sql.Composable:
    """The type of a column holding the field ``source``; a text key column compares in
    :data:`KEY_COLLATION` (the state table's key, and the staging table's entity id)."""
    kind = COLUMN_TYPES[source]
    if key and kind == "text":
        return sql.SQL("{} COLLATE {}").format(sql.SQL(kind), sql.Identifier(KEY_COLLATION))
    return sql.SQL(kind)


def staging_columns() -> sql.Composed:
    """The staging table's column definitions: every field of :data:`STATE_COLUMNS`,
    the entity's identity in byte order, so that the merge's ``ORDER BY`` on the key
    (every mapping's key holds ``entity_id``) is a cheap sort."""
    identity = {"entity_type", "entity_id"}
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), column_type(c, key=c in identity))
        for c in STATE_COLUMNS
    )


class TableSchema:
    """The state, offsets and gaps tables of one :class:`TableMapping`."""

    def __init__(self, mapping: TableMapping) -> None:
        self.mapping = mapping
        self.table = identifier(mapping.state_name)
        self.offsets = identifier(mapping.offsets_name)
        self.gaps = identifier(mapping.gaps_name)

    def init(self, conn: psycopg.Connection[Any], *, fit_existing_table: bool = False) -> None:
        """Create the state and offsets tables, or fit an existing state table.

        Idempotent, in one transaction. Missing schemas are created. A missing table is
        created with every mapped column, the ``now`` columns (default ``now()``) and a
        primary key on the mapping's key. An existing table that has the mapping's key
        columns (a user's own, like ``orders`` with ``order_id``) gains any mapped
        column it lacks, notably the sequence column of the guard, and a unique index on
        the key when it has no matching primary key or unique constraint.

        An existing table without the key columns is somebody else's: unless
        ``fit_existing_table`` is set, it is refused with :class:`ConfigError` and
        nothing at all is changed. A name that belongs to a view, sequence, index or
        other non-table is refused too. Raises on database errors.
        """
        mapping = self.mapping
        with conn.transaction():
            # Serialise concurrent `spr db init` / auto-create runs.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('spr.init_schema'))")
            state = existing_table(conn, mapping.state_name, "state table")
            existing_table(conn, mapping.offsets_name, "offsets table")
            existing_table(conn, mapping.gaps_name, "gaps table")
            if state is not None and not fit_existing_table:
                self._refuse_foreign_table(conn)
            for schema in dict.fromkeys((mapping.schema, mapping.offsets_name.schema)):
                create_schema(conn, schema)
            if state is None:
                conn.execute(self._create_state_table())
            else:
                self._fit_state_table(conn)
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    self.offsets, sql.SQL(OFFSETS_COLUMNS_DDL)
                )
            )
            self.create_gaps_table(conn)

    def _refuse_foreign_table(self, conn: psycopg.Connection[Any]) -> None:
        present = self.columns_of(conn, self.table)
        missing = [c for c in self.mapping.key if c not in present]
        if missing:
            raise ConfigError(self._foreign_table_sentence(missing))

    def _foreign_table_sentence(self, missing: list[str]) -> str:
        return (
            f"table {self.mapping.state_name} already exists and has no column "
            f"{', '.join(missing)} (the mapping's key), so spr left it unchanged; choose a "
            "new --table name, map the table's own columns in the config file's [table] "
            "section, or run `spr db init --fit-existing-table` to add spr's columns to it"
        )

    def _fit_state_table(self, conn: psycopg.Connection[Any]) -> None:
        mapping = self.mapping
        for target, _ in mapping.columns:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    self.table, sql.Identifier(target), sql.SQL(mapping.column_type(target))
                )
            )
        for column in mapping.now_columns:
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} timestamptz DEFAULT now()"
                ).format(self.table, sql.Identifier(column))
            )
        if not self.has_unique_key(conn):
            conn.execute(
                sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(_key_index_name(mapping.table)),
                    self.table,
                    sql.SQL(", ").join(sql.Identifier(c) for c in mapping.key),
                )
            )

    def _create_state_table(self) -> sql.Composed:
        mapping = self.mapping
        not_null = {"sequence", "state"}
        parts: list[sql.Composable] = []
        for target, source in mapping.columns:
            nullable = " NOT NULL" if source in not_null or target in mapping.key else ""
            parts.append(
                sql.SQL("{} {}{}").format(
                    sql.Identifier(target),
                    column_type(source, key=target in mapping.key),
                    sql.SQL(nullable),
                )
            )
        for column in mapping.now_columns:
            parts.append(sql.SQL("{} timestamptz DEFAULT now()").format(sql.Identifier(column)))
        parts.append(
            sql.SQL("PRIMARY KEY ({})").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in mapping.key)
            )
        )
        return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            self.table, sql.SQL(", ").join(parts)
        )

    def merge_statement(self) -> sql.Composed:
        """The merge from the staging table with the sequence guard (design §5): insert,
        or update only when ``excluded.sequence > table.sequence``."""
        mapping = self.mapping
        targets = [t for t, _ in mapping.columns]
        sources = [s for _, s in mapping.columns]
        key_sources = [dict(mapping.columns)[k] for k in mapping.key]
        select_cols: list[sql.Composable] = [sql.Identifier(s) for s in sources]
        select_cols += [sql.SQL("now()") for _ in mapping.now_columns]
        insert_cols = [sql.Identifier(t) for t in [*targets, *mapping.now_columns]]
        if mapping.key_is_entity:
            # The batch already holds one row per entity; the ORDER BY gives concurrent
            # flushers (a zombie and the new owner) the same lock order: no deadlocks.
            select = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
                sql.SQL(", ").join(select_cols),
                sql.Identifier(STAGING_TABLE),
                sql.SQL(", ").join(sql.Identifier(s) for s in key_sources),
            )
        else:
            # The key drops part of the entity identity: collapse again, newest first.
            select = sql.SQL(
                "SELECT DISTINCT ON ({key}) {cols} FROM {staging} "
                "ORDER BY {key}, sequence DESC, kafka_offset DESC"
            ).format(
                key=sql.SQL(", ").join(sql.Identifier(s) for s in key_sources),
                cols=sql.SQL(", ").join(select_cols),
                staging=sql.Identifier(STAGING_TABLE),
            )
        updates = [
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(t))
            for t in [*targets, *mapping.now_columns]
            if t not in mapping.key
        ]
        seq = sql.Identifier(mapping.sequence_column)
        return sql.SQL(
            "INSERT INTO {table} AS t ({cols}) {select} "
            "ON CONFLICT ({key}) DO UPDATE SET {updates} "
            "WHERE t.{seq} IS NULL OR excluded.{seq} > t.{seq}"
        ).format(
            table=self.table,
            cols=sql.SQL(", ").join(insert_cols),
            select=select,
            key=sql.SQL(", ").join(sql.Identifier(k) for k in mapping.key),
            updates=sql.SQL(", ").join(updates),
            seq=seq,
        )

    def offsets_upsert(self) -> sql.Composed:
        """The offsets upsert; ``GREATEST`` never moves an offset backwards. Parameters:
        group, topics[], partitions[], next offsets[]."""
        return sql.SQL(
            "INSERT INTO {offsets} AS o (group_id, topic, partition, next_offset, updated_at) "
            "SELECT %s, u.topic, u.partition, u.next_offset, now() "
            "FROM unnest(%s::text[], %s::integer[], %s::bigint[]) "
            "AS u(topic, partition, next_offset) ORDER BY u.topic, u.partition "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE "
            "SET next_offset = GREATEST(o.next_offset, excluded.next_offset), updated_at = now()"
        ).format(offsets=self.offsets)

    def create_gaps_table(self, conn: psycopg.Connection[Any]) -> None:
        """Create ``<offsets_table>_gaps`` when missing (inside the caller's transaction)."""
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                self.gaps, sql.SQL(_GAPS_COLUMNS_DDL)
            )
        )

    def verify(self, conn: psycopg.Connection[Any]) -> None:
        """Check that the tables exist and fit the mapping; raises ConfigError saying
        what is missing and that ``spr db init`` (or auto-create) fixes it, or that the
        table is not spr's (no key columns) or not a table at all."""
        mapping = self.mapping
        for name, what in (
            (mapping.state_name, "state table"),
            (mapping.offsets_name, "offsets table"),
        ):
            if existing_table(conn, name, what) is None:
                raise ConfigError(f"table {name} does not exist; {_HINT}")
        existing_table(conn, mapping.gaps_name, "gaps table")
        present = self.columns_of(conn, self.table)
        missing_key = [c for c in mapping.key if c not in present]
        if missing_key:
            raise ConfigError(self._foreign_table_sentence(missing_key))
        wanted = [t for t, _ in mapping.columns] + list(mapping.now_columns)
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ConfigError(
                f"table {mapping.state_name} lacks column(s) {', '.join(missing)}; {_HINT}"
            )
        if not self.has_unique_key(conn):
            raise ConfigError(
                f"table {mapping.state_name} has no primary key or unique index on "
                f"({', '.join(mapping.key)}); {_HINT}"
            )

    @staticmethod
    def columns_of(conn: psycopg.Connection[Any], ident: sql.Identifier) -> set[str]:
        """The names of the relation's live columns."""
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped",
            (ident.as_string(conn),),
        ).fetchall()
        return {r[0] for r in rows}

    def has_unique_key(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether the state table has a primary key or unique index on exactly the
        mapping's key (the ``ON CONFLICT`` target)."""
        rows = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL "
            "AND i.indexprs IS NULL GROUP BY i.indexrelid",
            (self.table.as_string(conn),),
        ).fetchall()
        wanted = sorted(self.mapping.key)
        return any(sorted(r[0]) == wanted for r in rows)

    # -- rejected rows: a schema problem, or bad data? ------------------------------------

    def schema_problem(
        self, conn: psycopg.Connection[Any], error: BaseException, *, every_row_failed: bool
    ) -> str | None:
        """The sentence for a batch that PostgreSQL rejects because the table does not
        fit the mapping (design §6: a schema problem, not bad data), or None.

        ``error`` is the rejection of a row; it is a schema problem when PostgreSQL names
        a column (NOT NULL: ``column_name``) or a constraint (CHECK, unique, foreign key:
        ``constraint_name``) that involves no column the mapping writes, and either
        ``every_row_failed`` (the caller bisected the batch and every row failed with
        this same error), or the failure provably repeats for every row: a NOT NULL or
        CHECK rejection on the state table itself, a plain table without BEFORE ROW
        triggers, so the columns involved hold their defaults whatever the row says.
        A written or generated column, an expression index, or an error that names
        neither gives None: that may be the row's data. Blocks on catalog queries inside
        the caller's transaction (or autocommit); raises psycopg errors.
        """
        diag = getattr(error, "diag", None)
        sqlstate = getattr(error, "sqlstate", None)
        if diag is None or not sqlstate or not diag.table_name:
            return None
        if diag.table_name == STAGING_TABLE:  # spr's own COPY target: the row's values
            return None
        where = {"schema": diag.schema_name or "", "table": diag.table_name}
        written = {t for t, _ in self.mapping.columns} | set(self.mapping.now_columns)
        state = self.mapping.state_name
        shown = (
            str(state)
            if diag.table_name == state.name and state.schema in (None, diag.schema_name)
            else f"{diag.schema_name}.{diag.table_name}"
        )
        fix = "so nothing was committed; {}, or choose a table made for spr with --table"
        if diag.column_name:
            column = diag.column_name
            row = conn.execute(_SQL_COLUMN, {**where, "column": column}).fetchone()
            if column in written or (row is not None and row[0]):
                return None
            if sqlstate == "23502":
                cause = (
                    f"table {shown} rejects every row because its column {column} is NOT "
                    f"NULL and spr does not write it, "
                    + fix.format(f"give {column} a default or drop its NOT NULL")
                )
            else:
                cause = (
                    f"table {shown} rejects every row on its column {column}, which spr "
                    f"does not write (SQLSTATE {sqlstate}), "
                    + fix.format(f"change the column {column}")
                )
        elif diag.constraint_name:
            constraint = diag.constraint_name
            row = conn.execute(
                _SQL_CONSTRAINT_COLUMNS, {**where, "constraint": constraint}
            ).fetchone()
            if row is None:
                return None
            has_expression, columns, has_generated = row
            if has_expression or has_generated or written.intersection(columns):
                return None
            involves = (
                f"which involves only column(s) {', '.join(columns)} that spr does not write"
                if columns
                else "which involves no column spr writes"
            )
            cause = (
                f"table {shown} rejects every row on constraint {constraint}, {involves}, "
                + fix.format("change or drop the constraint")
            )
        else:
            return None
        if every_row_failed or self._defaults_only(conn, sqlstate, where):
            return cause
        return None

    def _defaults_only(
        self, conn: psycopg.Connection[Any], sqlstate: str, where: dict[str, str]
    ) -> bool:
        if sqlstate not in _ROW_LOCAL_SQLSTATES:
            return False
        row = conn.execute(
            _SQL_DEFAULTS_ONLY, {**where, "state": self.table.as_string(conn)}
        ).fetchone()
        return bool(row is not None and row[0])
