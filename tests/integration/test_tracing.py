"""OpenTelemetry tracing end to end (issue 17): ``spr produce --otel`` then ``spr run
--otel``, both exporting by OTLP/HTTP to a real receiver on 127.0.0.1
(:mod:`otlp_receiver`), and checks of what arrives:

* the compiled core and its twin read the same trace contexts from consumed records;
* every record on the topic carries a sampled ``traceparent`` whose trace holds the
  record's ``send <topic>`` PRODUCER span, with the messaging attributes of the record;
* an ``apply batch`` CONSUMER span links to every send span (links, not parents), with
  the link's partition and offset those of the record;
* the attribute names follow the semantic conventions, and no attribute holds a DSN;
* each flush span's time range contains its transaction: every state row's
  ``processed_at`` and every offsets row's ``updated_at`` (both ``now()`` of the flush's
  transaction) lie inside a flush span, and the spans end after the rows are visible;
* ``spr transform --otel`` continues each event's trace into its output record: a send
  span on the output topic, a child of the input's send span, in the record's headers;
* ``--otel`` without the extra installed is one sentence naming ``pip install spr[otel]``.

The test also draws the waterfall of one trace to build/tracing/trace.png.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from otlp_receiver import otlp_receiver

from spr import _core_py
from spr._impl import compiled_core
from spr.tracing import sampled_traceparent
from spr.tracing.waterfall import draw_waterfall, one_trace

EVENTS = 300
ROOT = Path(__file__).resolve().parents[2]
PICTURE = ROOT / "build" / "tracing" / "trace.png"


def _spr(
    argv: list[str], env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )


def _exporting_to(endpoint: str) -> dict[str, str]:
    """The environment of an spr command that exports every trace to ``endpoint``
    quickly, under spr's own service name."""
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    return env


def _records(bootstrap: str, topic: str, partitions: int, count: int = EVENTS) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"tracing-check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        found: list[Any] = []
        deadline = time.monotonic() + 30
        while len(found) < count and time.monotonic() < deadline:
            found += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        return found
    finally:
        consumer.close()


def _header(message: Any, name: str) -> bytes | None:
    for key, value in message.headers() or ():
        if key == name:
            return bytes(value)
    return None


def _ns(moment: Any) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000


def test_one_trace_from_send_to_commit(
    bootstrap: str,
    dsn: str,
    make_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    topic = make_topic(partitions=3, prefix="tracing")
    # Small consume() results, so that the events spread over several flushes.
    config = tmp_path / "spr.toml"
    config.write_text("consume_batch = 50\n")
    table = unique_name("tracing")
    group = unique_name("tracing-group")
    with otlp_receiver() as receiver:
        env = _exporting_to(receiver.endpoint)
        produced = _spr(
            ["produce", "--otel", "--topic", topic, "--count", str(EVENTS), "--entities", "120",
             "--bootstrap", bootstrap],
            env, 90,
        )  # fmt: skip
        assert produced.returncode == 0, produced.stderr[-2000:]
        try:
            ran = _spr(
                ["run", "--otel", "--otel-max-links", "200", "--topic", topic, "--group", group,
                 "--config", str(config),
                 "--dsn", dsn, "--bootstrap", bootstrap, "--table", table,
                 "--auto-create-schema", "--idle-exit", "2", "--batch-max-rows", "40"],
                env, 120,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stderr[-2000:]
            # The run exits after its provider exported everything; rows are visible now.
            with psycopg.connect(dsn, autocommit=True) as conn:
                states = [
                    row[0] for row in conn.execute(f'SELECT processed_at FROM "{table}"').fetchall()
                ]
                offsets = conn.execute(
                    "SELECT topic, partition, next_offset, updated_at FROM spr_offsets "
                    "WHERE group_id = %s",
                    (group,),
                ).fetchall()
                visible_ns = time.time_ns()
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                conn.execute("DELETE FROM spr_offsets WHERE group_id = %s", (group,))
        spans = receiver.wait_for(
            lambda s: (
                sum(x["name"] == f"send {topic}" for x in s) >= EVENTS
                and any(x["name"] == "apply batch" for x in s)
            ),
            timeout_s=30,
        )

    sends = {(s["trace_id"], s["span_id"]): s for s in spans if s["name"] == f"send {topic}"}
    flushes = [s for s in spans if s["name"] == "apply batch"]
    assert len(sends) == EVENTS
    assert len(flushes) >= 3

    # Every record carries a sampled traceparent whose trace has the record's send span.
    records = _records(bootstrap, topic, 3)
    assert len(records) == EVENTS
    # The compiled core reads consumed records' headers from librdkafka's own list
    # (before headers() converts it); the twin calls headers(): the same contexts.
    compiled = compiled_core()
    direct = compiled.sampled_traces(records, 10_000) if compiled is not None else None
    twin = _core_py.sampled_traces(records, 10_000)
    assert len(twin) == EVENTS
    assert direct is None or direct == twin
    for record in records:
        parent = _header(record, "traceparent")
        assert parent is not None and sampled_traceparent(parent), parent
        _, trace_id, span_id, _ = parent.decode().split("-")
        send = sends[(trace_id, span_id)]
        assert send["kind"] == "PRODUCER" and send["parent_span_id"] == ""
        assert send["service"] == "spr-produce"
        attributes = send["attributes"]
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.operation.type"] == "send"
        assert attributes["messaging.destination.name"] == topic
        assert attributes["messaging.kafka.message.key"] == record.key().decode()
        assert attributes["messaging.destination.partition.id"] == str(record.partition())
        assert attributes["messaging.kafka.offset"] == record.offset()

    # Every send span is linked from a flush span, never parented.
    linked: dict[tuple[str, str], dict[str, Any]] = {}
    for flush in flushes:
        assert flush["kind"] == "CONSUMER" and flush["parent_span_id"] == ""
        assert flush["service"] == "spr-run"
        assert len(flush["links"]) <= 200
        for link in flush["links"]:
            linked[(link["trace_id"], link["span_id"])] = link
            assert link["trace_id"] != flush["trace_id"]
    assert set(linked) == set(sends)
    for key, link in linked.items():
        send = sends[key]["attributes"]
        assert link["attributes"]["messaging.kafka.offset"] == send["messaging.kafka.offset"]
        assert (
            link["attributes"]["messaging.destination.partition.id"]
            == send["messaging.destination.partition.id"]
        )

    # Semantic-convention names, spr's counts, and no DSN anywhere.
    committed = [f for f in flushes if f["attributes"]["spr.outcome"] == "committed"]
    assert committed == flushes
    for flush in flushes:
        attributes = flush["attributes"]
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.consumer.group.name"] == group
        assert attributes["messaging.destination.name"] == topic
        assert attributes["db.system"] == "postgresql"
        assert attributes["db.system.name"] == "postgresql"
        assert attributes["db.operation.name"] == "INSERT"
        assert attributes["db.namespace"] == psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        assert attributes["db.collection.name"] == table
        assert attributes["messaging.batch.message_count"] >= 1
        assert attributes["spr.batch.partitions"]
        assert (
            attributes["spr.rows.applied"] + attributes["spr.rows.stale"]
            == (attributes["spr.batch.rows"])
        )
        assert "spr.events.duplicate" in attributes
    assert sum(f["attributes"]["messaging.batch.message_count"] for f in flushes) >= EVENTS
    assert sum(f["attributes"]["spr.rows.applied"] for f in flushes) >= len(states)
    for span in spans:
        for value in span["attributes"].values():
            assert "postgresql://" not in str(value) and "@127.0.0.1" not in str(value)

    # The flush spans' time ranges contain their transactions.
    def inside(moment_ns: int, flush: dict[str, Any]) -> bool:
        return flush["start_ns"] <= moment_ns <= flush["end_ns"]

    assert states
    for processed_at in states:
        assert any(inside(_ns(processed_at), f) for f in flushes), processed_at
    assert len(offsets) == 3
    for topic_name, partition, _, updated_at in offsets:
        holders = [
            f
            for f in flushes
            if f"{topic_name}/{partition}" in f["attributes"]["spr.batch.partitions"]
        ]
        assert any(inside(_ns(updated_at), f) for f in holders), (partition, updated_at)
    assert all(f["end_ns"] <= visible_ns for f in flushes)

    # One trace, drawn: the first record's send span and the flush span linked to it.
    first = sorted(sends.values(), key=lambda s: s["start_ns"])[0]
    picture = one_trace(spans, first["trace_id"])
    assert [s["name"] for s in picture] == [f"send {topic}", "apply batch"]
    draw_waterfall(picture, PICTURE, title=f"one event: send to commit ({topic})")
    assert PICTURE.stat().st_size > 0


_BLOCK_OTEL = """
import sys

class _NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOpenTelemetry())
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--otel", "--topic", "t", "--group", "g", "--bootstrap", "127.0.0.1:1"],
        ["produce", "--otel", "--topic", "t", "--count", "1", "--bootstrap", "127.0.0.1:1"],
        [
            "transform",
            "--otel",
            "--topic",
            "t",
            "--group",
            "g",
            "--output-topic",
            "o",
            "--bootstrap",
            "127.0.0.1:1",
        ],
    ],
    ids=["run", "produce", "transform"],
)
def test_otel_without_the_extra_is_one_sentence(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_OTEL)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = _spr(argv, env, 30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"spr {argv[0]}: ") and "pip install spr[otel]" in lines[0]


def test_without_otel_nothing_of_opentelemetry_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys, spr, spr.engine, spr.producer, spr.transform, spr.cli.run, "
        "spr.cli.produce, spr.cli.transform; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_transform_continues_the_trace_into_its_output(
    bootstrap: str, make_topic: Callable[..., str], admin: Any
) -> None:
    source = make_topic(partitions=2, prefix="tracing-src")
    output = f"{source}.out"
    events = 40
    with otlp_receiver() as receiver:
        env = _exporting_to(receiver.endpoint)
        try:
            produced = _spr(
                ["produce", "--otel", "--topic", source, "--count", str(events),
                 "--bootstrap", bootstrap],
                env, 90,
            )  # fmt: skip
            assert produced.returncode == 0, produced.stderr[-2000:]
            moved = _spr(
                ["transform", "--otel", "--topic", source, "--group", f"{source}-g",
                 "--output-topic", output, "--output-partitions", "2", "--no-dlq",
                 "--bootstrap", bootstrap, "--idle-exit", "2"],
                env, 120,
            )  # fmt: skip
            assert moved.returncode == 0, moved.stderr[-2000:]
            records = _records(bootstrap, output, 2, events)
        finally:
            futures = admin.delete_topics([output])
            for future in futures.values():
                with contextlib.suppress(Exception):
                    future.result(timeout=30)
        spans = receiver.wait_for(
            lambda s: sum(x["name"] == f"send {output}" for x in s) >= events, timeout_s=30
        )
    sends = {s["span_id"]: s for s in spans if s["name"] == f"send {source}"}
    onward = {s["span_id"]: s for s in spans if s["name"] == f"send {output}"}
    assert len(sends) == events and len(onward) == events
    assert len(records) == events
    for record in records:
        parent = _header(record, "traceparent")
        assert parent is not None and sampled_traceparent(parent)
        _, trace_id, span_id, _ = parent.decode().split("-")
        span = onward[span_id]
        assert span["trace_id"] == trace_id and span["service"] == "spr-transform"
        assert span["kind"] == "PRODUCER"
        # A child of the input event's send span: the same trace, one hop further.
        origin = sends[span["parent_span_id"]]
        assert origin["trace_id"] == trace_id
        attributes = span["attributes"]
        assert attributes["messaging.destination.name"] == output
        assert attributes["messaging.destination.partition.id"] == str(record.partition())
        assert attributes["spr.source.offset"] == origin["attributes"]["messaging.kafka.offset"]
        assert attributes["spr.source.topic"] == source
