"""A commit whose outcome is unknown, on the real PostgreSQL (issue 18).

The connection is lost after ``COMMIT`` was sent: either the server committed and the
answer was lost (simulated: the transaction commits, then the client's connection is
cut before it returns), or the server died inside the commit (real: a deferred
constraint trigger terminates its own backend while committing). The next flush of the
same batch reads the stored offsets and decides, never guesses: committed (reported as
such, nothing applied twice), not committed (flushed again), or another writer
(ConflictingWriter, fatal). Also the failover errors of the classification table, each
on a real session: a read-only transaction (25006) and an admin shutdown (57P01) are
transient and drop the session, so the next flush reconnects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from test_sink import batch_of, event, rows

from spr.classify import ErrorClass, classify
from spr.config import TableMapping
from spr.errors import ConflictingWriter
from spr.sink import PostgresSink

Names = Callable[[str], str]


@pytest.fixture
def sink(dsn: str, pg: Any, unique_name: Names) -> Iterator[PostgresSink]:
    mapping = TableMapping(table=unique_name("state"), offsets_table=unique_name("offsets"))
    with PostgresSink(dsn, group_id="g", mapping=mapping, statement_timeout_ms=5_000) as s:
        s.init_schema()
        s.durable_offsets = {}  # as the engine sets it: nothing committed yet
        yield s
    for table in (mapping.table, mapping.offsets_table, mapping.gaps_table):
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def stored(pg: Any, sink: PostgresSink) -> dict[tuple[str, int], int]:
    result = pg.execute(
        sql.SQL("SELECT topic, partition, next_offset FROM {}").format(
            sql.Identifier(sink.mapping.offsets_table)
        )
    ).fetchall()
    return {(t, p): n for t, p, n in result}


def cut_after_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next top-level transaction commits on the server, then the client's
    connection is cut before the answer is returned (the lost-reply case)."""
    original = psycopg.Transaction.__exit__
    armed = [True]

    def exit_then_cut(self: psycopg.Transaction, *exc: Any) -> Any:
        result = original(self, *exc)
        if armed[0] and exc[0] is None and not self.savepoint_name:
            armed[0] = False
            self.connection.pgconn.finish()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(psycopg.Transaction, "__exit__", exit_then_cut)


@pytest.fixture
def kill_on_commit(pg: Any, sink: PostgresSink, unique_name: Names) -> Iterator[None]:
    """A deferred trigger on the offsets table that terminates its own backend inside
    COMMIT, in sessions that set ``spr_test.kill_on_commit``: the server dies mid-commit
    and the transaction does not commit."""
    function = unique_name("kill_on_commit")
    pg.execute(
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF current_setting('spr_test.kill_on_commit', true) = 'on' THEN "
            "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END IF; "
            "RETURN NULL; END $$"
        ).format(sql.Identifier(function))
    )
    pg.execute(
        sql.SQL(
            "CREATE CONSTRAINT TRIGGER kill_on_commit AFTER INSERT OR UPDATE ON {} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(sink.mapping.offsets_table), sql.Identifier(function))
    )
    yield
    pg.execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(sql.Identifier(function)))


def test_a_commit_whose_reply_was_lost_is_found_committed(
    sink: PostgresSink, pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = batch_of((event("1", 1, "created"), 0), (event("2", 1, "created"), 1))
    cut_after_commit(monkeypatch)
    with pytest.raises(psycopg.OperationalError) as caught:
        sink.flush(batch)
    assert classify(caught.value) is ErrorClass.TRANSIENT
    assert stored(pg, sink) == {("t", 0): 2}  # it did commit
    result = sink.flush(batch)  # the engine's retry of the same batch
    assert sink.unknown_commits == {"committed": 1}
    # Reported as the commit it was: both rows applied once, nothing flushed again.
    assert (result.rows, result.applied, result.stale) == (2, 2, 0)
    assert stored(pg, sink) == {("t", 0): 2}
    assert len(rows(pg, sink.mapping.table)) == 2


@pytest.mark.usefixtures("kill_on_commit")
def test_a_commit_cut_off_inside_the_server_is_found_not_committed_and_flushed_again(
    sink: PostgresSink, pg: Any
) -> None:
    batch = batch_of((event("1", 1, "created"), 0), (event("2", 1, "created"), 1))
    sink.connect().execute("SET spr_test.kill_on_commit = 'on'")
    with pytest.raises(psycopg.OperationalError) as caught:
        sink.flush(batch)
    assert classify(caught.value) is ErrorClass.TRANSIENT
    assert stored(pg, sink) == {} and rows(pg, sink.mapping.table) == {}
    result = sink.flush(batch)  # a new session: the trigger lets it commit
    assert sink.unknown_commits == {"not committed": 1}
    assert (result.rows, result.applied) == (2, 2)
    assert stored(pg, sink) == {("t", 0): 2}


@pytest.mark.usefixtures("kill_on_commit")
def test_offsets_moved_by_another_writer_stop_the_flush(sink: PostgresSink, pg: Any) -> None:
    batch = batch_of((event("1", 1, "created"), 0), (event("2", 1, "created"), 1))
    sink.connect().execute("SET spr_test.kill_on_commit = 'on'")
    with pytest.raises(psycopg.OperationalError):
        sink.flush(batch)
    # Meanwhile something else wrote this group's offsets: neither before nor after.
    pg.execute(
        sql.SQL("INSERT INTO {} (group_id, topic, partition, next_offset) VALUES ('g', 't', 0, 1)")
        .format(sql.Identifier(sink.mapping.offsets_table))
    )  # fmt: skip
    with pytest.raises(ConflictingWriter, match=r"another writer") as caught:
        sink.flush(batch)
    assert classify(caught.value) is ErrorClass.FATAL
    assert stored(pg, sink) == {("t", 0): 1}  # and nothing was written over it


def test_a_read_only_session_is_transient_and_reconnects(sink: PostgresSink, pg: Any) -> None:
    # What a demoted primary, or a standby reached during failover, answers.
    sink.connect().execute("SET default_transaction_read_only = on")
    batch = batch_of((event("1", 1, "created"), 0))
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as caught:
        sink.flush(batch)
    assert caught.value.sqlstate == "25006"
    assert classify(caught.value) is ErrorClass.TRANSIENT
    assert sink.unknown_commits == {}  # refused before COMMIT: nothing unknown
    assert sink.flush(batch).applied == 1  # a new session, which may write
    assert stored(pg, sink) == {("t", 0): 1}


def test_an_admin_shutdown_of_the_session_is_transient_and_reconnects(
    sink: PostgresSink, pg: Any
) -> None:
    pid = sink.connect().info.backend_pid
    pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
    batch = batch_of((event("1", 1, "created"), 0))
    with pytest.raises(psycopg.OperationalError) as caught:
        sink.flush(batch)
    assert classify(caught.value) is ErrorClass.TRANSIENT
    result = sink.flush(batch)
    assert result.applied == 1 and sink.connect().info.backend_pid != pid
