"""The engine under faults: kill -9, a database restart, a broker restart, a slow
(locked) database, and a zombie's late flush. Each test asserts the exact final state.

The restart tests briefly take down servers that other tests share; they keep the
outage to a few seconds and always bring the stack back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from helpers import (
    assert_exact,
    end_offsets,
    expected_for,
    produce_in_background,
    spr_run_argv,
    start,
    state_rows,
    stop,
    stored_offsets,
    wait_for,
)
from psycopg import sql

from spr.batch import STATE_COLUMNS, Batch
from spr.config import BackpressurePolicy, BatchPolicy, EngineConfig, TableMapping
from spr.decode import decode_batch
from spr.dev.loadgen import LoadSpec
from spr.dev.stack import DevStack
from spr.engine import Engine
from spr.sink import PostgresSink

Names = Callable[[str], str]


def progress(dsn: str, group: str, topic: str) -> int:
    return sum(stored_offsets(dsn, group, [topic]).values())


def zombie_flush(bootstrap: str, dsn: str, topic: str, group: str, table: str, count: int) -> None:
    """Replay the first ``count`` messages of partition 0 as one late batch, the way a
    stale owner would flush them after losing the partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"z-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, 0)])
    messages: list[Any] = []
    deadline = time.monotonic() + 20
    while len(messages) < count and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(count, 0.5) if m.error() is None]
    consumer.close()
    messages = messages[:count]
    assert len(messages) == count
    events, _ = decode_batch(
        [m.value() for m in messages], [m.offset() for m in messages],
        [m.timestamp()[1] for m in messages],
    )  # fmt: skip
    batch = Batch(STATE_COLUMNS)
    for message, ev in zip(messages, events, strict=True):
        assert ev is not None
        batch.add(ev, topic, 0, message.offset())
    with PostgresSink(dsn, group_id=group, mapping=TableMapping(table=table)) as sink:
        result = sink.flush(batch)
    assert result.applied == 0  # every row is older than what the owner applied


def test_kill_9_five_times_including_mid_flush(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names, tmp_path: Path
) -> None:
    topic = make_topic(partitions=4)
    spec = LoadSpec(count=16_000, entities=2_000, seed=11, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    # Static membership: a restarted member takes its predecessor's place at once.
    kafka = ("session.timeout.ms=6000", "heartbeat.interval.ms=1000",
             f"group.instance.id={group}-member")  # fmt: skip
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        kafka=kafka, extra=["--batch-max-rows", "40",
                                            "--batch-max-age-ms", "5"])  # fmt: skip
    log = tmp_path / "run.log"
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=1_600)
    rng = random.Random(11)
    kills = 0
    try:
        for round_ in range(5):
            proc = start(argv, log)
            try:
                before = progress(dsn, group, topic)
                wait_for(lambda b=before: progress(dsn, group, topic) > b, 30, "a flush")
                if round_ == 2:
                    # Guarantee one kill in the middle of a flush: block it on a lock.
                    with psycopg.connect(dsn) as locker:
                        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE")
                                       .format(sql.Identifier(table)))  # fmt: skip
                        time.sleep(1.0)
                        blocked_at = progress(dsn, group, topic)
                        assert blocked_at == progress(dsn, group, topic)
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(10)
                        locker.rollback()
                    assert progress(dsn, group, topic) == blocked_at  # nothing half-written
                else:
                    time.sleep(rng.uniform(0.05, 0.6))
                    assert proc.poll() is None
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                kills += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        producer.join(60)
        assert not producer.is_alive() and not errors
        final = start([*argv, "--idle-exit", "2"], log)
        assert final.wait(120) == 0, log.read_text()[-3000:]
    finally:
        producer.join(60)
    assert kills == 5
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
    # A zombie's late batch changes nothing: neither state nor offsets move back.
    before_state = state_rows(dsn, table)
    before_offsets = stored_offsets(dsn, group, [topic])
    zombie_flush(bootstrap, dsn, topic, group, table, count=300)
    assert state_rows(dsn, table) == before_state
    assert stored_offsets(dsn, group, [topic]) == before_offsets


def dev_up() -> None:
    """``spr dev up`` in a child process: the servers it starts are not our children."""
    done = subprocess.run([sys.executable, "-m", "spr", "dev", "up"], capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def restore_stack() -> Iterator[DevStack]:
    try:
        yield DevStack()
    finally:
        dev_up()  # whatever happened, leave both servers running


def test_postgres_restart_mid_stream(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path, restore_stack: DevStack,
) -> None:  # fmt: skip
    topic = make_topic(partitions=3)
    spec = LoadSpec(count=8_000, entities=1_000, seed=12, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--batch-max-rows", "200", "--idle-exit", "3"])  # fmt: skip
    log = tmp_path / "run.log"
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=2_000)
    proc = start(argv, log)
    try:
        wait_for(lambda: progress(dsn, group, topic) > 1_000, 30, "progress")
        stack = restore_stack
        # -l: the restarted server must not inherit (and hold open) our output pipe.
        stack._pg("pg_ctl", "-D", str(stack.paths.pg_data), "-l", str(stack.paths.pg_log),
                  "-m", "fast", "-w", "restart")  # fmt: skip
        producer.join(60)
        assert not errors
        assert proc.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "retry" in log.read_text()  # the outage was seen, and survived
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip


def test_kafka_restart_mid_stream(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path, restore_stack: DevStack,
) -> None:  # fmt: skip
    topic = make_topic(partitions=3)
    spec = LoadSpec(count=6_000, entities=800, seed=13, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    # No --idle-exit here: while the broker is down "idle with no visible lag" is true.
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--batch-max-rows", "50", "--batch-max-age-ms", "5"])  # fmt: skip
    log = tmp_path / "run.log"
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=1_500)
    proc = start(argv, log)
    try:
        wait_for(lambda: progress(dsn, group, topic) > 300, 30, "progress")
        stack = restore_stack
        pid = stack.kafka_pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), 60, "the broker to stop")
        assert progress(dsn, group, topic) < spec.count  # the outage is mid-stream
        dev_up()
        producer.join(90)
        assert not producer.is_alive() and not errors
        total = sum(end_offsets(bootstrap, topic).values())
        wait_for(lambda: progress(dsn, group, topic) == total, 90, "everything applied")
        assert stop(proc) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_slow_database_pauses_resumes_and_stays_in_group(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names
) -> None:
    topic = make_topic(partitions=3)
    spec = LoadSpec(count=8_000, entities=4_000, seed=14)
    table, group = unique_name("state"), unique_name("g")
    bound = 1024 * 1024
    config = EngineConfig(
        group_id=group, topics=(topic,), bootstrap=bootstrap, dsn=dsn,
        mapping=TableMapping(table=table), auto_create_schema=True, idle_exit_s=2,
        batch=BatchPolicy(max_rows=300, max_bytes=256 * 1024, max_age_ms=20),
        backpressure=BackpressurePolicy(memory_bound_bytes=bound),
        kafka={"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
    )  # fmt: skip
    engine = Engine(config)
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(_run(engine)), daemon=True)
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=2_000)
    runner.start()
    try:
        wait_for(lambda: engine.stats().flushes > 2, 30, "flushes")
        with psycopg.connect(dsn) as locker:
            locker.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(table)))
            wait_for(lambda: engine.stats().paused_partitions == 3, 10, "a pause")
            time.sleep(3.0)  # a slow database: the lock holds every flush
            held = engine.stats()
            assert held.paused_partitions == 3
            locker.rollback()
        wait_for(lambda: engine.stats().resumes >= 1 and engine.stats().paused_partitions == 0,
                 15, "a resume")  # fmt: skip
        producer.join(60)
        assert not errors
        runner.join(90)
        assert not runner.is_alive()
    finally:
        engine.stop()
        runner.join(30)
    stats = outcome[0]
    assert not isinstance(stats, BaseException), stats
    assert stats.pauses >= 1 and stats.resumes >= 1
    # Only the first assignment and the final revoke on close: no rebalance while paused.
    assert stats.rebalances == 2 and stats.partitions_lost == 0
    assert stats.max_buffered_bytes <= bound
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip


def _run(engine: Engine) -> Any:
    try:
        return engine.run()
    except BaseException as exc:
        return exc
