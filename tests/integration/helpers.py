"""Shared helpers for the engine and sink tests: produce, run, and check exact state."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from psycopg import sql

from spr.dev.loadgen import LoadSpec, Manifest, generate, produce
from spr.routing import partition_key

# Short group timeouts so that a killed member's partitions move within seconds.
FAST_GROUP = ("session.timeout.ms=6000", "heartbeat.interval.ms=1000")


def produce_load(bootstrap: str, topic: str, spec: LoadSpec, rate: float | None = None) -> None:
    """Produce ``spec`` with spr's load generator (spr.Producer); fails on any error."""
    report = produce(spec, topic=topic, bootstrap=bootstrap, rate=rate)
    assert report.errors == 0, report
    assert report.events == spec.count


def expected_for(*specs: LoadSpec) -> dict[str, dict[str, Any]]:
    """The final state the specs' events must produce (newest sequence per entity)."""
    manifest = Manifest()
    for spec in specs:
        for event in generate(spec):
            manifest.add(event)
    return manifest.entities()


def produce_in_background(
    bootstrap: str, topic: str, spec: LoadSpec, rate: float
) -> tuple[threading.Thread, list[BaseException]]:
    """Produce ``spec`` at ``rate`` events/s on a thread; errors land in the list."""
    errors: list[BaseException] = []

    def _run() -> None:
        try:
            produce_load(bootstrap, topic, spec, rate=rate)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    return thread, errors


def produce_raw(bootstrap: str, topic: str, events: Iterable[dict[str, Any] | bytes]) -> None:
    """Produce hand-made events (dicts are JSON-encoded; bytes are sent as they are),
    keyed and partitioned like spr's producer (partition key, murmur2)."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
        }
    )
    for event in events:
        if isinstance(event, bytes):
            producer.produce(topic, key=b"invalid", value=event)
            continue
        key = partition_key(f"{event['entity_type']}:{event['entity_id']}")
        producer.produce(topic, key=key.encode(), value=json.dumps(event).encode())
    assert producer.flush(30) == 0


def end_offsets(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    futures = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions}, request_timeout=10
    )
    return {(tp.topic, tp.partition): f.result(timeout=10).offset for tp, f in futures.items()}


def state_rows(dsn: str, table: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT entity_type, entity_id, sequence, state, event_id FROM {}").format(
                sql.Identifier(table)
            )
        ).fetchall()
    return {f"{t}:{i}": {"sequence": s, "state": st, "event_id": e} for t, i, s, st, e in rows}


def stored_offsets(dsn: str, group: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT topic, partition, next_offset FROM spr_offsets "
            "WHERE group_id = %s AND topic = ANY(%s)",
            (group, list(topics)),
        ).fetchall()
    return {(t, p): n for t, p, n in rows}


def assert_exact(
    *,
    dsn: str,
    bootstrap: str,
    table: str,
    group: str,
    topics: Sequence[str],
    expected: dict[str, dict[str, Any]],
) -> None:
    """Every entity at its newest sequence/state/event id, no extra rows, and the offsets
    table equal to the end offsets of every partition that holds events."""
    actual = state_rows(dsn, table)
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    wrong = {k for k in expected.keys() & actual.keys() if actual[k] != expected[k]}
    assert not missing and not extra and not wrong, (
        f"{len(missing)} missing, {len(extra)} extra, {len(wrong)} wrong; e.g. "
        + str([(k, expected.get(k), actual.get(k)) for k in list(missing | extra | wrong)[:3]])
    )
    ends: dict[tuple[str, int], int] = {}
    for topic in topics:
        ends.update({k: v for k, v in end_offsets(bootstrap, topic).items() if v > 0})
    assert stored_offsets(dsn, group, topics) == ends


def spr_run_argv(
    *,
    topics: Sequence[str],
    group: str,
    dsn: str,
    bootstrap: str,
    table: str,
    extra: Sequence[str] = (),
    kafka: Sequence[str] = FAST_GROUP,
) -> list[str]:
    argv = [sys.executable, "-m", "spr", "run", "--group", group, "--dsn", dsn]
    argv += ["--bootstrap", bootstrap, "--table", table, "--auto-create-schema"]
    for topic in topics:
        argv += ["--topic", topic]
    for item in kafka:
        argv += ["-X", item]
    return argv + list(extra)


def run_to_idle(argv: list[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run a command that ends by itself (``spr run --idle-exit``); fails unless it exits 0."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM and wait; a process that does not finish in time is killed (and fails)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} did not stop within {timeout} s") from None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def applied_offsets_total(dsn: str, group: str, topics: Sequence[str]) -> int:
    return sum(stored_offsets(dsn, group, topics).values())


def spr_transform_argv(
    *,
    topics: Sequence[str],
    group: str,
    output: str,
    bootstrap: str,
    extra: Sequence[str] = (),
    kafka: Sequence[str] = FAST_GROUP,
) -> list[str]:
    """``spr transform`` from ``topics`` into ``output`` (the transform's own defaults
    otherwise); ``extra`` adds flags such as ``--idle-exit`` or ``--transactional-id``."""
    argv = [sys.executable, "-m", "spr", "transform", "--group", group, "--output-topic", output]
    argv += ["--bootstrap", bootstrap]
    for topic in topics:
        argv += ["--topic", topic]
    for item in kafka:
        argv += ["-X", item]
    return argv + list(extra)


@dataclass(frozen=True)
class Record:
    """One message read back from a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> bytes | None:
        """The value of header ``name``; AssertionError unless there is exactly one."""
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"[{self.partition}]@{self.offset}: {len(values)} {name} headers"
        return values[0] if values else None


def read_records(
    bootstrap: str, topic: str, *, committed: bool = True, timeout_s: float = 60.0
) -> list[Record]:
    """Every message of ``topic`` from the start to its end, in (partition, offset) order,
    as a ``read_committed`` consumer (``committed``) or a ``read_uncommitted`` one sees it.
    The end is the last stable offset or the high watermark, taken before reading; a
    partition is done when the consumer reports its end (past trailing control records)."""
    isolation = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    futures = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
        isolation_level=isolation,
        request_timeout=10,
    )
    ends = {tp.partition: f.result(timeout=10).offset for tp, f in futures.items()}
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4().hex[:10]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.queue.backoff.ms": 10,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        }
    )
    records: list[Record] = []
    pending = {p for p, end in ends.items() if end > 0}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
        deadline = time.monotonic() + timeout_s
        while pending:
            assert time.monotonic() < deadline, f"{topic}: {sorted(pending)} not read to the end"
            for m in consumer.consume(1000, 0.2):
                error = m.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, f"{topic}: {error}"
                    if m.offset() >= ends[m.partition()]:
                        pending.discard(m.partition())
                    continue
                headers = tuple((k, v or b"") for k, v in m.headers() or ())
                records.append(Record(m.partition(), m.offset(), m.key(), m.value(), headers))
                if m.offset() + 1 >= ends[m.partition()]:
                    pending.discard(m.partition())
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


def delete_topics(bootstrap: str, topics: Iterable[str]) -> None:
    """Delete ``topics`` (cleanup: missing ones and failures are ignored)."""
    names = list(dict.fromkeys(topics))  # a name twice would fail the whole request
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)


def drop_state(dsn: str, table: str, groups: Sequence[str]) -> None:
    """Drop a test's state table and its groups' rows in spr_offsets (cleanup)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        row = conn.execute("SELECT to_regclass('spr_offsets')").fetchone()
        if row is not None and row[0] is not None:
            conn.execute("DELETE FROM spr_offsets WHERE group_id = ANY(%s)", (list(groups),))
