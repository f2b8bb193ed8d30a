"""spr.Producer and ``spr produce`` against the real broker.

Every message is read back from Kafka: keys, headers, partitions, order and the
load generator's manifest are checked on what the broker stored, not on what was sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from spr.decode import decode_event
from spr.dev.loadgen import LoadSpec, produce
from spr.errors import ConfigError, ProducerError, ServerUnavailable
from spr.producer import Producer
from spr.routing import partition_for, partition_key

MakeTopic = Callable[..., str]


def consume_all(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0
) -> list[Message]:
    """Read ``expected`` messages of ``topic`` from the beginning of every partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"spr-test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                assert message.error() is None, message.error()
                messages.append(message)
        # Nothing beyond what was produced: a short extra poll must stay empty.
        extra = consumer.consume(100, 0.5)
        assert not [m for m in extra if m.error() is None]
        return messages
    finally:
        consumer.close()


def headers_of(message: Message) -> dict[str, bytes]:
    return dict(message.headers() or [])


def test_key_headers_and_partition_follow_the_routing_contract(
    bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(partitions=6, prefix="producer-contract")
    raw = b'{"id":"e-1","type":"order","entityId":"42","seq":3,"status":"paid"}'
    as_event = decode_event(raw, offset=0, timestamp_ms=1)
    as_mapping = {
        "event_id": "e-2",
        "entity_type": "payment",
        "entity_id": "p-7",
        "sequence": 11,
        "state": "captured",
        "timestamp_ms": 1_700_000_000_000,
        "payload": {"amount": 12.5},
    }
    with Producer(bootstrap=bootstrap, topic=topic) as producer:
        producer.send(as_event)
        producer.send(as_mapping)
        producer.send_raw(b'{"x":1}', entity_type="shipment", entity_id="s:1", sequence=0)
    assert (producer.sent, producer.records, producer.errors) == (3, 3, 0)

    by_key = {m.key(): m for m in consume_all(bootstrap, topic, 3)}
    expected = {
        ("order", "42", 3): raw,
        ("payment", "p-7", 11): None,
        ("shipment", "s:1", 0): b'{"x":1}',
    }
    assert len(by_key) == 3
    for (entity_type, entity_id, sequence), value in expected.items():
        key = partition_key(f"{entity_type}:{entity_id}")
        message = by_key[key.encode()]
        assert message.partition() == partition_for(key, 6)
        assert message.headers() == [
            ("idempotency-key", f"{entity_type}:{entity_id}:{sequence}".encode()),
            ("schema-version", b"v2"),
        ]
        if value is not None:
            assert message.value() == value
    mapped = decode_event(
        by_key[partition_key("payment:p-7").encode()].value(), offset=0, timestamp_ms=0
    )
    assert (mapped.event_id, mapped.sequence, mapped.state) == ("e-2", 11, "captured")
    assert mapped.timestamp_ms == 1_700_000_000_000
    assert json.loads(mapped.payload)["payload"] == {"amount": 12.5}


def _stats_after_send(producer: Producer, stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The first librdkafka statistics sample taken after a message was acknowledged."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        producer.poll(0.1)
        for sample in stats:
            if sample.get("txmsgs", 0) >= 1:
                return sample
    raise AssertionError("librdkafka sent no statistics within 10 s")


def _init_producer_id_requests(sample: dict[str, Any]) -> int:
    return sum(b["req"].get("InitProducerId", 0) for b in sample["brokers"].values())


def test_idempotence_is_live_and_overrides_win(bootstrap: str, make_topic: MakeTopic) -> None:
    """The broker hands spr's producer a producer id; turning idempotence off removes it."""
    topic = make_topic(partitions=3, prefix="producer-idem")
    samples = {}
    for label, overrides in (("spr", {}), ("override", {"enable.idempotence": False})):
        stats: list[dict[str, Any]] = []
        config = {
            "statistics.interval.ms": 100,
            "stats_cb": lambda s, stats=stats: stats.append(json.loads(s)),
            **overrides,
        }
        with Producer(bootstrap=bootstrap, topic=topic, config=config) as producer:
            producer.send({"entity_type": "o", "entity_id": "1", "sequence": 1, "state": "s"})
            producer.flush(10)
            samples[label] = _stats_after_send(producer, stats)
    eos = samples["spr"]["eos"]
    assert eos["idemp_state"] == "Assigned"
    assert eos["producer_id"] >= 0
    assert _init_producer_id_requests(samples["spr"]) >= 1
    assert "eos" not in samples["override"]
    assert _init_producer_id_requests(samples["override"]) == 0


def test_delivery_failures_are_counted_and_raised_once(
    bootstrap: str, make_topic: MakeTopic
) -> None:
    topic = make_topic(partitions=1, prefix="producer-fail", config={"max.message.bytes": "2048"})
    producer = Producer(bootstrap=bootstrap, topic=topic)
    for sequence in range(1, 6):
        producer.send({"entity_type": "o", "entity_id": "1", "sequence": sequence, "state": "s"})
    producer.flush(10)
    assert (producer.records, producer.errors) == (5, 0)

    # Random hex does not compress, so the broker sees a batch far above 2 KB.
    big = {"entity_type": "o", "entity_id": "2", "sequence": 1, "state": "s",
           "payload": {"blob": os.urandom(20_000).hex()}}  # fmt: skip
    producer.send(big)
    with pytest.raises(ProducerError) as raised:
        producer.flush(30)
    assert raised.value.failed == 1
    assert "too large" in raised.value.first_error.lower(), raised.value.first_error
    assert "could not be delivered" in str(raised.value)
    assert (producer.records, producer.errors) == (5, 1)
    producer.flush(10)  # already reported: no second exception

    # A message librdkafka refuses locally raises at once and is counted too.
    with pytest.raises(ProducerError, match="rejected"):
        producer.send_raw(b"x" * 2_000_000, entity_type="o", entity_id="3", sequence=1)
    assert producer.errors == 2
    producer.close()
    assert len(consume_all(bootstrap, topic, 5)) == 5


def test_full_local_queue_blocks_instead_of_dropping(bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(partitions=2, prefix="producer-queue")
    events = [
        {"entity_type": "o", "entity_id": str(i % 17), "sequence": i, "state": "s"}
        for i in range(3_000)
    ]
    config = {"queue.buffering.max.messages": 10}
    with Producer(bootstrap=bootstrap, topic=topic, config=config) as producer:
        assert producer.send_many(events) == 3_000
    assert (producer.records, producer.errors) == (3_000, 0)
    assert len(consume_all(bootstrap, topic, 3_000)) == 3_000


def test_send_many_keeps_every_entity_in_order(bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(partitions=4, prefix="producer-order")
    entities = [f"e{i}" for i in range(8)]
    events = [
        {"entity_type": "order", "entity_id": entity, "sequence": sequence, "state": "s"}
        for sequence in range(1, 251)
        for entity in entities
    ]
    with Producer(bootstrap=bootstrap, topic=topic) as producer:
        producer.send_many(events)
    messages = consume_all(bootstrap, topic, len(events))
    sequences: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        event = decode_event(message.value(), offset=message.offset(), timestamp_ms=0)
        sequences[event.entity_id].append(event.sequence)
        partitions[event.entity_id].add(message.partition())
    assert set(sequences) == set(entities)
    for entity in entities:
        assert sequences[entity] == list(range(1, 251)), entity
        assert partitions[entity] == {partition_for(partition_key(f"order:{entity}"), 4)}


def _spr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_spr_produce_creates_the_topic_and_its_manifest_matches_the_topic(
    bootstrap: str, admin: AdminClient, tmp_path: Path
) -> None:
    topic = f"produce-cli-{uuid.uuid4().hex[:10]}"
    manifest_path = tmp_path / "manifest.json"
    try:
        out = _spr(
            "produce", "--topic", topic, "--bootstrap", bootstrap, "--count", "3000",
            "--entities", "200", "--seed", "4", "--partitions", "5", "--duplicates", "0.05",
            "--stale", "0.05", "--aliases", "0.3", "--manifest", str(manifest_path), "--json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["topic_created"] is True
        assert report["partitions"] == 5
        assert (report["events"], report["records"], report["errors"]) == (3000, 3000, 0)
        assert report["duplicates"] > 0 and report["stale"] > 0 and report["aliases"] > 0
        assert report["new"] + report["duplicates"] + report["stale"] == 3000
        md = admin.list_topics(topic, timeout=10).topics[topic]
        assert len(md.partitions) == 5

        messages = consume_all(bootstrap, topic, 3000)
        assert len(messages) == 3000
        newest: dict[str, dict[str, Any]] = {}
        values = set()
        for message in messages:
            event = decode_event(message.value(), offset=message.offset(), timestamp_ms=0)
            routing_key = f"{event.entity_type}:{event.entity_id}"
            assert message.key() == partition_key(routing_key).encode()
            assert message.partition() == partition_for(message.key(), 5)
            idempotency = headers_of(message)["idempotency-key"].decode()
            assert idempotency == f"{routing_key}:{event.sequence}"
            values.add(message.value())
            if event.sequence > newest.get(routing_key, {"sequence": -1})["sequence"]:
                newest[routing_key] = {
                    "sequence": event.sequence,
                    "state": event.state,
                    "event_id": event.event_id,
                }
        assert len(values) == 3000 - report["duplicates"]
        manifest = json.loads(manifest_path.read_text())
        assert manifest["topic"] == topic
        assert manifest["entities"] == newest
    finally:
        for future in admin.delete_topics([topic], operation_timeout=30).values():
            # Cleanup must not hide the test's own result.
            with contextlib.suppress(Exception):
                future.result(timeout=30)


def test_missing_broker_is_one_sentence_and_quick() -> None:
    started = time.monotonic()
    out = _spr("produce", "--topic", "t", "--count", "10", "--bootstrap", "127.0.0.1:1")
    elapsed = time.monotonic() - started
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "not reachable at 127.0.0.1:1" in lines[0]
    assert elapsed < 15

    started = time.monotonic()
    with pytest.raises(ServerUnavailable):
        Producer(bootstrap="127.0.0.1:1", metadata_timeout_s=5)
    assert time.monotonic() - started < 6


def test_missing_topic_is_a_config_error(bootstrap: str) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Producer(bootstrap=bootstrap, topic=f"missing-{uuid.uuid4().hex[:8]}")


def test_produce_library_call_honours_the_rate(bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(partitions=2, prefix="produce-rate")
    report = produce(LoadSpec(count=600, entities=20, seed=1), topic=topic,
                     bootstrap=bootstrap, rate=1_500)  # fmt: skip
    assert (report.events, report.records, report.errors) == (600, 600, 0)
    assert report.topic_created is False
    # 600 events at 1,500/s cannot take less than 0.4 s.
    assert report.elapsed_s >= 0.38
    assert report.events_per_s <= 1_500 * 1.05
