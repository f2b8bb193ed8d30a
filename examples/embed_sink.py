"""Use spr's PostgreSQL sink from your own confluent-kafka loop, without the engine.

Decode each message, collect a Batch, flush it (rows and offsets in one transaction),
and start every assigned partition at the offset stored in the database. Run it twice:
the second run reads nothing, because the database remembers where the first stopped.

    python examples/embed_sink.py --topic orders --group my-loop

It exits 0 once it has been assigned its partitions and nothing new arrived for
--idle seconds. (No ring and no overlap here: the engine, ``spr run``, adds those.)
"""

from __future__ import annotations

import argparse
import os
import time

from confluent_kafka import Consumer

from spr.batch import STATE_COLUMNS, Batch
from spr.config import TableMapping
from spr.decode import decode_batch
from spr.devstack import DEFAULT_BOOTSTRAP, DEFAULT_DSN
from spr.offsets import on_assign_from_db
from spr.sink import PostgresSink


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("SPR_BOOTSTRAP", DEFAULT_BOOTSTRAP))
    parser.add_argument("--dsn", default=os.environ.get("SPR_DSN", DEFAULT_DSN))
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", default="spr-embed-example")
    parser.add_argument("--table", default="spr_entity_state")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds without news to exit")
    args = parser.parse_args()

    sink = PostgresSink(args.dsn, group_id=args.group, mapping=TableMapping(table=args.table))
    sink.init_schema()
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,  # the database stores the offsets
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.offset.reset": "earliest",
        }
    )
    assigned = False
    base_on_assign = on_assign_from_db(sink, incremental=True)

    def on_assign(c: Consumer, partitions: list) -> None:  # type: ignore[type-arg]
        nonlocal assigned
        base_on_assign(c, partitions)
        assigned = True

    consumer.subscribe([args.topic], on_assign=on_assign)
    batch = Batch(STATE_COLUMNS)
    processed = 0
    last_news = time.monotonic()
    try:
        while True:
            messages = [m for m in consumer.consume(500, 0.2) if m.error() is None]
            if messages:
                last_news = time.monotonic()
                events, _invalid = decode_batch(
                    [m.value() for m in messages],
                    [m.offset() for m in messages],
                    [m.timestamp()[1] for m in messages],
                )
                for message, event in zip(messages, events, strict=True):
                    if event is None:  # invalid: skip it, but move its offset on
                        batch.advance(message.topic(), message.partition(), message.offset())
                    else:
                        batch.add(event, message.topic(), message.partition(), message.offset())
                processed += len(messages)
            idle = time.monotonic() - last_news >= args.idle
            if batch.next_offsets() and (batch.row_count >= 1000 or not messages):
                sink.flush(batch)  # one transaction: rows + offsets
                batch.clear()
            if idle and assigned and not batch.next_offsets():
                break
    finally:
        consumer.close()
        sink.close()
    print(f"processed {processed} message(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
