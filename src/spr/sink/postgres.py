"""The PostgreSQL sink: one batch, one transaction, state and offsets together.

A flush (:meth:`PostgresSink.flush`) is a single transaction of three statements:

1. ``COPY`` the batch (binary) into a per-connection temporary staging table;
2. ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE ... WHERE excluded.sequence >
   table.sequence``: the sequence guard, so a row only ever moves forward;
3. upsert the consumed offsets with ``GREATEST``, so an offset never moves backwards.

Because both effects commit together and both are monotonic, a flush is idempotent: a
replay after a crash, a retry after an ambiguous commit, or a stale owner's late batch
(a zombie) can never regress state or offsets.

A commit whose outcome is unknown (the connection died after ``COMMIT`` was sent) is
resolved from the database, never guessed (:func:`commit_outcome`): once reconnected,
the offsets stored for the batch's partitions say whether it committed. Every statement
runs under the connection's ``statement_timeout``; every identifier is quoted with
:mod:`psycopg.sql`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg
from psycopg import sql

from spr._event import STATE_COLUMNS
from spr.classify import ErrorClass, classify
from spr.config import DEFAULT_MAPPING, TableMapping
from spr.errors import CommitsLost, ConfigError, SchemaMismatch
from spr.logs import redact
from spr.sink.connection import DEAD_LETTER_IDLE_TIMEOUT_MS, SinkConnection
from spr.sink.isolate import isolate_poison, shared_failure
from spr.sink.outcome import (
    CommitOutcome,
    UnknownCommit,
    commit_outcome,
    lost_commits_error,
    lost_offsets,
)
from spr.sink.schema import STAGING_TABLE, TableSchema, staging_columns

if TYPE_CHECKING:
    from spr.config import EngineConfig

from spr.routing import partition_key

_Sink = TypeVar("_Sink", bound="PostgresSink")

__all__ = [
    "STAGING_TABLE",
    "BatchLike",
    "CommitOutcome",
    "DeadLetterRows",
    "FlushResult",
    "PostgresSink",
    "RejectedRow",
    "commit_outcome",
    "is_transient",
    "lost_offsets",
    "redact_dsn",
]

log = logging.getLogger("spr.sink")


_COPY_FORMATS = {"binary": sql.SQL("binary"), "text": sql.SQL("text"), "csv": sql.SQL("csv")}


class BatchLike(Protocol):
    """What :meth:`PostgresSink.flush` needs from a batch (:class:`spr.batch.Batch`)."""

    COPY_FORMAT: str

    @property
    def columns(self) -> tuple[str, ...]: ...

    @property
    def row_count(self) -> int: ...

    def next_offsets(self) -> dict[tuple[str, int], int]: ...

    def copy_data(self) -> bytes: ...

    def rows(self) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True, kw_only=True)
class FlushResult:
    """What one committed flush did.

    ``rows`` were staged; ``applied`` of them inserted or replaced a row; ``stale`` were
    refused by the sequence guard (an equal or newer sequence was already stored).
    ``rejected`` were refused by the database for their content (class DATA) and
    dead-lettered before the commit; ``rows == applied + stale + rejected``.
    ``offsets`` is the batch's ``(topic, partition) -> next offset``, now durable.
    """

    rows: int
    applied: int
    stale: int
    offsets: Mapping[tuple[str, int], int]
    rejected: int = 0


@dataclass(frozen=True, kw_only=True)
class RejectedRow:
    """A staged row that PostgreSQL refused on its own (class DATA).

    ``topic``/``partition``/``offset`` name the Kafka message the row came from (the
    newest event of its entity in the batch); ``error`` is the database's error.
    ``key`` (the entity's partition key) and ``value`` (the event's original JSON) let a
    dead letter be rebuilt when that message can no longer be read back.
    """

    topic: str
    partition: int
    offset: int
    error: BaseException
    key: bytes | None = None
    value: bytes | None = None


#: ``dead_letter(rows)`` of :meth:`PostgresSink.flush`: called inside the flush's
#: transaction, before the offsets move past the rows; it must block until every row is
#: durably dead-lettered, or raise (the whole transaction then rolls back).
DeadLetterRows = Callable[[Sequence[RejectedRow]], None]

_ENTITY_TYPE_INDEX = STATE_COLUMNS.index("entity_type")
_ENTITY_ID_INDEX = STATE_COLUMNS.index("entity_id")
_PAYLOAD_INDEX = STATE_COLUMNS.index("payload")
_TOPIC_INDEX = STATE_COLUMNS.index("kafka_topic")
_PARTITION_INDEX = STATE_COLUMNS.index("kafka_partition")
_OFFSET_INDEX = STATE_COLUMNS.index("kafka_offset")


def is_transient(exc: BaseException) -> bool:
    """True when a retry can cure ``exc``: :func:`spr.classify.classify` says TRANSIENT
    (connection loss, serialization failure, deadlock, lock or statement timeout,
    shutdown, resource exhaustion). Kept for callers of the sink; the table lives in
    :mod:`spr.classify`."""
    return classify(exc) is ErrorClass.TRANSIENT


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe to print or log
    (:func:`spr.logs.redact`, the one redaction rule)."""
    return redact(dsn)


class PostgresSink:
    """Writes batches and offsets to PostgreSQL for one consumer group.

    One sink owns one connection and is not thread-safe, except :meth:`cancel`, which
    any thread may call to abort the statement in progress. Methods block on the
    database. Connection failures raise :class:`ServerUnavailable`; other database
    errors propagate as :class:`psycopg.Error` (see :func:`spr.classify.classify`). After an
    error the sink reconnects on its next call.

    ``synchronous_commit`` is the sessions' ``synchronous_commit`` (None, the default,
    leaves the server's setting); the engine sets it on the sink that flushes batches
    (:attr:`EngineConfig.synchronous_commit`). Offsets commit with their rows, so a
    database crash under ``"off"`` loses rows and offsets together. To notice it, the
    engine also sets :attr:`durable_offsets` before each flush: every new connection
    then first checks that the stored offsets are not below them, and raises
    :class:`CommitsLost` (transient) instead of flushing past commits the database lost;
    :attr:`lost_commits` keeps that error for the engine, which consumes them again.
    """

    def __init__(
        self,
        dsn: str,
        *,
        group_id: str | None = None,
        mapping: TableMapping = DEFAULT_MAPPING,
        statement_timeout_ms: int = 30_000,
        connect_timeout_s: float = 5.0,
        application_name: str = "spr",
        dead_letter: DeadLetterRows | None = None,
        synchronous_commit: str | None = None,
    ) -> None:
        self.dsn = dsn
        #: Receives the rows the database rejects (see :meth:`flush`); settable.
        self.dead_letter = dead_letter
        self.group_id = group_id
        self.mapping = mapping
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        #: The next offsets known committed, ``(topic, partition) -> offset``, checked on
        #: every new connection (see the class); None checks nothing. Settable; replace
        #: the mapping rather than change it (the flush thread reads it).
        self.durable_offsets: Mapping[tuple[str, int], int] | None = None
        #: The :class:`CommitsLost` the last check raised, until its reader clears it.
        self.lost_commits: CommitsLost | None = None
        #: A flush whose COMMIT was sent but never answered, until a later flush of the
        #: same batch resolves it (see :func:`commit_outcome`).
        self._unknown_commit: UnknownCommit | None = None
        #: How many unknown commits were resolved, by outcome (for logs and tests).
        self.unknown_commits: dict[str, int] = {}
        self._session = SinkConnection(
            dsn,
            statement_timeout_ms=statement_timeout_ms,
            connect_timeout_s=connect_timeout_s,
            application_name=application_name,
            setup=self._on_connect,
            synchronous_commit=synchronous_commit,
        )
        self.schema = TableSchema(mapping)
        self._table = self.schema.table
        self._offsets = self.schema.offsets
        self._gaps = self.schema.gaps
        self._merge_sql = self.schema.merge_statement()
        self._offsets_sql = self.schema.offsets_upsert()

    # -- connection -------------------------------------------------------------------

    def connection_options(self) -> dict[str, Any]:
        """The connection's keepalives and ``tcp_user_timeout`` (see
        :meth:`SinkConnection.options`)."""
        return self._session.options()

    @property
    def synchronous_commit(self) -> str | None:
        """The sessions' ``synchronous_commit``, or None for the server's setting.
        Settable; a new value applies from the next connection on (set it before the
        first flush)."""
        return self._session.synchronous_commit

    @synchronous_commit.setter
    def synchronous_commit(self, value: str | None) -> None:
        self._session.synchronous_commit = value

    @classmethod
    def from_config(cls: type[_Sink], config: EngineConfig) -> _Sink:
        """The sink an engine with ``config`` writes through (not yet connected)."""
        return cls(
            config.dsn,
            group_id=config.group_id,
            mapping=config.mapping,
            statement_timeout_ms=config.statement_timeout_ms,
            connect_timeout_s=config.connect_timeout_s,
            application_name=f"spr:{config.group_id}",
        )

    def connect(self) -> psycopg.Connection[Any]:
        """Open the connection if it is not open; raises ServerUnavailable."""
        return self._session.get()

    def close(self) -> None:
        """Close the connection (idempotent; never raises)."""
        self._session.close()

    def cancel(self) -> None:
        """Abort the statement running on this sink's connection, from any thread.

        The flush in progress fails with QueryCanceled and its transaction rolls back,
        unless it had already committed. Never raises; a no-op when idle.
        """
        self._session.cancel()

    def _on_connect(self, conn: psycopg.Connection[Any]) -> None:
        _create_staging(conn)
        expected = self.durable_offsets
        if expected and self.group_id:
            self._check_durable(conn, self.group_id, dict(expected))

    def _check_durable(
        self, conn: psycopg.Connection[Any], group: str, expected: dict[tuple[str, int], int]
    ) -> None:
        # A new connection may follow a crash that lost the last asynchronous commits;
        # a flush on it would move the offsets past them (GREATEST), skipping their
        # events for good. Reads the stored offsets once per connection, not per flush.
        stored = _read_offsets(conn, self._offsets, group, {t for t, _ in expected})
        error = lost_commits_error(expected, stored)
        if error is not None:
            self.lost_commits = error
            raise error

    def __enter__(self) -> PostgresSink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -----------------------------------------------------------------------

    def init_schema(self, *, fit_existing_table: bool = False) -> None:
        """Create the tables, or fit an existing state table (see :meth:`TableSchema.init`:
        a table without the mapping's key columns is refused unless
        ``fit_existing_table``)."""
        self.schema.init(self.connect(), fit_existing_table=fit_existing_table)

    def verify_schema(self) -> None:
        """Check that the tables exist and fit the mapping (see :meth:`TableSchema.verify`)."""
        self.schema.verify(self.connect())

    def ensure_schema(self, *, auto_create: bool) -> None:
        """``init_schema`` when ``auto_create``, else ``verify_schema``."""
        if auto_create:
            self.init_schema()
        else:
            self.verify_schema()

    # -- flush ------------------------------------------------------------------------

    def flush(self, batch: BatchLike) -> FlushResult:
        """Write one batch and its offsets in one transaction; blocks until committed.

        The batch's columns must be :data:`spr.batch.STATE_COLUMNS` (the staging layout).
        An empty batch with offsets still moves the offsets. On any error the
        transaction is rolled back and the error propagates (connection loss as
        :class:`ServerUnavailable` or :class:`psycopg.OperationalError`); nothing is
        half-written. Calling it again with the same batch is always safe.

        When the database rejects the batch for a row's content (class DATA) and
        :attr:`dead_letter` is set, the batch is applied again in a new transaction,
        bisected in savepoints (:func:`spr.sink.isolate.isolate_poison`): every row that
        passes is applied, the rows that fail alone go to ``dead_letter`` before the
        offsets upsert and the commit, so the offsets never pass a row that was neither
        applied nor dead-lettered. Without a ``dead_letter`` the DATA error propagates.

        A rejection that is a schema problem rather than bad data raises
        :class:`SchemaMismatch` (FATAL) instead, with nothing committed and nothing
        dead-lettered: every row of the batch failed alone for one reason on a column or
        constraint the mapping does not write (a batch of one row included: that column's
        value never comes from an event, so the next event would fail the same way), or
        the first rejection already proves it (see :meth:`TableSchema.schema_problem`).
        """
        if tuple(batch.columns) != STATE_COLUMNS:
            raise ConfigError("the sink stages every column: build the Batch with STATE_COLUMNS")
        copy_format = _COPY_FORMATS.get(batch.COPY_FORMAT)
        if copy_format is None:
            raise ConfigError(f"unsupported COPY format {batch.COPY_FORMAT!r}")
        if not self.group_id:
            raise ConfigError("the sink needs a consumer group id to store offsets")
        offsets = batch.next_offsets()
        rows = batch.row_count
        unknown, self._unknown_commit = self._unknown_commit, None
        if unknown is not None and unknown.offsets == offsets and self._resolve_unknown(unknown):
            stale = unknown.rows - unknown.applied
            return FlushResult(rows=rows, applied=unknown.applied, stale=stale, offsets=offsets)
        previous = dict(self.durable_offsets) if self.durable_offsets is not None else None
        conn = self.connect()
        committing = False
        applied = 0
        try:
            with conn.transaction(), conn.cursor() as cur:
                if rows:
                    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
                        sql.Identifier(STAGING_TABLE),
                        sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS),
                        copy_format,
                    )
                    with cur.copy(copy_sql) as copy:
                        # Streamed in ~1 MB pieces: a 40k-row batch is ~12 MB of COPY
                        # data, which need not exist in memory all at once.
                        chunks = getattr(batch, "copy_chunks", None)
                        for chunk in chunks() if chunks else (batch.copy_data(),):
                            copy.write(chunk)
                    cur.execute(self._merge_sql)
                    applied = max(cur.rowcount, 0)
                self._upsert_offsets(cur, offsets)
                # Leaving the block sends COMMIT: an OperationalError from here on (the
                # connection lost, terminated, shut down) leaves the outcome unknown.
                committing = True
        except psycopg.Error as exc:
            self._session.after_error(conn, exc)
            if committing and isinstance(exc, psycopg.OperationalError):
                self._unknown_commit = UnknownCommit.after(exc, offsets, previous, rows, applied)
            if not rows or classify(exc) is not ErrorClass.DATA:
                raise
            # Before any bisection: a NOT NULL or CHECK on a column spr never writes
            # rejects every row alike, and bisecting 40k rows one savepoint at a time
            # would take minutes to find that out.
            problem = self.schema.schema_problem(conn, exc, every_row_failed=False)
            if problem is not None:
                raise SchemaMismatch(problem) from exc
            dead_letter = self.dead_letter
            if dead_letter is None:
                raise
            log.warning("a row of the batch was rejected (%s); isolating it", _first_line(exc))
            return self._flush_isolating(batch, offsets, dead_letter)
        return FlushResult(rows=rows, applied=applied, stale=rows - applied, offsets=offsets)

    def _resolve_unknown(self, unknown: UnknownCommit) -> bool:
        # Read on a new connection; while that fails the commit stays unknown.
        assert self.group_id is not None
        try:
            stored = self.load_offsets(self.group_id, {t for t, _ in unknown.offsets})
        except BaseException:
            self._unknown_commit = unknown
            raise
        try:
            return unknown.resolve(stored, self.group_id, self.unknown_commits)
        except CommitsLost as exc:
            self.lost_commits = exc
            raise

    def _flush_isolating(
        self,
        batch: BatchLike,
        offsets: dict[tuple[str, int], int],
        dead_letter: DeadLetterRows,
    ) -> FlushResult:
        # The rare path: rows as Python values, COPY in text format one chunk per
        # savepoint. Each chunk leaves the staging table empty (TRUNCATE inside the same
        # savepoint), so a chunk that fails leaves nothing behind.
        rows: list[tuple[Any, ...]] = batch.rows()
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(STAGING_TABLE),
            sql.SQL(", ").join(sql.Identifier(c) for c in STATE_COLUMNS),
        )
        truncate = sql.SQL("TRUNCATE {}").format(sql.Identifier(STAGING_TABLE))
        conn = self.connect()
        applied = 0
        try:
            with conn.transaction(), conn.cursor() as cur:

                def apply(chunk: Sequence[tuple[Any, ...]]) -> None:
                    nonlocal applied
                    with conn.transaction():
                        with cur.copy(copy_sql) as copy:
                            for row in chunk:
                                copy.write_row(row)
                        cur.execute(self._merge_sql)
                        merged = max(cur.rowcount, 0)
                        cur.execute(truncate)
                    applied += merged

                isolation = isolate_poison(rows, apply)
                shared = shared_failure(isolation, len(rows))
                if shared is not None:
                    problem = self.schema.schema_problem(conn, shared, every_row_failed=True)
                    if problem is not None:
                        # Raised inside the transaction: it rolls back, and no row is
                        # dead-lettered.
                        raise SchemaMismatch(problem) from shared
                rejected = [
                    RejectedRow(
                        topic=str(row[_TOPIC_INDEX]),
                        partition=int(row[_PARTITION_INDEX]),
                        offset=int(row[_OFFSET_INDEX]),
                        error=error,
                        key=partition_key(
                            f"{row[_ENTITY_TYPE_INDEX]}:{row[_ENTITY_ID_INDEX]}"
                        ).encode(),
                        value=_as_bytes(row[_PAYLOAD_INDEX]),
                    )
                    for row, error in isolation.rejected
                ]
                if rejected:
                    # Dead-lettering waits for Kafka inside the transaction: the idle
                    # bound must not end the session meanwhile.
                    cur.execute(
                        sql.SQL("SET LOCAL idle_in_transaction_session_timeout = {}").format(
                            sql.Literal(DEAD_LETTER_IDLE_TIMEOUT_MS)
                        )
                    )
                    dead_letter(rejected)
                self._upsert_offsets(cur, offsets)
        except psycopg.Error as exc:
            self._session.after_error(conn, exc)
            raise
        return FlushResult(
            rows=len(rows),
            applied=applied,
            stale=len(rows) - applied - len(rejected),
            offsets=offsets,
            rejected=len(rejected),
        )

    def _upsert_offsets(
        self,
        cur: psycopg.Cursor[Any],
        offsets: Mapping[tuple[str, int], int],
        *,
        group: str | None = None,
    ) -> None:
        if not offsets:
            return
        keys = sorted(offsets)
        cur.execute(
            self._offsets_sql,
            (
                group if group is not None else self.group_id,
                [t for t, _ in keys],
                [p for _, p in keys],
                [offsets[k] for k in keys],
            ),
        )

    # -- retention gaps -----------------------------------------------------------------

    def record_offset_gap(
        self,
        group: str,
        topic: str,
        partition: int,
        *,
        stored_offset: int,
        log_start: int,
        resumed_at: str,
        resume_offset: int,
    ) -> None:
        """Record that ``group`` skipped a retention gap on ``topic[partition]``: events
        ``stored_offset .. log_start - 1`` were deleted before being applied, and the
        partition resumes at ``resume_offset`` (chosen by ``resumed_at``: ``earliest``
        or ``latest``). In one transaction: a row in :attr:`TableMapping.gaps_table`
        (created when missing) and the group's stored offset moved up to
        ``resume_offset`` (never backwards). Blocks; raises on database errors."""
        conn = self.connect()
        try:
            with conn.transaction(), conn.cursor() as cur:
                self.schema.create_gaps_table(conn)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (group_id, topic, partition, stored_offset, log_start, "
                        "gap_events, resumed_at, resume_offset) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(self._gaps),
                    (
                        group,
                        topic,
                        partition,
                        stored_offset,
                        log_start,
                        log_start - stored_offset,
                        resumed_at,
                        resume_offset,
                    ),
                )
                self._upsert_offsets(cur, {(topic, partition): resume_offset}, group=group)
        except psycopg.Error as exc:
            self._session.after_error(conn, exc)
            raise

    # -- offsets ----------------------------------------------------------------------

    def load_offsets(self, group: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
        """The stored next offsets of ``group`` on ``topics``: ``(topic, partition) ->
        next_offset``. Partitions never flushed are absent. Blocks; raises on errors."""
        conn = self.connect()
        try:
            return _read_offsets(conn, self._offsets, group, topics)
        except psycopg.Error as exc:
            self._session.after_error(conn, exc)
            raise


def _create_staging(conn: psycopg.Connection[Any]) -> None:
    # The staging table lives as long as the connection; ON COMMIT DELETE ROWS
    # empties it after every flush, and a rollback discards it too.
    conn.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(STAGING_TABLE), staging_columns()
        )
    )


def _read_offsets(
    conn: psycopg.Connection[Any], offsets_table: sql.Composable, group: str, topics: Iterable[str]
) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        sql.SQL(
            "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s AND topic = ANY(%s)"
        ).format(offsets_table),
        (group, sorted(set(topics))),
    ).fetchall()
    return {(str(t), int(p)): int(n) for t, p, n in rows}


def _as_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
