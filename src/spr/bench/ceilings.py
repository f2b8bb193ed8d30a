"""The two ceilings spr is measured against, each in its own process (``spr.bench.worker``).

``raw``
    Kafka consumption with no processing at all: the same librdkafka settings as the
    engine (``EngineConfig.consumer_config()``), partitions assigned directly (no group
    join), ``consume(10_000)`` in a loop, nothing touched but the count. No Python
    consumer can apply events faster than it can receive them.
``copy_merge``
    The database side alone: the same rows spr writes (decoded, collapsed per entity in
    batches of the engine's ``max_rows``), flushed with spr's own
    :meth:`~spr.sink.postgres.PostgresSink.flush` (COPY into staging, merge with the
    sequence guard, offsets upsert; one transaction per batch) on one connection. Only
    the flushes are timed, so the figure is the database's rate with an infinitely fast
    client: the upper bound for one flush connection.
``plain_merge``
    The textbook way, written outside spr and with none of its database-side choices
    (``live`` scenario only): each batch of ``max_rows`` events, not collapsed in the
    client, in one transaction that creates a temporary table (``ON COMMIT DROP``),
    ``COPY``s the rows into it in text format one by one, merges them with ``INSERT ...
    SELECT DISTINCT ON (key) ... ORDER BY key, sequence DESC ON CONFLICT DO UPDATE``
    under the same sequence guard, and upserts each partition's next offset. Its table
    is the textbook one too (:func:`create_textbook_table`, the key in the database's
    collation). Database time only, like ``copy_merge``: what spr's flush is compared
    with.
"""

from __future__ import annotations

import time
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["create_textbook_table", "run_copy_merge", "run_plain_merge", "run_raw_consume"]


def create_textbook_table(conn: Any, table: str) -> None:
    """Create ``table`` with spr's columns and none of its choices (the key in the
    database's collation, not byte order), in its own transaction."""
    from psycopg import sql

    with conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (entity_type text NOT NULL, entity_id text NOT NULL, "
                "sequence bigint NOT NULL, state text NOT NULL, event_id text, payload jsonb, "
                "event_ts timestamptz, kafka_topic text, kafka_partition integer, "
                "kafka_offset bigint, processed_at timestamptz DEFAULT now(), "
                "PRIMARY KEY (entity_type, entity_id))"
            ).format(sql.Identifier(table))
        )


def _consumer(bootstrap: str, group: str, topic: str, start_offsets: dict[str, int]) -> Any:
    from confluent_kafka import Consumer, TopicPartition

    from spr.config import EngineConfig

    conf = EngineConfig(group_id=group, topics=(topic,), bootstrap=bootstrap).consumer_config()
    # spr's consumer asks for end-of-partition events (its stored offsets step over a
    # transaction's closing marker); with them librdkafka fetches a backlog at about
    # half the rate (measured: 1.8M -> 0.9M messages/s, the same CPU time, consume()
    # waiting). spr runs well below either; a ceiling should not pay for it.
    conf["enable.partition.eof"] = False
    consumer = Consumer(conf)
    consumer.assign([TopicPartition(topic, int(p), int(o)) for p, o in start_offsets.items()])
    return consumer


def _decoded(consumer: Any, total: int, deadline: float) -> Any:
    """``(message, event, offset)`` for each of the next ``total`` records (``event`` None
    when the value does not decode), until ``deadline`` on the monotonic clock."""
    from spr.decode import decode_batch

    received = 0
    while received < total and time.monotonic() < deadline:
        messages = [m for m in consumer.consume(10_000, 0.5) if m.error() is None]
        if not messages:
            continue
        received += len(messages)
        offsets = [m.offset() for m in messages]
        events, _invalid = decode_batch(
            [m.value() for m in messages], offsets, [m.timestamp()[1] for m in messages]
        )
        yield from zip(messages, events, offsets, strict=True)


def run_raw_consume(
    *,
    topic: str,
    bootstrap: str,
    group: str,
    total: int,
    start_offsets: dict[str, int],
    timeout_s: float = 600.0,
    **_: Any,
) -> dict[str, Any]:
    """Receive ``total`` messages as fast as possible; blocks at most ``timeout_s``."""
    consumer = _consumer(bootstrap, group, topic, start_offsets)
    recorder = Recorder()
    received = 0
    deadline = time.monotonic() + timeout_s
    try:
        while received < total and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(10_000, 0.5) if m.error() is None]
            if not messages:
                continue
            recorder.first()
            received += len(messages)
            recorder.add(len(messages))
    finally:
        consumer.close()
    return recorder.result()


def run_copy_merge(
    *,
    topic: str,
    bootstrap: str,
    dsn: str,
    group: str,
    table: str,
    offsets_table: str,
    total: int,
    start_offsets: dict[str, int],
    max_rows: int,
    timeout_s: float = 900.0,
    **_: Any,
) -> dict[str, Any]:
    """Flush the topic's events as spr would, timing only the database work."""
    from spr.batch import STATE_COLUMNS, Batch
    from spr.config import TableMapping
    from spr.sink.postgres import PostgresSink

    sink = PostgresSink(
        dsn, group_id=group, mapping=TableMapping(table=table, offsets_table=offsets_table)
    )
    sink.init_schema()
    consumer = _consumer(bootstrap, group, topic, start_offsets)
    recorder = Recorder()
    recorder.first_s = 0.0
    busy = 0.0
    flushes = 0
    rows = 0
    batch = Batch(STATE_COLUMNS)
    pending = 0

    def flush() -> None:
        nonlocal busy, flushes, rows, batch, pending
        started = time.perf_counter()
        result = sink.flush(batch)
        busy += time.perf_counter() - started
        flushes += 1
        rows += result.rows
        recorder.done += pending
        # A synthetic clock: database time only, laid end to end.
        recorder.timeline.append((busy, recorder.done))
        batch = Batch(STATE_COLUMNS)
        pending = 0

    try:
        for message, event, offset in _decoded(consumer, total, time.monotonic() + timeout_s):
            if event is None:
                batch.advance(topic, message.partition(), offset)
            else:
                batch.add(event, topic, message.partition(), offset)
            pending += 1
            if batch.row_count >= max_rows:
                flush()
        if pending:
            flush()
    finally:
        consumer.close()
        sink.close()
    return recorder.result(flushes=flushes, rows=rows, db_seconds=busy)


def run_plain_merge(
    *,
    topic: str,
    bootstrap: str,
    dsn: str,
    group: str,
    table: str,
    offsets_table: str,
    total: int,
    start_offsets: dict[str, int],
    max_rows: int,
    timeout_s: float = 900.0,
    **_: Any,
) -> dict[str, Any]:
    """Flush the topic's events the textbook way (see the module docstring), timing only
    the database work. ``table`` and ``offsets_table`` exist (spr's layout)."""
    from datetime import datetime, timezone

    import psycopg
    from psycopg import sql

    columns = sql.SQL(
        "entity_type, entity_id, sequence, state, event_id, payload, event_ts, "
        "kafka_topic, kafka_partition, kafka_offset"
    )
    create = sql.SQL(
        "CREATE TEMP TABLE plain_stage (entity_type text, entity_id text, sequence bigint, "
        "state text, event_id text, payload jsonb, event_ts timestamptz, kafka_topic text, "
        "kafka_partition integer, kafka_offset bigint) ON COMMIT DROP"
    )
    copy_sql = sql.SQL("COPY plain_stage ({}) FROM STDIN").format(columns)
    merge = sql.SQL(
        "INSERT INTO {t} AS t ({cols}, processed_at) "
        "SELECT DISTINCT ON (entity_type, entity_id) {cols}, now() FROM plain_stage "
        "ORDER BY entity_type, entity_id, sequence DESC, kafka_offset DESC "
        "ON CONFLICT (entity_type, entity_id) DO UPDATE SET sequence = excluded.sequence, "
        "state = excluded.state, event_id = excluded.event_id, payload = excluded.payload, "
        "event_ts = excluded.event_ts, kafka_topic = excluded.kafka_topic, "
        "kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset, "
        "processed_at = excluded.processed_at WHERE excluded.sequence > t.sequence"
    ).format(t=sql.Identifier(table), cols=columns)
    offsets_sql = sql.SQL(
        "INSERT INTO {o} AS o (group_id, topic, partition, next_offset, updated_at) "
        "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (group_id, topic, partition) "
        "DO UPDATE SET next_offset = GREATEST(o.next_offset, excluded.next_offset), "
        "updated_at = now()"
    ).format(o=sql.Identifier(offsets_table))

    conn = psycopg.connect(dsn)
    consumer = _consumer(bootstrap, group, topic, start_offsets)
    recorder = Recorder()
    recorder.first_s = 0.0
    busy = 0.0
    flushes = 0
    rows: list[tuple[Any, ...]] = []
    next_offsets: dict[int, int] = {}
    pending = 0
    copied = 0

    def flush() -> None:
        nonlocal busy, flushes, rows, pending, copied
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(create)
            with cur.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(merge)
            cur.executemany(
                offsets_sql, [(group, topic, p, o) for p, o in sorted(next_offsets.items())]
            )
        busy += time.perf_counter() - started
        flushes += 1
        copied += len(rows)
        recorder.done += pending
        recorder.timeline.append((busy, recorder.done))
        rows, pending = [], 0
        next_offsets.clear()

    try:
        for message, event, offset in _decoded(consumer, total, time.monotonic() + timeout_s):
            partition = message.partition()
            next_offsets[partition] = offset + 1
            pending += 1
            if event is not None:
                stamp = event.timestamp_ms
                rows.append((
                    event.entity_type, event.entity_id, event.sequence, event.state,
                    event.event_id, bytes(event.payload).decode(),
                    datetime.fromtimestamp(stamp / 1000, tz=timezone.utc)
                    if stamp >= 0 else None,
                    topic, partition, offset,
                ))  # fmt: skip
            if pending >= max_rows:
                flush()
        if pending:
            flush()
    finally:
        consumer.close()
        conn.close()
    return recorder.result(flushes=flushes, rows=copied, db_seconds=busy)
