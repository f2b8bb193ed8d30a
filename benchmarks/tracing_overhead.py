"""What tracing costs the engine's intake (issue 17), measured in one process.

Run: ``.venv/bin/python -m benchmarks.tracing_overhead [--events N] [--rounds R]
[--bootstrap 127.0.0.1:9092]``.

The ``spr bench`` workload (``confluent_kafka.Message`` objects, every one carrying a
``traceparent`` header; with ``--bootstrap``, records really sent and consumed back,
which is what the engine sees: their header lists are still librdkafka's) goes through
the engine's :class:`~spr.engine.intake.Intake` in ``consume()``-sized chunks, a batch handed off whenever it is full, with a flush span
started and ended per batch where the mode has one. The modes run alternately, R rounds
each, so that a noisy machine slows them alike:

* ``off``: no ``--otel`` (the default): no header read, no span;
* ``sampler-off``: ``--otel`` with ``OTEL_TRACES_SAMPLER=always_off``: the engine sees
  that nothing can be recorded, reads no header, and its flush spans are non-recording;
* ``unsampled-events``: tracing on, the events' ``traceparent`` not sampled (flags
  ``00``): every header is read, no link is kept (the worst case of the scan);
* ``sampled-events``: tracing on, every event sampled: headers are read until the batch
  has its 128 links, and each flush span is recorded with them (not exported).

Prints events/s per mode, best and median, and each mode's median against ``off``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from benchmarks.ratios import print_medians
from benchmarks.workloads import consumed_messages
from spr.config import BatchPolicy
from spr.decode import DEFAULT_LIMITS
from spr.dedup import IdempotencyRing
from spr.engine.intake import Intake
from spr.tracing import DEFAULT_MAX_LINKS, TraceLinks
from spr.tracing.otel import BatchTracer, samples_nothing

CHUNK = 2_000


def _with_traceparent(messages: list[Any], flags: str) -> list[Any]:
    out = []
    for i, m in enumerate(messages):
        parent = f"00-{i + 1:032x}-{i + 1:016x}-{flags}".encode()
        headers = [
            ("idempotency-key", b"x:y:1"),
            ("schema-version", b"v2"),
            ("traceparent", parent),
        ]
        out.append(
            Message(topic=m.topic(), partition=m.partition(), offset=m.offset(), key=m.key(),
                    value=m.value(), timestamp=m.timestamp(), headers=headers)
        )  # fmt: skip
    return out


def _consumed(bootstrap: str, messages: list[Any], flags: str) -> list[Any]:
    """``messages`` sent with a ``traceparent`` to a fresh topic and consumed back: real
    consumed records, whose headers librdkafka holds until ``headers()`` converts them.
    The topic is deleted afterwards."""
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"tracing-overhead-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=12, replication_factor=1)])[topic].result(
        30
    )
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for i, m in enumerate(messages):
            parent = f"00-{i + 1:032x}-{i + 1:016x}-{flags}".encode()
            headers = [("idempotency-key", b"x:y:1"), ("schema-version", b"v2"),
                       ("traceparent", parent)]  # fmt: skip
            while True:
                try:
                    producer.produce(topic, m.value(), m.key(), partition=m.partition(),
                                     headers=headers)  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(60)
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": topic, "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition(topic, p, 0) for p in range(12)])
        found: list[Any] = []
        deadline = time.monotonic() + 120
        while len(found) < len(messages) and time.monotonic() < deadline:
            found += [r for r in consumer.consume(2_000, 1.0) if r.error() is None]
        consumer.close()
        return found
    finally:
        admin.delete_topics([topic])[topic].result(30)


def _run(messages: list[Any], provider: TracerProvider | None) -> float:
    intake = Intake(BatchPolicy(), IdempotencyRing(1 << 20, 60_000), DEFAULT_LIMITS)
    tracer = None
    if provider is not None:
        tracer = BatchTracer(
            group="bench", topics=["bench"], table="state", dsn="dbname=spr",
            tracer=provider.get_tracer("spr"),
        )  # fmt: skip
        if not samples_nothing(provider):
            intake.trace_links = TraceLinks(DEFAULT_MAX_LINKS)
    assigned = {(m.topic(), m.partition()) for m in messages}
    started = time.perf_counter()
    for start in range(0, len(messages), CHUNK):
        intake.ingest(messages[start : start + CHUNK], 1.0, assigned)
        if intake.full or start + CHUNK >= len(messages):
            pending = intake.take()
            if tracer is not None:
                span = tracer.start(
                    links=pending.links or (), messages=pending.messages, events=pending.events,
                    rows=pending.batch.row_count, duplicates=pending.duplicates,
                    invalid=pending.invalid, partitions=list(pending.batch.next_offsets()),
                )  # fmt: skip
                tracer.end(span, "committed", applied=pending.batch.row_count, stale=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="send the events through this broker and time real consumed records "
        "(default: records built in memory, whose header lists already exist)",
    )
    args = parser.parse_args()
    base = consumed_messages(args.events, by_key=True)
    if args.bootstrap:
        unsampled = _consumed(args.bootstrap, base, "00")
        sampled = _consumed(args.bootstrap, base, "01")
        args.events = min(len(unsampled), len(sampled))
        unsampled, sampled = unsampled[: args.events], sampled[: args.events]
    else:
        unsampled = _with_traceparent(base, "00")
        sampled = _with_traceparent(base, "01")
    modes: dict[str, Callable[[], float]] = {
        "off": lambda: _run(unsampled, None),
        "sampler-off": lambda: _run(unsampled, TracerProvider(sampler=ALWAYS_OFF)),
        "unsampled-events": lambda: _run(unsampled, TracerProvider(sampler=ALWAYS_ON)),
        "sampled-events": lambda: _run(sampled, TracerProvider(sampler=ALWAYS_ON)),
    }
    for run in modes.values():
        run()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            rates[name].append(args.events / run())
    print_medians(
        f"{args.events:,} events, {args.rounds} rounds alternating, chunks of {CHUNK:,}",
        rates,
        width=12,
    )


if __name__ == "__main__":
    main()
