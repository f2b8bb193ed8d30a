"""Tracing's pure pieces (issue 17): the ``traceparent`` reader and its sampled flag, the
per-batch link collector and its cap, the engine's intake reading no header while
tracing is off, and the spans :class:`spr.tracing.otel.BatchTracer` and
:class:`~spr.tracing.otel.SendTracer` make (with the SDK's in-memory exporter)."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from spr import _core_py
from spr._impl import compiled_core
from spr.config import BatchPolicy
from spr.decode import DEFAULT_LIMITS
from spr.dedup import IdempotencyRing
from spr.engine.intake import Intake
from spr.errors import ConfigError
from spr.routing import partition_key
from spr.tracing import TraceLink, TraceLinks, TracingOptions, sampled_traceparent

compiled = compiled_core() or _core_py
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def parent(flags: str = "01", trace: str = TRACE, span: str = SPAN, version: str = "00") -> bytes:
    return f"{version}-{trace}-{span}-{flags}".encode()


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (parent("01"), True),
        (parent("03"), True),  # other flag bits do not matter
        (parent("00"), False),
        (parent("02"), False),
        (parent("01").decode(), True),  # str as well as bytes
        (None, False),
        (b"", False),
        (parent("01")[:-1], False),  # too short
        (parent("01") + b"-extra", False),  # version 00 has exactly four fields
        (parent("01", version="01") + b"-future", True),  # later versions may add fields
        (parent("01", version="ff"), False),  # version ff is invalid
        (parent("01", trace="0" * 32), False),  # all-zero trace id
        (parent("01", span="0" * 16), False),  # all-zero span id
        (parent("01", trace="X" * 32), False),  # not hex
        (parent("01", trace=TRACE.upper()), False),  # hex must be lower case
        (parent("0g"), False),
        (parent("01").replace(b"-", b"_"), False),
    ],
)
def test_sampled_traceparent(value: Any, sampled: bool, core: ModuleType) -> None:
    assert sampled_traceparent(value) is sampled
    assert core.traceparent_sampled(value) is sampled


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef0Ag", min_size=size, max_size=size)


_TRACEPARENTS = st.builds(
    lambda v, t, s, f, tail: f"{v}-{t}-{s}-{f}{tail}",
    _hex(2) | st.sampled_from(["00", "ff", "01"]),
    _hex(32) | st.just("0" * 32),
    _hex(16) | st.just("0" * 16),
    _hex(2),
    st.sampled_from(["", "-x", "x", "-"]),
)


@given(_TRACEPARENTS | st.binary(min_size=50, max_size=60))
def test_both_cores_agree_on_any_traceparent(value: bytes | str) -> None:
    assert compiled.traceparent_sampled(value) is _core_py.traceparent_sampled(value)


def test_sampled_traces_of_real_messages_in_both_cores(core: ModuleType) -> None:
    from confluent_kafka import Message as KafkaMessage

    def record(offset: int, headers: Any) -> Any:
        return KafkaMessage(topic="orders", partition=1, offset=offset, headers=headers)

    messages = [
        record(0, [("traceparent", parent("01")), ("traceparent", parent("00"))]),  # last wins
        record(1, [("traceparent", parent("00")), ("traceparent", parent("01"))]),
        record(2, None),
        record(3, [("tracestate", b"a=1"), ("traceparent", parent("01").decode())]),
        record(4, [("traceparent", None)]),
        record(5, [("traceparent", parent("01")), ("tracestate", b"")]),
        record(6, [("traceparent", parent("01"))]),
    ]
    expected = [
        (parent("01"), None, "orders", 1, 1),
        (parent("01"), b"a=1", "orders", 1, 3),
        (parent("01"), None, "orders", 1, 5),
    ]
    assert core.sampled_traces(messages, 3) == expected
    assert core.sampled_traces(messages, 100) == [*expected, (parent("01"), None, "orders", 1, 6)]
    assert core.sampled_traces(messages, 0) == []


class Message:
    """The parts of confluent_kafka.Message that the link collector and the core read;
    counts ``headers()`` calls."""

    header_calls = 0

    def __init__(self, offset: int, headers: list[tuple[str, bytes]] | None, value: bytes = b"",
                 key: bytes = b"") -> None:  # fmt: skip
        self._offset, self._headers, self._value, self._key = offset, headers, value, key

    def headers(self) -> list[tuple[str, bytes]] | None:
        Message.header_calls += 1
        return self._headers

    def topic(self) -> str:
        return "orders"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


def test_links_keep_only_sampled_events_with_where_they_were() -> None:
    links = TraceLinks(cap=10)
    links.collect(
        [
            Message(0, [("traceparent", parent("01")), ("tracestate", b"vendor=1")]),
            Message(1, [("traceparent", parent("00"))]),
            Message(2, None),
            Message(3, [("idempotency-key", b"a:b:1")]),
            Message(4, [("traceparent", b"garbage")]),
            Message(5, [("traceparent", parent("01", span="1" * 16))]),
        ]
    )
    assert links.take() == [
        TraceLink(parent("01").decode(), "vendor=1", "orders", 2, 0),
        TraceLink(parent("01", span="1" * 16).decode(), None, "orders", 2, 5),
    ]
    assert links.take() == []


def test_links_stop_reading_headers_at_the_cap() -> None:
    links = TraceLinks(cap=3)
    messages = [Message(i, [("traceparent", parent("01"))]) for i in range(100)]
    Message.header_calls = 0
    links.collect(messages)
    assert len(links.links) == 3 and links.full
    assert Message.header_calls == 3
    links.collect(messages)  # a full batch reads nothing more
    assert Message.header_calls == 3
    assert len(links.take()) == 3 and not links.full


def test_tracing_options_are_checked() -> None:
    assert TracingOptions().max_links == 128
    assert TracingOptions(max_links=0).max_links == 0
    with pytest.raises(ConfigError, match="--otel-max-links must be 0 or more"):
        TracingOptions(max_links=-1)
    with pytest.raises(ConfigError, match="whole number"):
        TracingOptions(max_links=True)


def _event(entity: str, sequence: int) -> Message:
    value = json.dumps(
        {"entity_type": "order", "entity_id": entity, "sequence": sequence, "state": "paid"}
    ).encode()
    return Message(
        sequence, [("traceparent", parent("01"))], value, partition_key(f"order:{entity}").encode()
    )


def _intake() -> Intake:
    return Intake(BatchPolicy(), IdempotencyRing(1024, 60_000), DEFAULT_LIMITS)


def test_intake_reads_no_header_while_tracing_is_off() -> None:
    intake = _intake()
    Message.header_calls = 0
    intake.ingest([_event(str(i), i) for i in range(50)], 1.0, {("orders", 2)})
    assert intake.batch.row_count == 50
    assert Message.header_calls == 0
    assert intake.take().links is None


def test_intake_hands_the_links_off_with_the_batch_and_drops_them_with_it() -> None:
    intake = _intake()
    intake.trace_links = TraceLinks(cap=8)
    intake.ingest([_event(str(i), i) for i in range(20)], 1.0, {("orders", 2)})
    pending = intake.take()
    assert pending.links is not None and len(pending.links) == 8
    assert pending.messages == 20
    intake.ingest([_event("x", 1)], 2.0, {("orders", 2)})
    intake.drop()
    assert intake.take().links == []


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_the_flush_span_links_to_the_events_and_names_things_by_the_conventions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace

    from spr.tracing import otel

    provider, exporter = _provider()
    monkeypatch.setattr(otel, "_tracer", lambda: provider.get_tracer("spr"))
    tracer = otel.BatchTracer(
        group="g", topics=["orders"], table="state", dsn="postgresql://u:secret@h:5432/appdb"
    )
    links = [TraceLink(parent("01").decode(), "k=v", "orders", 2, 7)]
    span = tracer.start(links=links, messages=5, events=4, rows=3, duplicates=1, invalid=0,
                        partitions=[("orders", 2), ("orders", 0)])  # fmt: skip
    tracer.event(span, "retry", {"spr.retry.attempt": 1})
    tracer.end(span, "committed", applied=2, stale=1, rejected=0, end_ns=None)
    (done,) = exporter.get_finished_spans()
    assert done.name == "apply batch" and done.kind is SpanKind.CONSUMER
    assert done.parent is None
    attributes = dict(done.attributes or {})
    assert attributes["messaging.system"] == "kafka"
    assert attributes["messaging.consumer.group.name"] == "g"
    assert attributes["messaging.batch.message_count"] == 5
    assert attributes["db.system.name"] == "postgresql" and attributes["db.namespace"] == "appdb"
    assert attributes["spr.batch.partitions"] == ("orders/0", "orders/2")
    assert attributes["spr.rows.applied"] == 2 and attributes["spr.outcome"] == "committed"
    assert "secret" not in repr(attributes)
    (link,) = done.links
    assert link.context.trace_id == int(TRACE, 16) and link.context.span_id == int(SPAN, 16)
    assert link.context.trace_state.get("k") == "v"
    assert dict(link.attributes or {})["messaging.kafka.offset"] == 7
    assert [e.name for e in done.events] == ["retry"]
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_the_send_span_is_injected_into_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    from spr.tracing import otel

    provider, exporter = _provider()
    monkeypatch.setattr(otel, "_tracer", lambda: provider.get_tracer("spr"))
    headers: list[tuple[str, str | bytes | None]] = [("idempotency-key", "order:1:1")]
    span = otel.SendTracer().start("orders", "key-1", headers)
    otel.SendTracer.delivered(span, None, Message(41, None))
    (done,) = exporter.get_finished_spans()
    assert done.name == "send orders" and done.kind is SpanKind.PRODUCER
    names = [name for name, _ in headers]
    assert names == ["idempotency-key", "traceparent"]
    value = str(headers[1][1])
    # Flags: sampled, and (W3C level 2, which this SDK sets) the random trace id bit.
    assert value.startswith(f"00-{done.context.trace_id:032x}-{done.context.span_id:016x}-")
    assert sampled_traceparent(value)
    attributes = dict(done.attributes or {})
    assert attributes["messaging.destination.partition.id"] == "2"
    assert attributes["messaging.kafka.offset"] == 41
    assert attributes["messaging.kafka.message.key"] == "key-1"


def test_workers_get_the_tracing_flags_again() -> None:
    from spr.cli import build_parser
    from spr.cli.run import _child_argv

    args = build_parser().parse_args(
        ["run", "--topic", "t", "--group", "g", "--otel", "--otel-max-links", "7"]
    )
    argv = _child_argv(args, 0)
    assert argv[argv.index("--otel") :][:3] == ["--otel", "--otel-max-links", "7"]
    plain = _child_argv(build_parser().parse_args(["run", "--topic", "t", "--group", "g"]), 0)
    assert "--otel" not in plain


class RecordingTracer:
    """Stands in for BatchTracer: what Flushing asks of it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self, **details: Any) -> str:
        self.calls.append(("start", details))
        return "span"

    def event(self, span: str, name: str, attributes: Any) -> None:
        self.calls.append(("event", (span, name, dict(attributes))))

    def end(self, span: str, outcome: str, **details: Any) -> None:
        self.calls.append(("end", (span, outcome, details)))


def test_one_span_per_flush_with_its_retries_as_events() -> None:
    from array import array

    import psycopg
    from test_engine_logic import FakeSink

    from spr._core_py import Batch
    from spr.batch import STATE_COLUMNS
    from spr.clock import FakeClock
    from spr.config import EngineConfig
    from spr.engine.failures import FirstFailure
    from spr.engine.flushing import Flushing
    from spr.engine.intake import PendingBatch

    sink = FakeSink()
    sink.fail = psycopg.OperationalError("connection lost")
    clock = FakeClock()
    committed: list[Any] = []
    flushing = Flushing(
        EngineConfig(group_id="g", topics=("t",)),
        clock=clock,
        failure=FirstFailure(),
        on_committed=lambda job, result, seconds: committed.append(result),
    )
    tracer = RecordingTracer()
    flushing.tracer = tracer
    flushing.start([sink], None)  # type: ignore[arg-type]
    try:
        batch = Batch(STATE_COLUMNS)
        batch.advance("t", 0, 5)
        links = [TraceLink(parent("01").decode(), None, "t", 0, 5)]
        flushing.submit(
            PendingBatch(batch, 0, 6, 0, array("q"), array("q"), duplicates=1, links=links)
        )
        flushing.await_outcome(10.0)  # the failed attempt: a retry, not an end
        assert [c[0] for c in tracer.calls] == ["start", "event"]
        start = tracer.calls[0][1]
        assert start["links"] == links and start["messages"] == 6
        assert start["duplicates"] == 1 and start["partitions"] == [("t", 0)]
        assert tracer.calls[1][1][1] == "retry"
        assert tracer.calls[1][1][2]["error.type"] == "OperationalError"
        sink.fail = None
        clock.advance(60.0)
        deadline = 200
        while flushing.busy and deadline:
            flushing.poll()
            flushing.await_outcome(0.05)
            deadline -= 1
        assert len(committed) == 1
        kind, (span, outcome, details) = tracer.calls[-1]
        assert (kind, span, outcome) == ("end", "span", "committed")
        assert isinstance(details["end_ns"], int) and details["applied"] == 0
        assert [c[0] for c in tracer.calls] == ["start", "event", "end"]
    finally:
        flushing.close()
