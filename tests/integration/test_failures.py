"""Failure handling end to end (design §6), through `spr run` on the real broker and DB.

* the poison corpus mixed into valid traffic: every valid event applied, every poison
  message in the dead-letter topic with its class, offsets at the end, no crash;
* a database outage shorter than the retry budget: nothing lost, nothing dead-lettered;
* a longer outage: the circuit breaker opens (and re-opens on a failed probe), and
  consumption recovers by itself when the database returns;
* a CHECK constraint on a mapped table: exactly the offending rows are dead-lettered;
* an unwritable dead-letter topic: exit 2, nothing committed past the event.

The outage tests stop the shared PostgreSQL server for a few seconds and always start
it again (``-l``: the server must not inherit a pipe of ours).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from helpers import (
    assert_exact,
    expected_for,
    produce_in_background,
    spr_run_argv,
    start,
    state_rows,
    stored_offsets,
    wait_for,
)
from psycopg import sql

from spr.dev.loadgen import LoadSpec
from spr.dev.stack import PG_PORT, DevStack
from spr.dlq import DeadLetter, read_dead_letters
from spr.testing.poison import CORPUS, evaluate, key_of, valid_event

Names = Callable[[str], str]
Message = tuple[bytes | None, bytes | None]


def produce(bootstrap: str, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Produce ``(key, value)`` pairs in order, partitioned like spr's producer; returns
    each message's ``(partition, offset)``."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                         "enable.idempotence": True, "message.max.bytes": 8 * 1024 * 1024,
                         "linger.ms": 5})  # fmt: skip
    positions: list[tuple[int, int] | None] = [None] * len(messages)
    errors: list[str] = []

    def report(index: int) -> Callable[[Any, Any], None]:
        def on_delivery(error: Any, message: Any) -> None:
            if error is not None:
                errors.append(str(error))
            else:
                positions[index] = (message.partition(), message.offset())

        return on_delivery

    for index, (key, value) in enumerate(messages):
        producer.produce(topic, key=key, value=value, on_delivery=report(index))
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors
    assert all(p is not None for p in positions)
    return [p for p in positions if p is not None]


def valid(entity_id: str, sequence: int, state: str) -> Message:
    event = valid_event(
        entity_id, sequence=sequence, state=state, event_id=f"{entity_id}-{sequence}"
    )
    return key_of("order", entity_id), json.dumps(event).encode()


def dead_letters(bootstrap: str, topic: str) -> list[DeadLetter]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "fetch.max.bytes": 32 * 1024 * 1024,
                         "max.partition.fetch.bytes": 16 * 1024 * 1024})  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:  # never created: no dead letters
            return []
        starts = {p: 0 for p in metadata.partitions}
        return list(read_dead_letters(consumer, topic, starts, bootstrap=bootstrap))
    finally:
        consumer.close()


def run_to_end(argv: list[str], log: Path, timeout: float = 120) -> int:
    proc = start(argv, log)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def json_events(log: Path, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                lines.append(record)
    return lines


@pytest.fixture
def delete_topics(admin: Any) -> Iterator[list[str]]:
    """Topics the engine creates by itself (``<topic>.dlq``), deleted afterwards."""
    names: list[str] = []
    yield names
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # never created: nothing to delete
                future.result(30)


def test_poison_corpus_in_valid_traffic(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path, delete_topics: list[str],
) -> None:  # fmt: skip
    assert len({c.name for c in CORPUS if c.expected is not None}) >= 15
    topic = make_topic(partitions=3)
    delete_topics.append(f"{topic}.dlq")
    table, group = unique_name("state"), unique_name("g")
    before = [valid(f"ok-{i}", 1, "created") for i in range(60)]
    after = [valid(f"ok-{i}", 2, "paid") for i in range(0, 60, 2)]
    after += [valid(f"ok-late-{i}", 1, "created") for i in range(30)]
    poison = [(case.key, case.value) for case in CORPUS]
    positions = produce(bootstrap, topic, before + poison + after)
    poison_at = dict(zip((c.name for c in CORPUS), positions[len(before) :], strict=False))

    log = tmp_path / "run.log"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "2", "--log-json"])  # fmt: skip
    code = run_to_end(argv, log)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text

    # Every valid event applied, and the corpus's valid cases too.
    expected: dict[str, tuple[int, str]] = {f"order:ok-{i}": (1, "created") for i in range(60)}
    expected.update({f"order:ok-{i}": (2, "paid") for i in range(0, 60, 2)})
    expected.update({f"order:ok-late-{i}": (1, "created") for i in range(30)})
    for case in CORPUS:
        if case.expected is None:
            event, _, _ = evaluate(case)
            assert event is not None
            expected[f"{event.entity_type}:{event.entity_id}"] = (event.sequence, event.state)
    actual = {k: (v["sequence"], v["state"]) for k, v in state_rows(dsn, table).items()}
    assert actual == expected

    # Offsets reached the end of every partition.
    ends: dict[tuple[str, int], int] = {}
    for partition, offset in positions:
        ends[(topic, partition)] = max(ends.get((topic, partition), 0), offset + 1)
    assert stored_offsets(dsn, group, [topic]) == ends

    # Every poison message is in the dead-letter topic once, with its class, reason and
    # original key and value; nothing else is.
    letters = dead_letters(bootstrap, f"{topic}.dlq")
    by_source = {(d.source_partition, d.source_offset): d for d in letters}
    assert len(by_source) == len(letters)
    wanted = {name: pos for name, pos in poison_at.items()
              if next(c for c in CORPUS if c.name == name).expected is not None}  # fmt: skip
    assert set(by_source) == set(wanted.values())
    observed: dict[str, str] = {}
    for case in CORPUS:
        if case.expected is None:
            continue
        letter = by_source[poison_at[case.name]]
        observed[case.name] = letter.error_class
        assert letter.error_class == str(case.expected), (case.name, letter.error)
        assert case.reason in letter.error, (case.name, letter.error)
        assert letter.source_topic == topic and letter.attempts == 1
        assert letter.key == case.key and letter.value == case.value, case.name
    (tmp_path / "observed.json").write_text(json.dumps(observed, indent=1))
    assert {r["error_class"] for r in json_events(log, "dlq")} == {"invalid", "data"}


def stop_postgres(stack: DevStack) -> None:
    stack._pg("pg_ctl", "-D", str(stack.paths.pg_data), "-l", str(stack.paths.pg_log),
              "-m", "fast", "-w", "stop")  # fmt: skip


def start_postgres(stack: DevStack) -> None:
    if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(PG_PORT)],
                      capture_output=True).returncode == 0:  # fmt: skip
        return
    stack._pg("pg_ctl", "-D", str(stack.paths.pg_data), "-l", str(stack.paths.pg_log),
              "-w", "start")  # fmt: skip


@pytest.fixture
def postgres() -> Iterator[DevStack]:
    stack = DevStack()
    try:
        yield stack
    finally:
        start_postgres(stack)  # whatever happened, the server runs again


def progress(dsn: str, group: str, topic: str) -> int:
    try:
        return sum(stored_offsets(dsn, group, [topic]).values())
    except psycopg.OperationalError:
        return 0


def test_short_database_outage_loses_and_dead_letters_nothing(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path, postgres: DevStack,
) -> None:  # fmt: skip
    topic, dlq = make_topic(partitions=3), make_topic(partitions=1, prefix="dlq")
    spec = LoadSpec(count=5_000, entities=700, seed=61, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    log = tmp_path / "run.log"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "3", "--batch-max-rows", "200", "--log-json",
                               "--dlq-topic", dlq])  # fmt: skip
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=2_000)
    proc = start(argv, log)
    try:
        wait_for(lambda: progress(dsn, group, topic) > 500, 30, "progress")
        stop_postgres(postgres)
        # Down until the engine has seen it fail: then the outage is real, and short.
        wait_for(lambda: "retry" in log.read_text(errors="replace"), 20, "a failed flush")
        start_postgres(postgres)
        producer.join(60)
        assert not errors
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    assert dead_letters(bootstrap, dlq) == []


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_long_outage_opens_the_breaker_and_recovers_by_itself(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path, postgres: DevStack,
) -> None:  # fmt: skip
    topic, dlq = make_topic(partitions=3), make_topic(partitions=1, prefix="dlq")
    spec = LoadSpec(count=4_000, entities=500, seed=62, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    config = tmp_path / "spr.toml"
    config.write_text("[breaker]\ncool_down = 1.0\nminimum_calls = 3\n")
    port = free_port()
    log, stats = tmp_path / "run.log", tmp_path / "stats.json"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "3", "--batch-max-rows", "200", "--log-json",
                               "--dlq-topic", dlq, "--config", str(config),
                               "--metrics-port", str(port), "--stats", str(stats)])  # fmt: skip
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=1_500)
    proc = start(argv, log)
    try:
        wait_for(lambda: progress(dsn, group, topic) > 500, 30, "progress")
        stop_postgres(postgres)

        def probe_failed() -> bool:  # opened, probed after the cool-down, and re-opened
            changes = [(r["old"], r["new"]) for r in json_events(log, "circuit")]
            return ("half_open", "open") in changes

        wait_for(probe_failed, 30, "the breaker to open and a probe to fail")
        metrics = scrape(port)
        assert metrics["spr_circuit_state"] in (1.0, 2.0)  # open, or probing again
        assert metrics["spr_paused_partitions"] == 3.0  # every partition held
        start_postgres(postgres)
        producer.join(60)
        assert not errors
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    changes = [(r["old"], r["new"]) for r in json_events(log, "circuit")]
    assert changes[0] == ("closed", "open") and changes[-1] == ("half_open", "closed"), changes
    final = json.loads(stats.read_text())
    assert final["circuit_state"] == 0 and final["circuit_opens"] >= 1
    # It stayed in the group throughout: one assignment, no partition lost.
    changes = [r["change"] for r in json_events(log, "rebalance")]
    assert changes.count("assign") == 1 and "lost" not in changes, changes
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    assert dead_letters(bootstrap, dlq) == []


def test_constraint_violation_on_mapped_table_isolates_exactly_the_offending_rows(
    bootstrap: str, dsn: str, pg: psycopg.Connection[Any], make_topic: Callable[..., str],
    unique_name: Names, tmp_path: Path,
) -> None:  # fmt: skip
    topic, dlq = make_topic(partitions=2), make_topic(partitions=2, prefix="dlq")
    table, group = unique_name("orders"), unique_name("g")
    pg.execute(sql.SQL(
        "CREATE TABLE {} (order_id text PRIMARY KEY, status text NOT NULL "
        "CONSTRAINT status_not_forbidden CHECK (status <> 'forbidden'), payload jsonb, "
        "sequence bigint, processed_at timestamptz DEFAULT now())"
    ).format(sql.Identifier(table)))  # fmt: skip
    try:
        messages = [valid(f"o-{i}", 1, "created") for i in range(300)]
        messages += [valid(f"o-{i}", 2, "paid") for i in range(0, 300, 3)]
        forbidden = {7, 99, 150, 151, 298}
        messages += [valid(f"bad-{i}", 1, "forbidden") for i in sorted(forbidden)]
        messages += [valid(f"o-{i}", 3, "shipped") for i in range(0, 300, 10)]
        positions = produce(bootstrap, topic, messages)
        bad_positions = set(positions[len(messages) - 30 - len(forbidden) : len(messages) - 30])
        log = tmp_path / "run.log"
        argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap,
                            table=table, extra=["--mapping", "orders", "--idle-exit", "2",
                                                "--dlq-topic", dlq])  # fmt: skip
        code = run_to_end(argv, log)
        assert code == 0, log.read_text()[-3000:]
        rows = dict(pg.execute(sql.SQL("SELECT order_id, status FROM {}").format(
            sql.Identifier(table))).fetchall())  # fmt: skip
        expected = {f"o-{i}": "created" for i in range(300)}
        expected.update({f"o-{i}": "paid" for i in range(0, 300, 3)})
        expected.update({f"o-{i}": "shipped" for i in range(0, 300, 10)})
        assert rows == expected
        letters = dead_letters(bootstrap, dlq)
        assert {(d.source_partition, d.source_offset) for d in letters} == bad_positions
        assert len(letters) == len(forbidden)
        for letter in letters:
            assert letter.error_class == "data" and "status_not_forbidden" in letter.error
            assert b'"forbidden"' in (letter.value or b"")
            assert dict(letter.headers) == {}  # the originals carried none
        ends: dict[tuple[str, int], int] = {}
        for partition, offset in positions:
            ends[(topic, partition)] = max(ends.get((topic, partition), 0), offset + 1)
        assert stored_offsets(dsn, group, [topic]) == ends
    finally:
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def test_unwritable_dead_letter_topic_stops_with_nothing_committed_past_the_event(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path,
) -> None:  # fmt: skip
    topic = make_topic(partitions=1)
    # The broker refuses every dead letter: far larger than the topic allows.
    dlq = make_topic(partitions=1, prefix="dlq", config={"max.message.bytes": "200"})
    table, group = unique_name("state"), unique_name("g")
    junk = os.urandom(4_000)  # not UTF-8, and incompressible
    messages = [valid(f"a-{i}", 1, "created") for i in range(50)]
    messages += [(b"junk", junk)]
    messages += [valid(f"b-{i}", 1, "created") for i in range(50)]
    positions = produce(bootstrap, topic, messages)
    poison_offset = positions[50][1]
    log = tmp_path / "run.log"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "2", "--dlq-topic", dlq])  # fmt: skip
    started = time.monotonic()
    code = run_to_end(argv, log, timeout=90)
    text = log.read_text(errors="replace")
    assert code == 2, text[-3000:]
    assert "dead letter" in text.splitlines()[-1], text[-2000:]
    assert "Traceback" not in text
    assert time.monotonic() - started < 80
    committed = stored_offsets(dsn, group, [topic]).get((topic, 0), 0)
    assert committed <= poison_offset
    assert not any(key.startswith("order:b-") for key in state_rows(dsn, table))
