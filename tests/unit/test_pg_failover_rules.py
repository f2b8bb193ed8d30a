"""PostgreSQL failover, the pure parts (issue 18): the failover rows of the
classification table, the unknown-commit rule, and multi-host DSNs (accepted as they
are, passwords masked). The real promotions are in tests/pgfailover."""

from __future__ import annotations

import psycopg
import pytest

from spr.classify import ErrorClass, classify, classify_sqlstate
from spr.config.loading import check_dsn
from spr.errors import CommitsLost, ConflictingWriter, FormerPrimary
from spr.logs import redact
from spr.sink.outcome import CommitOutcome, UnknownCommit, commit_outcome
from spr.sink.postgres import PostgresSink

T0, T1 = ("t", 0), ("t", 1)


# ------------------------------------------------------------ the classification table


@pytest.mark.parametrize(
    ("sqlstate", "what"),
    [
        ("25006", "read-only transaction: a demoted primary, or a standby"),
        ("57P01", "admin shutdown: the primary stopped for a promotion"),
        ("57P02", "crash shutdown: the primary crashed"),
        ("57P03", "cannot connect now: a node still starting or recovering"),
    ],
)
def test_failover_sqlstates_are_transient(sqlstate: str, what: str) -> None:
    assert classify_sqlstate(sqlstate) is ErrorClass.TRANSIENT, what
    error = psycopg.errors.lookup(sqlstate)("failover")
    assert classify(error) is ErrorClass.TRANSIENT, what


def test_a_connection_lost_mid_commit_is_transient() -> None:
    # What psycopg raises when COMMIT was sent and no answer came: no SQLSTATE.
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert lost.sqlstate is None and classify(lost) is ErrorClass.TRANSIENT


def test_a_former_primary_is_retried_and_another_writer_stops() -> None:
    assert classify(FormerPrimary("old timeline")) is ErrorClass.TRANSIENT
    assert classify(ConflictingWriter("offsets moved")) is ErrorClass.FATAL


# ------------------------------------------------------------- the unknown-commit rule


@pytest.mark.parametrize(
    ("previous", "stored", "expected"),
    [
        ({T0: 10, T1: 20}, {T0: 15, T1: 25}, CommitOutcome.COMMITTED),
        ({T0: 10, T1: 20}, {T0: 10, T1: 20}, CommitOutcome.NOT_COMMITTED),
        ({}, {}, CommitOutcome.NOT_COMMITTED),  # a first batch: no row before, none now
        ({T0: 10}, {T0: 10}, CommitOutcome.NOT_COMMITTED),  # t[1] had no row, has none
        ({T0: 10, T1: 20}, {T0: 7, T1: 20}, CommitOutcome.LOST),  # a lagging standby
        ({T0: 10, T1: 20}, {T1: 20}, CommitOutcome.LOST),  # a row gone altogether
        ({T0: 10, T1: 20}, {T0: 15, T1: 20}, CommitOutcome.CONFLICT),  # half a commit
        ({T0: 10, T1: 20}, {T0: 16, T1: 25}, CommitOutcome.CONFLICT),  # past the batch
        ({T0: 10, T1: 20}, {T0: 12, T1: 20}, CommitOutcome.CONFLICT),  # between
        ({T0: 10, T1: 20}, {T0: 7, T1: 25}, CommitOutcome.CONFLICT),  # below and after
    ],
)
def test_the_stored_offsets_decide_an_unknown_commit(
    previous: dict[tuple[str, int], int],
    stored: dict[tuple[str, int], int],
    expected: CommitOutcome,
) -> None:
    assert commit_outcome({T0: 15, T1: 25}, previous, stored) is expected


def test_without_known_previous_offsets_only_the_batch_itself_is_recognised() -> None:
    batch = {T0: 15}
    assert commit_outcome(batch, None, {T0: 15}) is CommitOutcome.COMMITTED
    assert commit_outcome(batch, None, {T0: 3}) is CommitOutcome.NOT_COMMITTED
    assert commit_outcome(batch, None, {}) is CommitOutcome.NOT_COMMITTED
    assert commit_outcome(batch, None, {T0: 16}) is CommitOutcome.CONFLICT


def test_resolving_raises_what_each_outcome_calls_for() -> None:
    unknown = UnknownCommit({T0: 15}, {T0: 10}, rows=5, applied=4)
    counts: dict[str, int] = {}
    assert unknown.resolve({T0: 15}, "g", counts) is True
    assert unknown.resolve({T0: 10}, "g", counts) is False
    with pytest.raises(CommitsLost) as lost:
        unknown.resolve({T0: 7}, "g", counts)
    assert lost.value.stored == {T0: 7} and lost.value.expected == {T0: 10}
    with pytest.raises(ConflictingWriter, match=r"group g .*t\[0\] is at 12"):
        unknown.resolve({T0: 12}, "g", counts)
    assert counts == {"committed": 1, "not committed": 1, "lost": 1, "conflict": 1}


# ------------------------------------------------------------------ multi-host DSNs

MULTI_HOST = [
    "host=127.0.0.1,127.0.0.1 port=5432,5433 user=spr dbname=spr target_session_attrs=read-write",
    "postgresql://spr@127.0.0.1:5432,127.0.0.1:5433/spr?target_session_attrs=read-write",
]


@pytest.mark.parametrize("dsn", MULTI_HOST)
def test_multi_host_dsns_are_accepted_unchanged(dsn: str) -> None:
    assert check_dsn(dsn) == dsn
    # libpq gets them as they are: spr adds its keepalives without touching the hosts.
    options = PostgresSink(dsn, group_id="g").connection_options()
    assert "host" not in options and "port" not in options and options["keepalives"] == 1


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://spr:s3cret@h1:5432,h2:5433/spr?target_session_attrs=read-write",
        "host=h1,h2 port=5432,5433 password=s3cret user=spr target_session_attrs=read-write",
        "host=h1,h2 port=5432,5433 password='s3cret, too' user=spr",
        "postgresql://spr@h1:5432,h2:5433/spr?password=s3cret&target_session_attrs=read-write",
    ],
)
def test_multi_host_dsns_are_redacted(dsn: str) -> None:
    masked = redact(dsn)
    assert "s3cret" not in masked and "***" in masked
    assert "h1" in masked and "h2" in masked and "5433" in masked
