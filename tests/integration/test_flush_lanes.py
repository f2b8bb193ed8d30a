"""``spr run --flush-connections N``: a batch written over N connections at once, each
committing its share of the partitions (rows and offsets) in its own transaction.

Against the real broker and database: the exact final state; a lane that fails while the
other commits is retried alone (the committed share is never written again); rows the
database rejects in several lanes are all dead-lettered, and nothing else is lost.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import (
    assert_exact,
    expected_for,
    produce_load,
    produce_raw,
    read_records,
    run_to_idle,
    spr_run_argv,
    state_rows,
    stored_offsets,
)
from psycopg import sql

from spr.batch import STATE_COLUMNS, Batch
from spr.clock import SystemClock
from spr.config import EngineConfig, TableMapping
from spr.decode import decode_event
from spr.dev.loadgen import LoadSpec
from spr.engine.failures import FirstFailure
from spr.engine.flushing import Flushing
from spr.engine.intake import PendingBatch
from spr.sink import PostgresSink
from spr.sink.postgres import FlushResult

Names = Callable[[str], str]


def _split_every_batch(tmp_path: Path) -> list[str]:
    """spr run flags that split even these tests' small batches over the lanes."""
    config = tmp_path / "lanes.toml"
    config.write_text("flush_split_rows = 1\nflush_split_rows_per_event = 0\n")
    return ["--config", str(config)]


@pytest.mark.parametrize("connections", [2, 3])
def test_every_lane_commits_its_partitions_exactly_once(
    bootstrap: str,
    dsn: str,
    make_topic: Callable[..., str],
    unique_name: Names,
    tmp_path: Path,
    connections: int,
) -> None:
    topic = make_topic(partitions=6)
    spec = LoadSpec(count=8_000, entities=1_500, seed=31, duplicates=0.1, stale=0.1)
    produce_load(bootstrap, topic, spec)
    table, group = unique_name("state"), unique_name("g")
    stats = tmp_path / "stats.json"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "1", "--stats", str(stats), "--batch-max-rows",
                               "700", "--flush-connections", str(connections),
                               *_split_every_batch(tmp_path)])  # fmt: skip
    run_to_idle(argv)
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    counts = json.loads(stats.read_text())
    assert counts["consumed"] == 8_000
    assert counts["consumed"] == (
        counts["applied"] + counts["stale"] + counts["collapsed"] + counts["duplicate"]
    )
    assert counts["flushes"] >= 2


def _install_fault_and_log(dsn: str, table: str, proposals: str, fault: str) -> None:
    """Fail the first write of a partition-1 row, once, with a serialization failure
    (transient), and log every row a committed merge proposed, with its transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A sequence: its nextval survives the rollback of the transaction it fails.
        conn.execute(sql.SQL("CREATE SEQUENCE {}").format(sql.Identifier(fault)))
        conn.execute(sql.SQL(
            "CREATE TABLE {} (txid bigint, partition int, entity text, sequence bigint)"
        ).format(sql.Identifier(proposals)))  # fmt: skip
        # BEFORE INSERT row triggers fire for every row INSERT ... ON CONFLICT proposes,
        # also the ones the sequence guard then refuses: a share flushed twice shows.
        conn.execute(sql.SQL("""
            CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.kafka_partition = 1 THEN
                    IF nextval({fault}) = 1 THEN
                        RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure';
                    END IF;
                END IF;
                INSERT INTO {log} VALUES (txid_current(), NEW.kafka_partition,
                                          NEW.entity_id, NEW.sequence);
                RETURN NEW;
            END $$""").format(fn=sql.Identifier(f"{fault}_fn"), fault=sql.Literal(fault),
                               log=sql.Identifier(proposals)))  # fmt: skip
        conn.execute(sql.SQL(
            "CREATE TRIGGER {} BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(f"{fault}_t"), sql.Identifier(table),
                 sql.Identifier(f"{fault}_fn")))  # fmt: skip


def _db_init(dsn: str, table: str) -> None:
    run_to_idle([sys.executable, "-m", "spr", "db", "init", "--table", table, "--dsn", dsn])


def _proposals(dsn: str, fault: str, log: str) -> tuple[Any, list[tuple[int, int, str, int]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fired = conn.execute(sql.SQL("SELECT is_called FROM {}").format(
            sql.Identifier(fault))).fetchone()  # fmt: skip
        proposed = conn.execute(sql.SQL("SELECT txid, partition, entity, sequence FROM {}")
                                .format(sql.Identifier(log))).fetchall()  # fmt: skip
    return fired, proposed


def _one_share_per_transaction_and_no_row_twice(proposed: list[Any]) -> None:
    # Every transaction wrote one lane's share: partitions 0 and 2, or 1 and 3.
    lanes = {txid: {p % 2 for t, p, _, _ in proposed if t == txid} for txid, *_ in proposed}
    assert all(len(found) == 1 for found in lanes.values())
    # No row was proposed by two committed transactions: a share already committed is
    # never written again.
    twice = [row for row, n in Counter((p, e, s) for _, p, e, s in proposed).items() if n > 1]
    assert twice == []


def test_a_failed_lane_is_retried_alone_and_the_committed_one_is_not_written_again(
    dsn: str, unique_name: Names
) -> None:
    """The flush lanes on real connections, one batch of four partitions: lane 1's
    transaction fails once, lane 0's commits; the retry writes lane 1's share only."""
    table, group, fault = unique_name("state"), unique_name("g"), unique_name("fault")
    _db_init(dsn, table)
    _install_fault_and_log(dsn, table, group, fault)
    config = EngineConfig(group_id=group, topics=("t",), dsn=dsn,
                          mapping=TableMapping(table=table), flush_connections=2,
                          flush_split_rows=1, flush_split_rows_per_event=0.0)  # fmt: skip
    batch = Batch(STATE_COLUMNS)
    for p in range(4):
        for i in range(50):
            value = json.dumps({"entity_type": "o", "entity_id": f"p{p}-{i}", "sequence": 3,
                                "state": "paid"}).encode()  # fmt: skip
            batch.add(decode_event(value, offset=i, timestamp_ms=0), "t", p, i)
    committed: list[FlushResult] = []
    clock = SystemClock()
    flushing = Flushing(config, clock=clock, failure=FirstFailure(),
                        on_committed=lambda job, result, s: committed.append(result))  # fmt: skip
    flushing.start([PostgresSink.from_config(config) for _ in range(2)], None)
    try:
        flushing.submit(PendingBatch(batch, 200, 200, 0, array("q"), array("q")))
        assert flushing.wait(clock.monotonic() + 30)
    finally:
        flushing.close()
    fired, proposed = _proposals(dsn, fault, group)
    assert fired == (True,) and flushing.flush_retries == 1 and len(committed) == 1
    assert (committed[0].rows, committed[0].applied) == (200, 200)
    _one_share_per_transaction_and_no_row_twice(proposed)
    shares = Counter(p for _, p, _, _ in proposed)
    assert shares == {0: 50, 1: 50, 2: 50, 3: 50}
    assert len(state_rows(dsn, table)) == 200
    assert stored_offsets(dsn, group, ["t"]) == {("t", p): 50 for p in range(4)}


def test_spr_run_applies_exactly_once_through_a_failing_lane(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names, tmp_path: Path
) -> None:
    topic = make_topic(partitions=4)
    spec = LoadSpec(count=4_000, entities=600, seed=32, duplicates=0.05, stale=0.05)
    produce_load(bootstrap, topic, spec)
    table, group = unique_name("state"), unique_name("g")
    fault = unique_name("fault")
    _db_init(dsn, table)
    _install_fault_and_log(dsn, table, group, fault)
    stats = tmp_path / "stats.json"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "1", "--stats", str(stats), "--batch-max-rows",
                               "500", "--flush-connections", "2",
                               *_split_every_batch(tmp_path)])  # fmt: skip
    run_to_idle(argv)
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    fired, proposed = _proposals(dsn, fault, group)
    assert fired == (True,) and json.loads(stats.read_text())["flush_retries"] >= 1
    _one_share_per_transaction_and_no_row_twice(proposed)


def test_rows_rejected_in_several_lanes_are_all_dead_lettered(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names, tmp_path: Path
) -> None:
    topic = make_topic(partitions=4)
    dlq = f"{topic}.dlq"
    table, group = unique_name("state"), unique_name("g")
    events = [
        {"entity_type": "order", "entity_id": f"o{i}", "sequence": 1,
         "state": "poisoned" if i % 25 == 0 else "paid", "event_id": f"e{i}"}
        for i in range(400)
    ]  # fmt: skip
    produce_raw(bootstrap, topic, events)
    _db_init(dsn, table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CHECK (state <> 'poisoned')").format(
            sql.Identifier(table)))  # fmt: skip
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "1", "--flush-connections", "2",
                               *_split_every_batch(tmp_path)])  # fmt: skip
    run_to_idle(argv)
    rows = state_rows(dsn, table)
    poisoned = {f"order:o{i}" for i in range(0, 400, 25)}
    assert set(rows) == {f"order:o{i}" for i in range(400)} - poisoned
    letters = read_records(bootstrap, dlq)
    lettered = {json.loads(r.value)["entity_id"] for r in letters}
    assert {f"order:{e}" for e in lettered} == poisoned and len(letters) == len(poisoned)
    # The poisoned entities' partitions span both lanes.
    partitions = {r.header("spr-source-partition") for r in letters}
    assert len(partitions) > 1
    assert sum(stored_offsets(dsn, group, [topic]).values()) == 400
