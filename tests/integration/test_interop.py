"""Every Kafka client must put an entity's key on the same partition (design §3).

For 10,000 random entity keys these must agree: ``spr.routing.partition_for``; the
partition where the broker stored the message that ``spr.Producer`` sent; the official
Java client's default partitioner (``tests/interop/PartitionOf.java``, compiled with
``javac`` against the stack's kafka-clients jar); kafkajs 2.x's default partitioner
(``tests/interop/partition_of.js``, installed from npm with ``npm ci``); and
``confluent_kafka.murmur2``. Negative controls show that the test can fail: librdkafka's
default partitioner (CRC32, ``consistent_random``) and kafkajs' LegacyPartitioner put
most keys elsewhere.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from spr.dev.stack import kafka_libs
from spr.producer import Producer
from spr.routing import partition_for, partition_key

INTEROP = Path(__file__).resolve().parents[1] / "interop"
KEY_COUNT = 10_000
PARTITIONS = 12
SUBPROCESS_TIMEOUT_S = 120

Partitioner = Callable[[Sequence[str], int], list[int]]
MakeTopic = Callable[..., str]


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"'{name}' is needed by the interop tests and is not installed"
    return path


def _run_lines(command: list[str], keys: Sequence[str], cwd: Path) -> list[int]:
    out = subprocess.run(
        command, input="\n".join(keys) + "\n", capture_output=True, text=True, cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"{command[0]} failed: {out.stderr[-2000:]}"
    partitions = [int(line) for line in out.stdout.split()]
    assert len(partitions) == len(keys)
    return partitions


@pytest.fixture(scope="module")
def entity_keys() -> list[tuple[str, str]]:
    """10,000 distinct (entity_type, entity_id) pairs of many shapes, from a fixed seed."""
    rng = random.Random(20_240_611)
    types = ["order", "payment", "shipment", "customer", "café", "订单", "a-b_c.d", "x"]
    shapes: list[Callable[[], str]] = [
        lambda: str(rng.randrange(10**12)),
        lambda: str(uuid.UUID(int=rng.getrandbits(128))),
        lambda: "".join(
            rng.choice("abcxyzÄÖü:/-_ 0123456789") for _ in range(rng.randrange(1, 40))
        ),
        lambda: f"{rng.randrange(1000)}:{rng.randrange(1000)}",
    ]
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < KEY_COUNT:
        pairs.add((rng.choice(types), rng.choice(shapes)()))
    return sorted(pairs)


@pytest.fixture(scope="module")
def message_keys(entity_keys: list[tuple[str, str]]) -> list[str]:
    """The Kafka message key (partition key) of every entity."""
    return [partition_key(f"{entity_type}:{entity_id}") for entity_type, entity_id in entity_keys]


@pytest.fixture(scope="session")
def java_partitioner(tmp_path_factory: pytest.TempPathFactory) -> Partitioner:
    """The Java producer's default partitioner, via PartitionOf.java and kafka-clients."""
    javac, java = _tool("javac"), _tool("java")
    libs = kafka_libs()
    jars = [*libs.glob("kafka-clients-*.jar"), *libs.glob("slf4j-api-*.jar")]
    assert len(jars) == 2, f"kafka-clients and slf4j-api jars not found in {libs}"
    classes = tmp_path_factory.mktemp("java-interop")
    classpath = ":".join(str(j) for j in jars)
    out = subprocess.run(
        [javac, "-d", str(classes), "-cp", classpath, str(INTEROP / "PartitionOf.java")],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"javac failed: {out.stderr}"
    run_classpath = f"{classpath}:{classes}"

    def partitions(keys: Sequence[str], num_partitions: int) -> list[int]:
        command = [java, "-cp", run_classpath, "PartitionOf", str(num_partitions)]
        return _run_lines(command, keys, classes)

    return partitions


@pytest.fixture(scope="session")
def kafkajs_partitioner() -> Callable[..., list[int]]:
    """kafkajs 2.x's partitioners, via partition_of.js; installs kafkajs when missing."""
    node = _tool("node")
    if not (INTEROP / "node_modules" / "kafkajs" / "package.json").exists():
        out = subprocess.run(
            [_tool("npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=INTEROP, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert out.returncode == 0, f"npm ci failed: {out.stderr[-2000:]}"

    def partitions(keys: Sequence[str], num_partitions: int, *, legacy: bool = False) -> list[int]:
        command = [node, "partition_of.js", str(num_partitions)]
        if legacy:
            command.append("--legacy")
        return _run_lines(command, keys, INTEROP)

    return partitions


def _read_placement(bootstrap: str, topic: str, expected: int) -> dict[bytes, int]:
    """key -> partition of every message the broker stored in ``topic``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"spr-interop-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    placement: dict[bytes, int] = {}
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + 60
        received = 0
        while received < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                assert message.error() is None, message.error()
                placement[message.key()] = message.partition()
                received += 1
    finally:
        consumer.close()
    assert received == expected, f"read {received} of {expected} messages back"
    return placement


def _mismatches(name: str, got: Sequence[int], want: Sequence[int], keys: Sequence[str]) -> str:
    bad = [(k, g, w) for k, g, w in zip(keys, got, want, strict=True) if g != w]
    return f"{name}: {len(bad)} of {len(keys)} keys disagree with spr, e.g. {bad[:3]}"


def test_every_client_agrees_with_spr_and_the_broker(
    bootstrap: str,
    make_topic: MakeTopic,
    entity_keys: list[tuple[str, str]],
    message_keys: list[str],
    java_partitioner: Partitioner,
    kafkajs_partitioner: Callable[..., list[int]],
) -> None:
    spr_partitions = [partition_for(key, PARTITIONS) for key in message_keys]
    # The keys must exercise every partition, or agreement would prove little.
    assert set(spr_partitions) == set(range(PARTITIONS))

    topic = make_topic(partitions=PARTITIONS, prefix="interop")
    with Producer(bootstrap=bootstrap, topic=topic) as producer:
        for (entity_type, entity_id), sequence in zip(entity_keys, range(KEY_COUNT), strict=True):
            producer.send(
                {
                    "entity_type": entity_type,
                    "entity_id": entity_id,
                    "sequence": sequence,
                    "state": "created",
                }
            )
    assert (producer.records, producer.errors) == (KEY_COUNT, 0)
    placement = _read_placement(bootstrap, topic, KEY_COUNT)
    assert len(placement) == KEY_COUNT

    clients = {
        "broker placement of spr.Producer": [placement[k.encode()] for k in message_keys],
        "confluent_kafka.murmur2": [
            confluent_kafka.murmur2(k.encode(), PARTITIONS) for k in message_keys
        ],
        "Java kafka-clients default partitioner": java_partitioner(message_keys, PARTITIONS),
        "kafkajs 2.x DefaultPartitioner": kafkajs_partitioner(message_keys, PARTITIONS),
    }
    for name, partitions in clients.items():
        assert partitions == spr_partitions, _mismatches(
            name, partitions, spr_partitions, message_keys
        )


@pytest.mark.parametrize("num_partitions", [1, 7, 100])
def test_clients_agree_for_other_partition_counts(
    num_partitions: int,
    message_keys: list[str],
    java_partitioner: Partitioner,
    kafkajs_partitioner: Callable[..., list[int]],
) -> None:
    keys = message_keys[:2_000]
    want = [partition_for(key, num_partitions) for key in keys]
    assert [confluent_kafka.murmur2(k.encode(), num_partitions) for k in keys] == want
    assert java_partitioner(keys, num_partitions) == want
    assert kafkajs_partitioner(keys, num_partitions) == want


def test_negative_control_librdkafka_default_partitioner_disagrees(
    bootstrap: str, make_topic: MakeTopic, message_keys: list[str]
) -> None:
    """A plain confluent-kafka producer (CRC32 ``consistent_random``) breaks the routing.

    The broker's placement matches the CRC32 prediction exactly, and most keys land on a
    partition other than the one every murmur2 client would pick.
    """
    keys = message_keys[:3_000]
    topic = make_topic(partitions=PARTITIONS, prefix="interop-crc32")
    plain = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key in keys:
        plain.produce(topic, b"{}", key)
    assert plain.flush(30) == 0
    placement = _read_placement(bootstrap, topic, len(keys))

    stored = [placement[k.encode()] for k in keys]
    assert stored == [zlib.crc32(k.encode()) % PARTITIONS for k in keys]
    disagree = sum(s != partition_for(k, PARTITIONS) for s, k in zip(stored, keys, strict=True))
    assert disagree >= 0.5 * len(keys), f"only {disagree} of {len(keys)} keys moved"


def test_negative_control_kafkajs_legacy_partitioner_disagrees(
    message_keys: list[str], kafkajs_partitioner: Callable[..., list[int]]
) -> None:
    legacy = kafkajs_partitioner(message_keys, PARTITIONS, legacy=True)
    disagree = sum(
        p != partition_for(k, PARTITIONS) for p, k in zip(legacy, message_keys, strict=True)
    )
    assert disagree >= 0.5 * len(message_keys), f"only {disagree} keys moved"
