"""``spr lag`` against the real broker: lag per partition, retention fraction, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Producer

from spr.kafka.admin import KafkaAdmin

RETENTION_MS = 3_600_000
AGE_MS = 1_800_000  # the oldest unread message is half the retention window old


def _spr(*args: str, bootstrap: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "SPR_BOOTSTRAP": bootstrap}, check=False,
    )  # fmt: skip


def test_lag_reports_messages_and_retention_and_gates_scripts(
    bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(partitions=2, prefix="lag", config={"retention.ms": str(RETENTION_MS)})
    producer = Producer({"bootstrap.servers": bootstrap})
    base = int(time.time() * 1000) - AGE_MS
    for partition in (0, 1):
        for i in range(50):
            producer.produce(topic, b"{}", partition=partition, timestamp=base + i * 1000)
    assert producer.flush(30) == 0
    group = f"lag-{uuid.uuid4().hex[:8]}"
    # The engine commits to Kafka after each database transaction; do the same by hand:
    # partition 0 is read up to offset 10, partition 1 was never read.
    KafkaAdmin.for_bootstrap(bootstrap).commit_group_offsets(group, {(topic, 0): 10})

    out = _spr("lag", "--group", group, "--topic", topic, "--json", bootstrap=bootstrap)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {p["partition"]: p for p in report["partitions"]}
    assert rows[0]["committed"] == 10 and rows[0]["end"] == 50 and rows[0]["lag"] == 40
    assert rows[1]["committed"] is None and rows[1]["lag"] == 50
    assert report["total_lag"] == 90
    assert rows[0]["retention_s"] == RETENTION_MS / 1000
    # Age of offset 10 (written at base + 10 s) and of offset 0, over one hour.
    assert abs(rows[0]["retention_fraction"] - (AGE_MS - 10_000) / RETENTION_MS) < 0.01
    assert abs(rows[1]["retention_fraction"] - AGE_MS / RETENTION_MS) < 0.01
    assert report["violations"] == []

    # Thresholds make it fail with exit 1 and say why; the default group lookup works.
    out = _spr("lag", "--group", group, "--max-lag", "45", bootstrap=bootstrap)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"over threshold: {topic}[1]: lag 50 > 45" in out.stdout
    assert f"{topic}[0]" not in out.stdout  # partition 0 (lag 40) is within the threshold
    out = _spr(
        "lag", "--group", group, "--topic", topic, "--max-retention-fraction", "0.4",
        bootstrap=bootstrap,
    )  # fmt: skip
    assert out.returncode == 1
    assert "of the retention window > 40%" in out.stdout
    out = _spr(
        "lag", "--group", group, "--topic", topic, "--max-lag", "50",
        "--max-retention-fraction", "0.6", bootstrap=bootstrap,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout


def test_lag_errors_are_one_sentence(bootstrap: str) -> None:
    group = f"lag-{uuid.uuid4().hex[:8]}"
    out = _spr("lag", "--group", group, bootstrap=bootstrap)
    assert out.returncode == 2
    assert (
        out.stderr == f"spr lag: group {group} has no committed offsets in Kafka; name a --topic\n"
    )
    out = _spr("lag", "--group", group, "--topic", "no-such-topic-x", bootstrap=bootstrap)
    assert out.returncode == 2
    assert out.stderr == f"spr lag: topic no-such-topic-x does not exist on {bootstrap}\n"
