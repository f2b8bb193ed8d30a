"""Keep your own confluent-kafka loop, and apply it to PostgreSQL exactly once with spr.

The loop below is yours: you build the consumer, call ``consume()`` and decide when to
stop. spr's :class:`~spr.engine.StatePipeline` (the same stages ``spr run`` uses) takes
each ``consume()`` result and gives it the idempotency ring, fetch/write overlap, the
sequence guard, offsets stored in the same transaction as the rows, and dead letters
for invalid events (``<topic>.dlq``, never dropped silently). Its rebalance callbacks
start every partition at the offset stored in the database.

    python examples/embed_sink.py --topic orders --group my-loop

Run it twice: the second run applies nothing, because the database remembers where the
first one stopped. It exits 0 once it owns partitions and nothing new arrived for
``--idle`` seconds, with everything consumed committed.
"""

from __future__ import annotations

import argparse
import time

from confluent_kafka import Consumer

from spr.config import EngineConfig, TableMapping, default_bootstrap, default_dsn
from spr.dlq import dead_letter_sink
from spr.engine import StatePipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=default_bootstrap())
    parser.add_argument("--dsn", default=default_dsn())
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", default="spr-embed-example")
    parser.add_argument("--table", default="spr_entity_state")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds without news to exit")
    args = parser.parse_args()

    config = EngineConfig(
        group_id=args.group,
        topics=(args.topic,),
        bootstrap=args.bootstrap,
        dsn=args.dsn,
        mapping=TableMapping(table=args.table),
        auto_create_schema=True,
    )
    # spr's consumer settings: auto-commit off, and librdkafka never resets a position
    # by itself (the database decides where a partition starts).
    consumer = Consumer(StatePipeline.consumer_config(config))
    pipeline = StatePipeline(config, consumer, dead_letters=dead_letter_sink(config))
    pipeline.open()
    consumer.subscribe(
        [args.topic],
        on_assign=pipeline.on_assign,
        on_revoke=pipeline.on_revoke,
        on_lost=pipeline.on_lost,
    )
    taken = 0
    last_news = time.monotonic()
    try:
        while True:
            messages = consumer.consume(500, 0.1)
            pipeline.submit(messages)  # decode, dedup, batch; invalid ones dead-lettered
            pipeline.poll()  # hand a batch to the database, collect the one before
            data = sum(1 for m in messages if m.error() is None)
            if data:
                taken += data
                last_news = time.monotonic()
            idle = time.monotonic() - last_news >= args.idle
            if idle and pipeline.positions.assigned and not pipeline.busy:
                break
        if not pipeline.join(timeout_s=30.0):  # everything taken, committed
            raise SystemExit("the last batch did not commit within 30 s")
    finally:
        consumer.close()  # its final revoke commits what is left, or rolls it back
        pipeline.close()
    print(f"took {taken} message(s); state in {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
