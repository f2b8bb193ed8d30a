"""Shared helpers for the engine and sink tests: produce, run, and check exact state."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer, TopicPartition
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
