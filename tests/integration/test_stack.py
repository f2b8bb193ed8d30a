"""The local stack is real: Apache Kafka answers, PostgreSQL stores, and spr sees both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import psycopg
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from spr.dev.stack import DevStack


def test_status_json_reports_both_servers_running(stack: DevStack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spr", "dev", "status", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["kafka"]["running"] is True
    assert status["postgres"]["running"] is True
    assert status["kafka"]["bootstrap"] == stack.bootstrap
    assert status["postgres"]["dsn"] == stack.dsn


def test_up_is_idempotent(stack: DevStack) -> None:
    pid_before = stack.kafka_pid()
    stack.up()
    assert stack.kafka_pid() == pid_before


def test_broker_is_apache_kafka_in_kraft_mode(admin: AdminClient, stack: DevStack) -> None:
    cluster = admin.describe_cluster(request_timeout=10).result(timeout=10)
    assert len(cluster.nodes) == 1
    (node,) = cluster.nodes
    # KRaft, as the broker itself reports it: it is its own controller, in a quorum of
    # controllers, and there is no ZooKeeper.
    resource = ConfigResource(ResourceType.BROKER, str(node.id))
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert set(config["process.roles"].value.split(",")) == {"broker", "controller"}
    assert config["controller.quorum.voters"].value.startswith(f"{node.id}@")
    assert "zookeeper.connect" not in config or config["zookeeper.connect"].value is None
    assert cluster.controller is not None and cluster.controller.id == node.id
    # The cluster metadata lives in the KRaft metadata log, not in ZooKeeper.
    metadata_log = stack.nodes[0].data / "__cluster_metadata-0"
    assert any(metadata_log.glob("*.log"))


def test_produce_and_consume_back_across_partitions(
    bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(partitions=4)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    sent = {}
    for i in range(200):
        value = f"value-{i}".encode()
        producer.produce(topic, key=f"key-{i}".encode(), value=value, partition=i % 4)
        sent[value] = i % 4
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"g-{topic}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })  # fmt: skip
    consumer.subscribe([topic])
    received: dict[bytes, int] = {}
    deadline = time.monotonic() + 60
    try:
        while len(received) < len(sent) and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=1.0):
                assert msg.error() is None, msg.error()
                received[msg.value()] = msg.partition()
    finally:
        consumer.close()
    assert received == sent


def test_postgres_write_and_read_a_row(pg: psycopg.Connection[tuple[object, ...]]) -> None:
    with pg.transaction():
        pg.execute("CREATE TEMP TABLE roundtrip (k text primary key, v jsonb)")
        pg.execute("INSERT INTO roundtrip VALUES (%s, %s::jsonb)", ("a", '{"x": 1}'))
        row = pg.execute("SELECT k, v FROM roundtrip").fetchone()
    assert row == ("a", {"x": 1})
    version = pg.execute("SHOW server_version_num").fetchone()
    assert version is not None and int(str(version[0])) >= 150000
