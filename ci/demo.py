"""Stack round trip: events through a real Kafka topic into a real PostgreSQL table."""

from __future__ import annotations

import sys
import time
import uuid

import psycopg
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from spr.devstack import DEFAULT_BOOTSTRAP, DEFAULT_DSN
from spr.routing import partition_key


def main() -> int:
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": DEFAULT_BOOTSTRAP})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result()
    producer = Producer({"bootstrap.servers": DEFAULT_BOOTSTRAP, "enable.idempotence": True,
                         "partitioner": "murmur2_random"})  # fmt: skip
    for i in range(1000):
        producer.produce(topic, key=partition_key(f"order:{i % 100}"), value=f"{i}".encode())
    producer.flush(30)
    consumer = Consumer({"bootstrap.servers": DEFAULT_BOOTSTRAP, "group.id": topic,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    rows = []
    deadline = time.monotonic() + 60
    while len(rows) < 1000 and time.monotonic() < deadline:
        rows += [(m.key().decode(), int(m.value())) for m in consumer.consume(500, 1.0)]
    consumer.close()
    with psycopg.connect(DEFAULT_DSN) as conn:
        conn.execute("CREATE TEMP TABLE demo (k text primary key, v int)")
        with conn.cursor().copy("COPY demo (k, v) FROM STDIN") as copy:
            for k, v in {k: v for k, v in rows}.items():
                copy.write_row((k, v))
        (count,) = conn.execute("SELECT count(*) FROM demo").fetchone() or (0,)
    admin.delete_topics([topic])
    print(f"demo: 1000 events through {topic} -> {count} entities in PostgreSQL")
    return 0 if count == 100 else 1


if __name__ == "__main__":
    sys.exit(main())
