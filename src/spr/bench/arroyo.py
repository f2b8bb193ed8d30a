"""The best a user can compose from sentry-arroyo, as a speed reference.

``StreamProcessor`` → ``BatchStep`` (the engine's ``max_rows`` messages or 200 ms) →
``RunTaskInThreads`` (one worker thread, two batches in flight, so fetching overlaps
writing) running a task that decodes the batch with msgspec, keeps each entity's newest
sequence, ``COPY``s it into a temporary staging table and merges it with the same
sequence guard as spr → ``CommitOffsets`` (arroyo's once-per-second policy).

It is at-least-once: Kafka offsets are committed after the database transaction, not in
it, so a crash between the two replays a batch (harmless here thanks to the guard). Its
figure is a speed reference, not an equal. Needs ``sentry-arroyo`` (the ``bench`` extra).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["run"]

_STAGING_COLUMNS = (
    "entity_type text, entity_id text, sequence bigint, state text, event_id text, "
    "payload jsonb, event_ts timestamptz, kafka_topic text, kafka_partition integer, "
    "kafka_offset bigint"
)


def run(
    *,
    topic: str,
    bootstrap: str,
    dsn: str,
    group: str,
    table: str,
    total: int,
    max_rows: int = 5_000,
    timeout_s: float = 900.0,
    **_: Any,
) -> dict[str, Any]:
    """Consume until ``total`` messages are written and committed; blocks at most
    ``timeout_s``. Raises ImportError when sentry-arroyo is not installed."""
    from datetime import datetime, timezone

    import msgspec
    import psycopg
    from arroyo.backends.kafka import KafkaConsumer, KafkaPayload
    from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
    from arroyo.processing.processor import StreamProcessor
    from arroyo.processing.strategies import (
        BatchStep,
        CommitOffsets,
        ProcessingStrategy,
        ProcessingStrategyFactory,
        RunTaskInThreads,
    )
    from arroyo.types import Commit, Message, Partition, Topic
    from psycopg import sql

    recorder = Recorder()
    decode = msgspec.json.Decoder().decode
    encode = msgspec.json.Encoder().encode
    conn = psycopg.connect(dsn)
    conn.execute(f"CREATE TEMP TABLE staging ({_STAGING_COLUMNS}) ON COMMIT DELETE ROWS")
    conn.commit()
    copy_sql = sql.SQL(
        "COPY staging (entity_type, entity_id, sequence, state, event_id, payload, event_ts,"
        " kafka_topic, kafka_partition, kafka_offset) FROM STDIN"
    )
    merge_sql = sql.SQL(
        "INSERT INTO {t} AS t (entity_type, entity_id, sequence, state, event_id, payload,"
        " event_ts, kafka_topic, kafka_partition, kafka_offset, processed_at)"
        " SELECT *, now() FROM staging ORDER BY entity_type, entity_id"
        " ON CONFLICT (entity_type, entity_id) DO UPDATE SET sequence = excluded.sequence,"
        " state = excluded.state, event_id = excluded.event_id, payload = excluded.payload,"
        " event_ts = excluded.event_ts, kafka_topic = excluded.kafka_topic,"
        " kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset,"
        " processed_at = excluded.processed_at WHERE excluded.sequence > t.sequence"
    ).format(t=sql.Identifier(table))
    processor_box: list[Any] = []

    def write_batch(message: Message[Any]) -> None:
        newest: dict[tuple[str, str], tuple[Any, ...]] = {}
        values = message.payload
        for value in values:
            broker = value
            event = decode(broker.payload.value)
            key = (event["entity_type"], event["entity_id"])
            row = (
                event["entity_type"],
                event["entity_id"],
                event["sequence"],
                event["state"],
                event["event_id"],
                encode(event.get("payload")).decode(),
                datetime.fromtimestamp(event["timestamp"] / 1000.0, tz=timezone.utc),
                broker.partition.topic.name,
                broker.partition.index,
                broker.offset,
            )
            current = newest.get(key)
            if current is None or row[2] >= current[2]:
                newest[key] = row
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(copy_sql) as copy:
                for row in newest.values():
                    copy.write_row(row)
            cur.execute(merge_sql)
        recorder.add(len(values))
        if recorder.done >= total and processor_box:
            processor_box[0].signal_shutdown()

    class FirstMessage(ProcessingStrategy[KafkaPayload]):
        """A pass-through step that notes when the first message arrived."""

        def __init__(self, next_step: ProcessingStrategy[KafkaPayload]) -> None:
            self._next = next_step

        def submit(self, message: Message[KafkaPayload]) -> None:
            if recorder.first_s is None:
                recorder.first()
            self._next.submit(message)

        def poll(self) -> None:
            self._next.poll()

        def join(self, timeout: float | None = None) -> None:
            self._next.join(timeout)

        def close(self) -> None:
            self._next.close()

        def terminate(self) -> None:
            self._next.terminate()

    class Factory(ProcessingStrategyFactory[KafkaPayload]):
        def create_with_partitions(
            self, commit: Commit, partitions: Mapping[Partition, int]
        ) -> ProcessingStrategy[KafkaPayload]:
            return FirstMessage(
                BatchStep(
                    max_batch_size=max_rows,
                    max_batch_time=0.2,
                    next_step=RunTaskInThreads(
                        write_batch,
                        concurrency=1,
                        max_pending_futures=2,
                        next_step=CommitOffsets(commit),
                    ),
                ),
            )

    consumer = KafkaConsumer(
        build_kafka_consumer_configuration(
            {},
            group_id=group,
            auto_offset_reset="earliest",
            bootstrap_servers=[bootstrap],
            enable_auto_commit=False,
        )
    )
    processor = StreamProcessor(consumer, Topic(topic), Factory())
    processor_box.append(processor)
    timer = threading.Timer(timeout_s, processor.signal_shutdown)
    timer.daemon = True
    timer.start()
    try:
        processor.run()
    finally:
        timer.cancel()
        conn.close()
    return recorder.result()
