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
"""

from __future__ import annotations

import time
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["run_copy_merge", "run_raw_consume"]


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
    from spr.decode import decode_batch
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
    received = 0
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

    deadline = time.monotonic() + timeout_s
    try:
        while received < total and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(10_000, 0.5) if m.error() is None]
            if not messages:
                continue
            received += len(messages)
            offsets = [m.offset() for m in messages]
            events, _invalid = decode_batch(
                [m.value() for m in messages], offsets, [m.timestamp()[1] for m in messages]
            )
            for message, event, offset in zip(messages, events, offsets, strict=True):
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
