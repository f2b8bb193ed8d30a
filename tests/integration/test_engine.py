"""The engine end to end (``spr run``) against the real broker and database.

Every test asserts the exact final state: each entity at its newest sequence and state,
no extra rows, and the offsets table equal to the end offsets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FAST_GROUP,
    assert_exact,
    expected_for,
    produce_in_background,
    produce_load,
    produce_raw,
    run_to_idle,
    spr_run_argv,
    start,
    stop,
    stored_offsets,
    wait_for,
)
from psycopg import sql

from spr.dev.loadgen import LoadSpec

ROOT = Path(__file__).resolve().parents[2]


def test_run_applies_everything_exactly_once(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:  # fmt: skip
    topic = make_topic(partitions=4)
    spec = LoadSpec(count=6_000, entities=800, seed=1, duplicates=0.1, stale=0.1, aliases=0.2)
    produce_load(bootstrap, topic, spec)
    invalid = [b"not json", b'{"entity_type": "order"}', b"[1,2]"]
    produce_raw(bootstrap, topic, invalid)
    table, group = unique_name("state"), unique_name("g")
    stats = tmp_path / "stats.json"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "1", "--stats", str(stats),
                               "--batch-max-rows", "500"])  # fmt: skip
    done = run_to_idle(argv)
    assert "consumed 6003 event(s)" in done.stderr
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    counts = json.loads(stats.read_text())
    assert counts["invalid"] == 3
    assert counts["consumed"] == 6_003
    # Every message ends as exactly one outcome.
    assert counts["consumed"] == (
        counts["applied"] + counts["stale"] + counts["collapsed"] + counts["duplicate"]
        + counts["invalid"]
    )  # fmt: skip
    assert counts["flushes"] >= 2 and counts["duplicate"] > 0
    # A second run finds nothing new: the database offsets are the truth.
    again = run_to_idle(argv)
    assert "consumed 0 event(s)" in again.stderr


def test_two_topics_two_workers_and_max_events(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Callable[[str], str],
) -> None:  # fmt: skip
    topics = [make_topic(partitions=3), make_topic(partitions=2)]
    specs = [
        LoadSpec(count=3_000, entities=300, seed=2, entity_types=("order",)),
        LoadSpec(count=2_000, entities=300, seed=3, entity_types=("payment",)),
    ]
    for topic, spec in zip(topics, specs, strict=True):
        produce_load(bootstrap, topic, spec)
    table, group = unique_name("state"), unique_name("g")
    base = spr_run_argv(topics=topics, group=group, dsn=dsn, bootstrap=bootstrap, table=table)
    partial = run_to_idle([*base, "--max-events", "700", "--batch-max-rows", "100"])
    assert "consumed 700 event(s)" in partial.stderr
    assert sum(stored_offsets(dsn, group, topics).values()) == 700
    run_to_idle([*base, "--workers", "2", "--idle-exit", "2"], timeout=120)
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=topics,
                 expected=expected_for(*specs))  # fmt: skip


PROTOCOLS = {
    "cooperative-sticky": ["partition.assignment.strategy=cooperative-sticky", *FAST_GROUP],
    "range": ["partition.assignment.strategy=range", *FAST_GROUP],
    "consumer": ["group.protocol=consumer"],
}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_members_join_and_leave_mid_stream(
    protocol: str, bootstrap: str, dsn: str, make_topic: Callable[..., str],
    unique_name: Callable[[str], str], tmp_path: Path,
) -> None:  # fmt: skip
    topic = make_topic(partitions=6)
    spec = LoadSpec(count=12_000, entities=1_500, seed=4, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        kafka=PROTOCOLS[protocol], extra=["--batch-max-rows", "300"])  # fmt: skip
    log = tmp_path / "members.log"
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=1_500)
    first = start([*argv, "--idle-exit", "3"], log)
    procs = [first]
    try:
        wait_for(lambda: sum(stored_offsets(dsn, group, [topic]).values()) > 500, 30, "progress")
        second = start(argv, log)
        procs.append(second)
        time.sleep(2.5)
        third = start(argv, log)  # three members now
        procs.append(third)
        time.sleep(2.5)
        assert stop(second) == 0  # back to two
        time.sleep(1.5)
        assert stop(third) == 0  # one left; it takes everything back
        producer.join(60)
        assert not producer.is_alive() and not errors
        assert first.wait(90) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip


def test_mapped_orders_table(
    bootstrap: str, dsn: str, pg: Any, make_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:  # fmt: skip
    topic = make_topic(partitions=3)
    spec = LoadSpec(count=3_000, entities=400, seed=5, stale=0.1, entity_types=("order",))
    produce_load(bootstrap, topic, spec)
    table, group = unique_name("orders"), unique_name("g")
    pg.execute(
        sql.SQL("CREATE TABLE {} (order_id text PRIMARY KEY, status text, payload jsonb, "
                "processed_at timestamptz)").format(sql.Identifier(table))
    )  # fmt: skip
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--mapping", "orders", "--idle-exit", "1"])  # fmt: skip
    run_to_idle(argv)
    got = {
        order_id: (status, sequence, payload_state)
        for order_id, status, sequence, payload_state in pg.execute(
            sql.SQL("SELECT order_id, status, sequence, payload->>'state' FROM {}").format(
                sql.Identifier(table)
            )
        ).fetchall()
    }
    expected = {
        key.split(":", 1)[1]: (v["state"], v["sequence"], v["state"])
        for key, v in expected_for(spec).items()
    }
    assert got == expected
    assert sum(stored_offsets(dsn, group, [topic]).values()) == 3_000


def _spr(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spr", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_bad_setups_fail_fast_with_one_sentence(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Callable[[str], str],
) -> None:  # fmt: skip
    topic = make_topic(partitions=1)
    cases = [
        (["--topic", topic, "--group", "g", "--bootstrap", "127.0.0.1:1", "--dsn", dsn,
          "--auto-create-schema", "--table", unique_name("t")], "not reachable at 127.0.0.1:1"),
        (["--topic", topic, "--group", "g", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/x"],
         "cannot connect to PostgreSQL"),
        (["--topic", "no-such-topic-xyz", "--group", "g", "--dsn", dsn, "--auto-create-schema",
          "--table", unique_name("t")], "does not exist"),
        (["--topic", topic, "--group", "g", "--dsn", dsn, "--table", unique_name("missing")],
         "spr db init"),
        (["--topic", topic, "--dsn", dsn], "--group"),
        (["--topic", topic, "--group", "g", "-X", "enable.auto.commit=true"], "must stay false"),
        (["--topic", topic, "--group", "g", "--config", "/nonexistent.toml"], "does not exist"),
    ]  # fmt: skip
    for args, needle in cases:
        started = time.monotonic()
        done = _spr("run", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr, (args, done.stderr)
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert "hunter2" not in done.stderr
        assert time.monotonic() - started < 15


def test_embed_example(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Callable[[str], str],
) -> None:  # fmt: skip
    from spr.dlq import summarize

    topic = make_topic(partitions=3)
    spec = LoadSpec(count=2_000, entities=200, seed=6, duplicates=0.1, stale=0.1)
    produce_load(bootstrap, topic, spec)
    # Invalid events are dead-lettered, never skipped silently.
    produce_raw(bootstrap, topic, [b"not json", b'{"entity_type": "order"}', b"[]"])
    table, group = unique_name("embed"), unique_name("g")
    argv = [sys.executable, str(ROOT / "examples" / "embed_sink.py"), "--bootstrap", bootstrap,
            "--dsn", dsn, "--topic", topic, "--group", group, "--table", table]  # fmt: skip
    first = run_to_idle(argv)
    assert "took 2003 message(s)" in first.stdout
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    letters = summarize(bootstrap=bootstrap, source_topic=topic)
    assert letters.total == 3 and dict(letters.by_class) == {"invalid": 3}
    # Restarting resumes from the database offsets: nothing is read twice.
    again = run_to_idle(argv)
    assert "took 0 message(s)" in again.stdout
