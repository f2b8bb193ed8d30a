"""The dead-letter topic on the real broker: headers, byte-exact round trips, failures,
``spr dlq list`` and ``spr dlq redrive``."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from spr.classify import ErrorClass
from spr.cli import main as spr_main
from spr.dlq import DeadLetterWriter, InvalidEventSink, SourceRecord, dlq_topic_for
from spr.errors import DeadLetterUnavailable

RawHeaders = list[tuple[str, bytes | None]]
Raw = tuple[
    int, int, bytes | None, bytes | None, RawHeaders
]  # partition, offset, key, value, headers

FIVE_MB = 5 * 1024 * 1024


def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Raw]:
    """Every message of ``topic``, as raw tuples, ordered by partition and offset."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "max.partition.fetch.bytes": 12 * 1024 * 1024,
            "fetch.max.bytes": 24 * 1024 * 1024,
        }
    )
    try:
        ends = {}
        for p in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        found: list[Raw] = []
        done = {p: False for p in ends}
        deadline = time.monotonic() + 30
        while not all(done.values()):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for message in consumer.consume(100, 0.5):
                assert message.error() is None, message.error()
                p, o = message.partition(), message.offset()
                assert p is not None and o is not None
                found.append((p, o, message.key(), message.value(), list(message.headers() or [])))
                if o + 1 >= ends[p]:
                    done[p] = True
        return sorted(found, key=lambda raw: (raw[0], raw[1]))
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, records: list[dict[str, object]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 11 * 1024 * 1024})
    errors: list[object] = []
    for record in records:
        producer.produce(topic, on_delivery=lambda e, m: errors.append(e) if e else None, **record)
    assert producer.flush(30) == 0 and not errors


def consume_source(bootstrap: str, topic: str, count: int) -> list[object]:
    """Consume ``count`` messages as confluent-kafka Message objects."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-src-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "max.partition.fetch.bytes": 12 * 1024 * 1024,
        }
    )
    try:
        consumer.subscribe([topic])
        messages: list[object] = []
        deadline = time.monotonic() + 30
        while len(messages) < count:
            assert time.monotonic() < deadline
            for message in consumer.consume(count, 0.5):
                assert message.error() is None, message.error()
                messages.append(message)
        return messages
    finally:
        consumer.close()


def test_dead_letters_carry_design_headers_and_round_trip_byte_exactly(
    bootstrap: str, make_topic: Callable[..., str], admin: AdminClient
) -> None:
    source = make_topic(partitions=3, prefix="dlq-src")
    dlq = dlq_topic_for(source)
    records: list[dict[str, object]] = [
        {
            "key": b"k-tombstone",
            "value": None,
            "partition": 0,
            "headers": [("trace", b"t1"), ("empty", None)],
        },
        {"key": b"k-big", "value": os.urandom(FIVE_MB), "partition": 1},
        {
            "key": b"\xff\x00key",
            "value": b'{"entity_id":"p\xff\xfe"}',
            "partition": 2,
            "headers": [("spr-error", b"spoofed"), ("trace", b"\x80")],
        },
        {"key": None, "value": b"", "partition": 2},
    ]
    produce(bootstrap, source, records)
    messages = consume_source(bootstrap, source, len(records))
    try:
        with DeadLetterWriter(bootstrap=bootstrap, group="g-orders") as writer:
            for message in messages:
                writer.send(message, ErrorClass.INVALID, "value is broken", attempts=1)
            writer.flush(30)
            assert writer.delivered == len(records) and writer.failed == 0
        # Created with the source's partition count; each letter on its source partition.
        metadata = admin.list_topics(dlq, timeout=10).topics[dlq]
        assert len(metadata.partitions) == 3
        letters = read_topic(bootstrap, dlq, 3)
        originals = {(m.partition(), m.offset()): m for m in messages}  # type: ignore[attr-defined]
        assert len(letters) == len(records)
        for partition, _, key, value, headers in letters:
            source_offset = int(dict(headers)["spr-source-offset"] or b"-1")
            original = originals[(partition, source_offset)]
            assert key == original.key()
            assert value == original.value()  # None stays None, 5 MB and bad UTF-8 exact
            kept = [(n, v) for n, v in original.headers() or [] if not n.startswith("spr-error")]
            assert headers == [
                *kept,
                ("spr-error-class", b"invalid"),
                ("spr-error", b"value is broken"),
                ("spr-source-topic", source.encode()),
                ("spr-source-partition", str(partition).encode()),
                ("spr-source-offset", str(source_offset).encode()),
                ("spr-attempts", b"1"),
                ("spr-group", b"g-orders"),
            ]
        assert {v is None for *_, v, _ in letters} == {True, False}
        assert any(v is not None and len(v) == FIVE_MB for *_, v, _ in letters)
    finally:
        admin.delete_topics([dlq], operation_timeout=30)


def test_flush_raises_when_the_broker_rejects_a_dead_letter(
    bootstrap: str, make_topic: Callable[..., str]
) -> None:
    # A dead-letter topic that only takes small messages: the broker refuses the letter.
    dlq = make_topic(partitions=1, prefix="dlq-small", config={"max.message.bytes": "2000"})
    writer = DeadLetterWriter(bootstrap=bootstrap, dlq_topic=dlq)
    record = SourceRecord(topic="orders", partition=0, offset=7, key=b"k", value=os.urandom(20_000))
    writer.send(record, ErrorClass.DATA, "row rejected", attempts=3)
    started = time.monotonic()
    with pytest.raises(DeadLetterUnavailable) as caught:
        writer.flush(30)
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert message.startswith("1 dead letter(s) could not be written:")
    assert f"{dlq} rejected a dead letter (MSG_SIZE_TOO_LARGE" in message
    assert "\n" not in message and caught.value.failed == 1
    # Permanent: a later flush still refuses to let offsets move past the lost letter.
    with pytest.raises(DeadLetterUnavailable):
        writer.flush(1)


def test_send_raises_when_kafka_is_unreachable_or_the_topic_is_invalid(bootstrap: str) -> None:
    record = SourceRecord(topic="orders", partition=0, offset=1, value=b"{}")
    started = time.monotonic()
    nowhere = DeadLetterWriter(
        bootstrap="127.0.0.1:1",
        metadata_timeout=2.0,
        producer_config={"message.timeout.ms": 1000},
    )
    with pytest.raises(DeadLetterUnavailable, match=r"^cannot reach Kafka at 127\.0\.0\.1:1 "):
        nowhere.send(record, ErrorClass.INVALID, "bad", attempts=1)
    assert time.monotonic() - started < 15
    nowhere.flush(1)  # nothing was queued, so nothing is owed

    invalid = DeadLetterWriter(bootstrap=bootstrap, dlq_topic="not a valid topic!")
    with pytest.raises(DeadLetterUnavailable) as caught:
        invalid.send(record, ErrorClass.INVALID, "bad", attempts=1)
    assert "dead-letter topic 'not a valid topic!'" in str(caught.value)

    switched_off = DeadLetterWriter(
        bootstrap=bootstrap, dlq_topic=f"missing-{uuid.uuid4().hex[:8]}", create_topic=False
    )
    with pytest.raises(DeadLetterUnavailable, match=r"does not exist .* creating it is turned off"):
        InvalidEventSink(switched_off).send(record, "bad")


def _letters(source: str) -> list[tuple[SourceRecord, ErrorClass, str]]:
    big = b'{"entity_type":"order","padding":"' + b"x" * 300 + b'"}'
    return [
        (SourceRecord(topic=source, partition=0, offset=5, key=b"k5", value=b"{"), ErrorClass.INVALID, "not valid JSON: truncated"),
        (SourceRecord(topic=source, partition=0, offset=9, key=b"k9", value=None, headers=(("h", b"1"),)), ErrorClass.INVALID, "value is null (a tombstone), not an event"),
        (SourceRecord(topic=source, partition=2, offset=12, key=b"k12", value=big), ErrorClass.INVALID, "missing entity_id (entity_id or entityId)"),
        (SourceRecord(topic=source, partition=1, offset=3, key=b"k3", value=b'{"entity_id":"a"}', headers=(("trace", b"abc"),)), ErrorClass.DATA, "PostgreSQL 23514: check constraint"),
    ]  # fmt: skip


def test_dlq_list_summarises_classes_offsets_and_samples(
    bootstrap: str,
    make_topic: Callable[..., str],
    admin: AdminClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = make_topic(partitions=3, prefix="dlq-list")
    missing = spr_main(["dlq", "list", "--topic", source, "--bootstrap", bootstrap])
    assert missing == 0
    assert capsys.readouterr().out.strip() == (
        f"no dead letters for '{source}': topic '{source}.dlq' does not exist"
    )
    try:
        with (
            DeadLetterWriter(bootstrap=bootstrap, group="g-one") as one,
            DeadLetterWriter(bootstrap=bootstrap) as nameless,
        ):
            for record, error_class, reason in _letters(source):
                # A letter without spr-group (written before it existed) reads as unknown.
                writer = nameless if record.offset == 3 else one
                writer.send(
                    record, error_class, reason, attempts=1 if error_class == "invalid" else 4
                )
        # A letter of another source in the same topic is not counted for this one.
        with DeadLetterWriter(bootstrap=bootstrap, dlq_topic=f"{source}.dlq") as shared:
            shared.send(
                SourceRecord(topic="another-source", partition=0, offset=1, value=b"x"),
                ErrorClass.FATAL,
                "foreign",
                attempts=1,
            )
        code = spr_main(
            ["dlq", "list", "--topic", source, "--bootstrap", bootstrap, "--samples", "3"]
        )
        out = capsys.readouterr().out
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == f"4 dead letter(s) for '{source}' in '{source}.dlq'"
        assert lines[1:4] == ["by error class:", "  invalid    3", "  data       1"]
        assert lines[4:7] == ["by consumer group:", "  g-one      3", "  unknown    1"]
        assert lines[7:11] == [
            "by source partition:",
            "  partition 0: 2, source offsets 5..9",
            "  partition 1: 1, source offsets 3..3",
            "  partition 2: 1, source offsets 12..12",
        ]
        assert lines[11] == "samples:"
        samples = "\n".join(lines[12:])
        assert len(lines[12:]) == 6  # three samples, two lines each
        assert "[0@5] invalid after 1 attempt(s): not valid JSON: truncated" in samples
        assert "value: '{'" in samples
        assert "[0@9] invalid after 1 attempt(s): value is null" in samples
        assert "value: null (tombstone)" in samples
        assert "[1@3] data after 4 attempt(s): PostgreSQL 23514" in samples
    finally:
        admin.delete_topics([f"{source}.dlq"], operation_timeout=30)


def test_redrive_reproduces_each_dead_letter_once(
    bootstrap: str,
    make_topic: Callable[..., str],
    admin: AdminClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = make_topic(partitions=3, prefix="dlq-redrive")
    dlq = f"{source}.dlq"
    letters = _letters(source)
    try:
        with DeadLetterWriter(bootstrap=bootstrap) as writer:
            for record, error_class, reason in letters:
                writer.send(record, error_class, reason, attempts=2)

        def redrive(*extra: str) -> str:
            code = spr_main(["dlq", "redrive", "--topic", source, "--bootstrap", bootstrap, *extra])
            out = capsys.readouterr().out.strip()
            assert code == 0, out
            return out

        # Only the data letter, with its own group: the others stay pending.
        assert redrive("--error-class", "data").startswith("redrove 1 dead letter(s)")
        assert redrive().startswith("redrove 4 dead letter(s)")
        assert redrive().startswith("redrove 0 dead letter(s)")  # progress was committed

        produced = read_topic(bootstrap, source, 3)
        assert len(produced) == 5  # the data letter twice: once filtered, once in the full run
        dlq_letters = read_topic(bootstrap, dlq, 3)
        for record, _, _ in letters:
            copies = [p for p in produced if p[2] == record.key]
            expected = 2 if record.key == b"k3" else 1
            assert len(copies) == expected, record
            for partition, _, key, value, headers in copies:
                assert partition == record.partition
                assert value == record.value
                origin = next(d for d in dlq_letters if d[2] == key)
                assert headers == [
                    *record.headers,
                    ("spr-redriven-from", f"{dlq}:{origin[0]}:{origin[1]}".encode()),
                ]

        # A new dead letter is redriven alone, once.
        with DeadLetterWriter(bootstrap=bootstrap) as writer:
            writer.send(
                SourceRecord(topic=source, partition=1, offset=40, key=b"k40", value=b"{}"),
                ErrorClass.INVALID,
                "missing entity_type",
                attempts=1,
            )
        assert redrive().startswith("redrove 1 dead letter(s)")
        after = read_topic(bootstrap, source, 3)
        assert len(after) == 6 and sum(1 for p in after if p[2] == b"k40") == 1
    finally:
        admin.delete_topics([dlq], operation_timeout=30)
