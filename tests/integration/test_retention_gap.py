"""Retention gaps on the real broker (design §4): the broker deletes events the group has
not applied yet, and spr never skips them silently.

The topic rolls a segment every 200 ms; shortening ``retention.ms`` then makes the
broker (which checks retention every 5 s) delete the expired segments, so the log start
passes the group's stored offset; newer events are produced after retention is restored. By default ``spr run`` stops and names the partition
and the gap; ``--on-offset-gap earliest|latest`` proceeds, logs the gap, counts it and
records it (a row in ``spr_offsets_gaps``, the stored offset moved past the gap) and
exports it: ``spr_offset_gaps_total`` and ``spr_offset_gap_events_total`` on /metrics.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    OffsetSpec,
)
from helpers import (
    end_offsets,
    produce_raw,
    spr_run_argv,
    start,
    state_rows,
    stored_offsets,
    wait_for,
)
from psycopg import sql
from test_metrics_scrape import free_port, scrape

from spr.config import BatchPolicy, EngineConfig, TableMapping
from spr.engine import Engine
from spr.errors import ConfigError
from spr.sink.postgres import PostgresSink

Names = Callable[[str], str]


def set_retention(admin: AdminClient, topic: str, retention_ms: str) -> None:
    resource = ConfigResource(
        "topic",
        topic,
        incremental_configs=[
            ConfigEntry("retention.ms", retention_ms, incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def log_start(admin: AdminClient, topic: str) -> int:
    futures = admin.list_offsets({TopicPartition(topic, 0): OffsetSpec.earliest()})
    return int(next(iter(futures.values())).result(10).offset)


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {"entity_type": "order", "entity_id": f"{prefix}-{i}", "sequence": 1, "state": "new"}
        for i in range(count)
    ]


def run(argv: list[str], log: Path) -> int:
    proc = start(argv, log)
    try:
        return proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_retention_gap_stops_by_default_and_is_recorded_when_skipped(
    bootstrap: str, dsn: str, admin: AdminClient, make_topic: Callable[..., str],
    unique_name: Names, pg: psycopg.Connection[Any], tmp_path: Path,
) -> None:  # fmt: skip
    topic = make_topic(partitions=1, config={"segment.ms": "200"})
    table, table_latest = unique_name("state"), unique_name("state")
    group, group_latest = unique_name("g"), unique_name("g")
    for name in (table, table_latest):
        with PostgresSink(dsn, mapping=TableMapping(table=name)) as sink:
            sink.init_schema()
    # Both groups applied nothing yet but know the partition: stored offset 0.
    for g in (group, group_latest):
        pg.execute("INSERT INTO spr_offsets (group_id, topic, partition, next_offset) "
                   "VALUES (%s, %s, 0, 0)", (g, topic))  # fmt: skip

    produce_raw(bootstrap, topic, events("old", 40))
    set_retention(admin, topic, "1000")
    deadline = time.monotonic() + 30
    while log_start(admin, topic) == 0:  # the broker checks retention every 5 s
        assert time.monotonic() < deadline, "retention never deleted the old segment"
        time.sleep(0.2)
    set_retention(admin, topic, "-1")  # keep what comes next
    produce_raw(bootstrap, topic, events("new", 10))
    low = log_start(admin, topic)
    end = end_offsets(bootstrap, topic)[(topic, 0)]
    assert 0 < low < end

    # Default: stop, naming the partition and the size of the gap; nothing moves.
    log = tmp_path / "fail.log"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "2"])  # fmt: skip
    assert run(argv, log) == 2, log.read_text()[-2000:]
    last = log.read_text().strip().splitlines()[-1]
    assert f"{topic}[0]" in last and f"{low} event(s) were deleted by retention" in last, last
    assert stored_offsets(dsn, group, [topic]) == {(topic, 0): 0}
    assert state_rows(dsn, table) == {}

    # earliest: skip the deleted events, apply the rest, log, count, export and record
    # the gap. /metrics is scraped from the running process, before its idle exit.
    log, stats = tmp_path / "earliest.log", tmp_path / "earliest.json"
    port = free_port()
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "3", "--on-offset-gap", "earliest", "--log-json",
                               "--stats", str(stats), "--metrics-port", str(port)])  # fmt: skip
    proc = start(argv, log)
    try:
        seen: dict[str, float] = {}

        def gap_exported() -> bool:
            nonlocal seen
            try:
                seen = scrape(port)
            except OSError:
                return False
            return seen.get("spr_offset_gaps_total", 0) > 0

        wait_for(gap_exported, 60, "the skipped gap on /metrics")
        assert proc.poll() is None  # scraped from the running process
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen["spr_offset_gaps_total"] == 1
    assert seen["spr_offset_gap_events_total"] == low
    assert low <= 40  # the segment holding the new events is the active one
    assert set(state_rows(dsn, table)) == {f"order:new-{i}" for i in range(10)} | {
        f"order:old-{i}" for i in range(low, 40)
    }
    assert stored_offsets(dsn, group, [topic]) == {(topic, 0): end}
    counted = json.loads(stats.read_text())
    assert counted["offset_gaps"] == 1 and counted["offset_gap_events"] == low
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    gap_lines = [x for x in lines if x.get("event") == "offset_gap"]
    assert len(gap_lines) == 1 and gap_lines[0]["gap_events"] == low
    assert gap_lines[0]["partition"] == 0 and gap_lines[0]["topic"] == topic

    # latest: skip everything up to the end; nothing applied, recorded as such.
    log = tmp_path / "latest.log"
    argv = spr_run_argv(topics=[topic], group=group_latest, dsn=dsn, bootstrap=bootstrap,
                        table=table_latest,
                        extra=["--idle-exit", "2", "--on-offset-gap", "latest"])  # fmt: skip
    assert run(argv, log) == 0, log.read_text()[-2000:]
    assert state_rows(dsn, table_latest) == {}
    assert stored_offsets(dsn, group_latest, [topic]) == {(topic, 0): end}

    recorded = pg.execute(
        "SELECT group_id, stored_offset, log_start, gap_events, resumed_at, resume_offset "
        "FROM spr_offsets_gaps WHERE topic = %s AND partition = 0 ORDER BY recorded_at",
        (topic,),
    ).fetchall()
    assert recorded == [
        (group, 0, low, low, "earliest", low),
        (group_latest, 0, low, low, "latest", end),
    ]


def _run_into_a_mid_run_gap(
    bootstrap: str, dsn: str, admin: AdminClient, topic: str, table: str, group: str,
    on_offset_gap: str,
) -> tuple[Engine, BaseException | None, int]:  # fmt: skip
    """Run an engine in a thread; while it is paused behind a flush held up by a table
    lock, delete the records from its fetch position on (``delete_records``), so that
    its position falls below the log start mid-run. Returns the engine, what ``run``
    raised and the new log start."""
    config = EngineConfig(
        group_id=group, topics=(topic,), bootstrap=bootstrap, dsn=dsn,
        mapping=TableMapping(table=table), batch=BatchPolicy(max_rows=10), consume_batch=5,
        idle_exit_s=2.0, on_offset_gap=on_offset_gap, dead_letters=False,
    )  # fmt: skip
    engine = Engine(config)
    raised: list[BaseException] = []

    def body() -> None:
        try:
            engine.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    wait_for(lambda: engine.stats().assigned_partitions == 1, 30, "the assignment")
    with psycopg.connect(dsn) as lock:
        lock.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
        )
        produce_raw(bootstrap, topic, events("e", 100))
        wait_for(lambda: engine.stats().paused_partitions == 1, 20, "the pause")
        consumed = engine.stats().consumed
        assert 0 < consumed < 60
        deleted = admin.delete_records([TopicPartition(topic, 0, 60)])
        for future in deleted.values():
            future.result(10)
        lock.rollback()
    thread.join(60)
    assert not thread.is_alive()
    return engine, (raised[0] if raised else None), log_start(admin, topic)


def test_a_retention_gap_mid_run_is_never_skipped_silently(
    bootstrap: str, dsn: str, admin: AdminClient, make_topic: Callable[..., str],
    unique_name: Names, pg: psycopg.Connection[Any],
) -> None:  # fmt: skip
    """The fetch position falls below the log start while spr runs: librdkafka is told
    ``auto.offset.reset=error``, so spr sees it and applies on_offset_gap as at start."""
    for choice in ("fail", "earliest"):
        topic = make_topic(partitions=1)
        table, group = unique_name("state"), unique_name("g")
        with PostgresSink(dsn, mapping=TableMapping(table=table)) as sink:
            sink.init_schema()
        engine, raised, low = _run_into_a_mid_run_gap(
            bootstrap, dsn, admin, topic, table, group, choice
        )
        assert low == 60
        stored = stored_offsets(dsn, group, [topic]).get((topic, 0), 0)
        if choice == "fail":
            assert isinstance(raised, ConfigError), raised
            assert f"{topic}[0]" in str(raised) and "deleted by retention" in str(raised)
            assert stored < 60  # nothing past the gap
            continue
        assert raised is None, raised
        assert stored == 100
        recorded = pg.execute(
            "SELECT stored_offset, log_start, gap_events, resumed_at, resume_offset "
            "FROM spr_offsets_gaps WHERE group_id = %s",
            (group,),
        ).fetchall()
        assert len(recorded) == 1
        position = recorded[0][0]
        assert recorded[0] == (position, 60, 60 - position, "earliest", 60)
        assert set(state_rows(dsn, table)) == {f"order:e-{i}" for i in range(position)} | {
            f"order:e-{i}" for i in range(60, 100)
        }
        stats = engine.stats()
        assert stats.offset_gaps == 1 and stats.offset_gap_events == 60 - position
