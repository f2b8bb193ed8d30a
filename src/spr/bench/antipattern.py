"""The field report's anti-pattern, ported to Python (design §1).

One ``consumer.poll()``, one ``json.loads``, one ``INSERT ... ON CONFLICT DO UPDATE``
on an autocommit connection and one synchronous ``consumer.commit(asynchronous=False)``
per message, as the report's consumers do. Its upsert has no sequence guard (the
report's has none), so a stale event that arrives after a newer one overwrites it:
``spr bench`` verifies the table anyway and reports what it finds. Run on a prefix of
the events (``limit`` messages), since at a few thousand events/s the whole topic would
take minutes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["run"]


def run(
    *,
    topic: str,
    bootstrap: str,
    dsn: str,
    group: str,
    table: str,
    limit: int,
    timeout_s: float = 300.0,
    **_: Any,
) -> dict[str, Any]:
    """Consume ``limit`` messages the slow way; returns the timeline and the offsets
    it stopped at (``stop_offsets``: partition -> next offset), so that the harness can
    verify exactly the prefix it consumed. Blocks at most ``timeout_s``."""
    import psycopg
    from confluent_kafka import Consumer
    from psycopg import sql

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
        }
    )
    conn = psycopg.connect(dsn, autocommit=True)
    insert = sql.SQL(
        "INSERT INTO {} (entity_type, entity_id, sequence, state, event_id, payload, event_ts,"
        " kafka_topic, kafka_partition, kafka_offset) VALUES (%s, %s, %s, %s, %s, %s,"
        " to_timestamp(%s / 1000.0), %s, %s, %s) ON CONFLICT (entity_type, entity_id) DO UPDATE"
        " SET sequence = excluded.sequence, state = excluded.state,"
        " event_id = excluded.event_id, payload = excluded.payload,"
        " event_ts = excluded.event_ts, kafka_partition = excluded.kafka_partition,"
        " kafka_offset = excluded.kafka_offset, processed_at = now()"
    ).format(sql.Identifier(table))
    recorder = Recorder()
    stop_offsets: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    consumer.subscribe([topic])
    try:
        with conn.cursor() as cur:
            while recorder.done < limit and time.monotonic() < deadline:
                message: Any = consumer.poll(1.0)
                if message is None or message.error() is not None:
                    continue
                recorder.first()
                event = json.loads(message.value())
                cur.execute(
                    insert,
                    (
                        event["entity_type"],
                        event["entity_id"],
                        event["sequence"],
                        event["state"],
                        event["event_id"],
                        json.dumps(event.get("payload")),
                        event["timestamp"],
                        message.topic(),
                        message.partition(),
                        message.offset(),
                    ),
                )
                consumer.commit(message=message, asynchronous=False)
                stop_offsets[message.partition()] = message.offset() + 1
                recorder.add(1)
    finally:
        consumer.close()
        conn.close()
    # One point per message is too many to carry around; keep every 100th.
    recorder.timeline = recorder.timeline[::100] + recorder.timeline[-1:]
    return recorder.result(stop_offsets=stop_offsets)
