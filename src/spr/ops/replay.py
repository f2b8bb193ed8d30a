"""``spr replay``: rewind a consumer group so its events are processed again.

The engine's offsets live in PostgreSQL (design §5, ``spr_offsets``); on assignment the
engine seeks to them, and its flushes move them only forward (``GREATEST``). A replay is
therefore an explicit administrative write: :func:`rewind` sets ``next_offset`` to the
requested position, *backwards* if need be, in one transaction, and sets the group's
Kafka committed offsets to the same positions before that transaction commits (if Kafka
refuses, nothing changes in the database).

The group must have no running members: a running engine would carry on from its own
position and its next flush would put the offsets back (``GREATEST``). Kafka refuses to
change the offsets of an active group too, and :func:`rewind` checks first so it can say
so plainly.

Replaying into the same state table re-applies only what the sequence guard lets
through: rows already at a newer or equal sequence stay as they are. That repairs
deleted rows, but does not rebuild a table. To rebuild, replay ``--into`` a fresh table:
:func:`rewind` then creates ``TABLE`` like the state table (``CREATE TABLE ... (LIKE ...
INCLUDING ALL)``: columns, defaults, primary key, indexes), stores the requested
positions for the derived group ``<group>.replay.<TABLE>`` (every partition of the
topics; with ``--partition`` the others start at their end, so only the chosen partition
is replayed), and prints the ``spr run`` command that performs the replay. The original
group and table are not touched.

Names: ``table``, ``offsets_table`` and ``into`` may be ``SCHEMA.TABLE`` (parsed by
:func:`spr.config.mapping.parse_table_name`, each part quoted). As everywhere in spr, an
unqualified offsets table lives in the state table's schema: the group's positions are
read from ``table``'s offsets table, and the replay's positions are written to the
offsets table of ``into`` (created, with its schema, when missing), which is where
``spr run --table INTO`` reads them.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from spr.config.defaults import default_bootstrap, default_dsn
from spr.config.mapping import TableMapping, TableName, parse_table_name
from spr.errors import ConfigError, ServerUnavailable
from spr.kafka.admin import KafkaAdmin
from spr.logs import redact
from spr.sink.schema import OFFSETS_COLUMNS_DDL, create_schema, existing_table, identifier

__all__ = [
    "ReplayPlan",
    "derived_group",
    "parse_timestamp_ms",
    "rewind",
]


def derived_group(group: str, table: str) -> str:
    """The group id that replays ``group``'s topics into ``table``."""
    return f"{group}.replay.{table}"


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds from an integer (already ms) or an ISO 8601 time; a time
    without a zone is UTC. Raises ConfigError."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--to-timestamp must be epoch milliseconds or an ISO 8601 time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, kw_only=True)
class ReplayPlan:
    """What :func:`rewind` did (or, with ``dry_run``, would do).

    ``positions`` are the new next offsets of ``target_group``; ``previous`` the stored
    ones before (absent when there were none). ``command`` is the ``spr run`` invocation
    that performs a replay ``--into`` a table (empty otherwise).
    """

    group: str
    target_group: str
    into: str | None
    positions: Mapping[tuple[str, int], int]
    previous: Mapping[tuple[str, int], int]
    dry_run: bool
    command: str = ""
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "target_group": self.target_group,
            "into": self.into,
            "dry_run": self.dry_run,
            "partitions": [
                {
                    "topic": t,
                    "partition": p,
                    "previous": self.previous.get((t, p)),
                    "next_offset": o,
                }
                for (t, p), o in sorted(self.positions.items())
            ],
            "command": self.command,
            "notes": list(self.notes),
        }


def rewind(
    group: str,
    *,
    to_offset: int | None = None,
    to_timestamp_ms: int | None = None,
    topics: Sequence[str] = (),
    partition: int | None = None,
    dsn: str | None = None,
    bootstrap: str | None = None,
    table: str = "spr_entity_state",
    offsets_table: str = "spr_offsets",
    into: str | None = None,
    dry_run: bool = False,
    kafka: Mapping[str, str] | None = None,
) -> ReplayPlan:
    """Set the group's stored positions (database and Kafka) back to ``to_offset`` or to
    the first offset at or after ``to_timestamp_ms``, or set up a replay ``into`` a fresh
    table. Exactly one of ``to_offset`` / ``to_timestamp_ms``.

    Blocks on Kafka and PostgreSQL. All database changes are one transaction, committed
    only after Kafka accepted the offsets. Raises ConfigError (active group, offset out of
    range, unknown topic or partition, table already exists, source table missing) and
    ServerUnavailable.
    """
    if not group:
        raise ConfigError("a consumer group is required (--group)")
    if (to_offset is None) == (to_timestamp_ms is None):
        raise ConfigError("give exactly one of --to-offset and --to-timestamp")
    if to_offset is not None and to_offset < 0:
        raise ConfigError(f"--to-offset must be >= 0, got {to_offset}")
    source = TableMapping(table=table, offsets_table=offsets_table)
    target = source
    if into is not None:
        if not into:
            raise ConfigError("--into needs a new table name, different from the state table")
        into_name = parse_table_name(into, what="--into table")
        target = TableMapping(table=str(into_name), offsets_table=offsets_table)
        taken = (source.state_name, source.offsets_name, source.gaps_name)
        if target.state_name in taken:
            raise ConfigError("--into needs a new table name, different from the state table")
    dsn = dsn or default_dsn()
    ops = KafkaAdmin.for_bootstrap(bootstrap or default_bootstrap(), kafka=kafka)
    ops.check_reachable()
    target_group = derived_group(group, str(target.state_name)) if into is not None else group
    try:
        conn = psycopg.connect(dsn, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ServerUnavailable(f"cannot connect to PostgreSQL at {redact(dsn)}") from exc
    with conn:
        source_offsets = identifier(source.offsets_name)
        target_offsets = identifier(target.offsets_name)
        has_offsets = existing_table(conn, source.offsets_name, "offsets table") is not None
        if not topics:
            rows = (
                conn.execute(
                    sql.SQL("SELECT DISTINCT topic FROM {} WHERE group_id = %s ORDER BY 1").format(
                        source_offsets
                    ),
                    (group,),
                ).fetchall()
                if has_offsets
                else []
            )
            topics = [str(r[0]) for r in rows]
            if not topics:
                raise ConfigError(
                    f"group {group} has no stored offsets in {source.offsets_name}; name a --topic"
                )
        topics = list(dict.fromkeys(topics))
        all_partitions = ops.partitions(topics)
        if partition is not None:
            chosen = [k for k in all_partitions if k[1] == partition]
            missing = [t for t in topics if (t, partition) not in chosen]
            if missing:
                raise ConfigError(f"topic {missing[0]} has no partition {partition}")
        else:
            chosen = all_partitions
        marks = ops.watermarks(all_partitions)
        positions = _positions(ops, chosen, marks, to_offset, to_timestamp_ms)
        notes: list[str] = []
        if into is not None and partition is not None:
            # Only the chosen partition is replayed into the new table.
            for key in all_partitions:
                positions.setdefault(key, marks[key][1])
            notes.append(f"only partition {partition} is replayed; the others start at their end")
        if into is not None and target.offsets_table != "spr_offsets":
            notes.append(
                f"the replay's positions are in {target.offsets_name}: a spr run finds them "
                f'only when its config file\'s [table] section sets offsets_table = "{offsets_table}"'
            )
        members = ops.group_members(target_group)
        if members:
            raise ConfigError(
                f"group {target_group} has {members} running member(s); stop its consumers "
                "first, or their next flush would move the offsets forward again"
            )
        try:
            with conn.transaction():
                if into is not None:
                    _create_like(conn, source, target)
                elif not has_offsets:
                    _create_offsets_table(conn, target.offsets_name)
                previous = _lock_previous(conn, target_offsets, target_group, list(positions))
                if into is not None:
                    # A previous replay into a table of that name (since dropped) left
                    # positions behind; they must not outlive it.
                    conn.execute(
                        sql.SQL("DELETE FROM {} WHERE group_id = %s").format(target_offsets),
                        (target_group,),
                    )
                _write_positions(conn, target_offsets, target_group, positions)
                if dry_run:
                    raise _DryRun
                # Kafka last: if it refuses, the transaction rolls back; nothing changed.
                ops.commit_group_offsets(target_group, positions)
        except _DryRun:
            pass
    command = ""
    if into is not None:
        command = _run_command(topics, target_group, str(target.state_name), dsn)
    else:
        notes.append(
            "the sequence guard keeps rows at a newer or equal sequence: replaying into the "
            "same table repairs missing rows; use --into to rebuild a table"
        )
    return ReplayPlan(
        group=group,
        target_group=target_group,
        into=into,
        positions=dict(positions),
        previous=previous,
        dry_run=dry_run,
        command=command,
        notes=tuple(notes),
    )


class _DryRun(Exception):
    """Rolls back the transaction of a dry run (caught below, never escapes)."""


def _positions(
    ops: KafkaAdmin,
    partitions: Sequence[tuple[str, int]],
    marks: Mapping[tuple[str, int], tuple[int, int]],
    to_offset: int | None,
    to_timestamp_ms: int | None,
) -> dict[tuple[str, int], int]:
    if to_timestamp_ms is not None:
        return ops.offsets_for_timestamp(partitions, to_timestamp_ms)
    assert to_offset is not None
    for key in partitions:
        low, high = marks[key]
        if not low <= to_offset <= high:
            raise ConfigError(
                f"offset {to_offset} is outside {key[0]}[{key[1]}], which holds offsets "
                f"{low}..{high} (log start..end)"
            )
    return dict.fromkeys(partitions, to_offset)


def _lock_previous(
    conn: psycopg.Connection[Any],
    offsets: sql.Composable,
    group: str,
    keys: Sequence[tuple[str, int]],
) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s "
            "AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::integer[])) "
            "ORDER BY topic, partition FOR UPDATE"
        ).format(offsets),
        (group, [t for t, _ in keys], [p for _, p in keys]),
    ).fetchall()
    return {(str(t), int(p)): int(o) for t, p, o in rows}


def _create_like(conn: psycopg.Connection[Any], source: TableMapping, target: TableMapping) -> None:
    """Create ``target``'s state table like ``source``'s, and ``target``'s offsets table
    and their schemas when missing, inside the caller's transaction."""
    into = target.state_name
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (identifier(into).as_string(conn),)
    ).fetchone()
    if row is not None and row[0]:
        raise ConfigError(f"table {into} already exists; choose a new name or drop it")
    if existing_table(conn, source.state_name, "state table") is None:
        raise ConfigError(
            f"state table {source.state_name} does not exist; run `spr db init` first"
        )
    existing_table(conn, target.offsets_name, "offsets table")
    create_schema(conn, into.schema)
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            identifier(into), identifier(source.state_name)
        )
    )
    _create_offsets_table(conn, target.offsets_name)


def _create_offsets_table(conn: psycopg.Connection[Any], name: TableName) -> None:
    create_schema(conn, name.schema)
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            identifier(name), sql.SQL(OFFSETS_COLUMNS_DDL)
        )
    )


def _write_positions(
    conn: psycopg.Connection[Any],
    offsets: sql.Composable,
    group: str,
    positions: Mapping[tuple[str, int], int],
) -> None:
    keys = sorted(positions)
    # Deliberately not GREATEST (the engine's flush guard): a replay moves offsets back.
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS o (group_id, topic, partition, next_offset, updated_at) "
            "SELECT %s, u.topic, u.partition, u.next_offset, now() "
            "FROM unnest(%s::text[], %s::integer[], %s::bigint[]) "
            "AS u(topic, partition, next_offset) "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE "
            "SET next_offset = excluded.next_offset, updated_at = now()"
        ).format(offsets),
        (group, [t for t, _ in keys], [p for _, p in keys], [positions[k] for k in keys]),
    )


def _run_command(topics: Sequence[str], group: str, table: str, dsn: str) -> str:
    parts = ["spr", "run"]
    for topic in topics:
        parts += ["--topic", topic]
    parts += ["--group", group, "--table", table]
    if dsn != default_dsn():
        parts += ["--dsn", redact(dsn)]
    parts += ["--idle-exit", "10"]
    return shlex.join(parts)
