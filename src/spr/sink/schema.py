"""The tables one mapping needs (design §5): state, offsets and retention gaps.

:class:`TableSchema` holds their quoted names and knows how to create them, fit an
existing state table to the mapping, and check that they fit. Every identifier from
configuration goes through :mod:`psycopg.sql`, never into the SQL text. Each method
takes the connection to use and blocks on it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from spr._event import COLUMN_TYPES
from spr.config import TableMapping
from spr.errors import ConfigError

__all__ = ["OFFSETS_COLUMNS_DDL", "STAGING_TABLE", "TableSchema", "qualified"]

#: The per-connection temporary table a flush COPYs into (``ON COMMIT DELETE ROWS``).
STAGING_TABLE = "spr_staging"

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


def qualified(schema: str | None, name: str) -> sql.Identifier:
    """``name``, in ``schema`` when given, as a quoted (possibly two-part) identifier."""
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


class TableSchema:
    """The state, offsets and gaps tables of one :class:`TableMapping`."""

    def __init__(self, mapping: TableMapping) -> None:
        self.mapping = mapping
        self.table = qualified(mapping.schema, mapping.table)
        self.offsets = qualified(mapping.schema, mapping.offsets_table)
        self.gaps = qualified(mapping.schema, mapping.gaps_table)

    def init(self, conn: psycopg.Connection[Any]) -> None:
        """Create the state and offsets tables, or fit an existing state table.

        Idempotent, in one transaction. A missing table is created with every mapped
        column, the ``now`` columns (default ``now()``) and a primary key on the
        mapping's key. An existing table (a user's own, like ``orders``) gains any mapped
        column it lacks, notably the sequence column of the guard, and a unique index on
        the key when it has no matching primary key or unique constraint. Raises on
        database errors.
        """
        mapping = self.mapping
        with conn.transaction():
            if mapping.schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(mapping.schema))
                )
            # Serialise concurrent `spr db init` / auto-create runs.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('spr.init_schema'))")
            if self.regclass(conn, self.table) is None:
                conn.execute(self._create_state_table())
            else:
                self._fit_state_table(conn)
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    self.offsets, sql.SQL(OFFSETS_COLUMNS_DDL)
                )
            )
            self.create_gaps_table(conn)

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
                    sql.Identifier(f"{mapping.table}_spr_key"),
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
                    sql.Identifier(target), sql.SQL(COLUMN_TYPES[source]), sql.SQL(nullable)
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
        what is missing and that ``spr db init`` (or auto-create) fixes it."""
        mapping = self.mapping
        for ident, name in ((self.table, mapping.table), (self.offsets, mapping.offsets_table)):
            if self.regclass(conn, ident) is None:
                raise ConfigError(f"table {name} does not exist; {_HINT}")
        present = self.columns_of(conn, self.table)
        wanted = [t for t, _ in mapping.columns] + list(mapping.now_columns)
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ConfigError(
                f"table {mapping.table} lacks column(s) {', '.join(missing)}; {_HINT}"
            )
        if not self.has_unique_key(conn):
            raise ConfigError(
                f"table {mapping.table} has no primary key or unique index on "
                f"({', '.join(mapping.key)}); {_HINT}"
            )

    @staticmethod
    def regclass(conn: psycopg.Connection[Any], ident: sql.Identifier) -> Any:
        """The relation's oid, or None when there is no such relation."""
        row = conn.execute("SELECT to_regclass(%s)::oid", (ident.as_string(conn),)).fetchone()
        return None if row is None else row[0]

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
