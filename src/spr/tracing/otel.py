"""The OpenTelemetry side of tracing: the SDK set-up, the send spans, the flush spans.

Imported only when tracing is on; it imports the OpenTelemetry API and SDK (the extra
``spr[otel]``). Callers check :func:`spr.tracing.require_otel` first, so that a missing
extra is one sentence rather than an ImportError.

Configuration is OpenTelemetry's own: the SDK reads ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) and ``OTEL_BSP_*``.
Export is OTLP over HTTP/protobuf through a ``BatchSpanProcessor``, off the hot path.

Attribute names follow the OpenTelemetry semantic conventions for messaging (Kafka) and
databases; spr's own counts are under ``spr.``. No attribute holds a DSN: the database
appears as ``db.namespace`` (its name) only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from spr._version import __version__
from spr.tracing import TraceLink

__all__ = ["BatchTracer", "SendTracer", "TracingSession", "configure", "samples_nothing"]

_INSTRUMENTATION = "spr"
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(eq=False)
class TracingSession:
    """The tracer provider a command set up; :meth:`shutdown` exports what is left."""

    provider: TracerProvider

    def shutdown(self) -> None:
        """Flush the batch processor and stop the exporter. Blocks for at most the
        exporter's timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s by default)."""
        self.provider.force_flush()
        self.provider.shutdown()


def configure(service_name: str = "spr", *, max_links: int | None = None) -> TracingSession:
    """Install an SDK tracer provider as the global one: OTLP over HTTP/protobuf through a
    ``BatchSpanProcessor``, the sampler and endpoint from the standard environment
    variables. ``service_name`` is used when neither ``OTEL_SERVICE_NAME`` nor
    ``OTEL_RESOURCE_ATTRIBUTES`` names the service. ``max_links`` raises the SDK's limit of
    links per span (``OTEL_SPAN_LINK_COUNT_LIMIT``, 128 by default) when it is higher.
    Never blocks (the exporter connects when it first exports)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    limits = SpanLimits()
    if max_links is not None and max_links > (limits.max_links or 0):
        limits = SpanLimits(max_links=max_links)
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return TracingSession(provider)


def samples_nothing(provider: Any = None) -> bool:
    """Whether ``provider``'s sampler (default: the global provider's) drops every span
    spr would start: with ``always_off`` or ``parentbased_always_off`` the engine's flush
    spans (roots) are never recorded, so the engine need not read a single header."""
    if provider is None:
        provider = trace.get_tracer_provider()
    sampler = getattr(provider, "sampler", None)
    if sampler is None:
        return False
    if sampler is ALWAYS_OFF:
        return True
    return isinstance(sampler, ParentBased) and sampler._root is ALWAYS_OFF


def _send_attributes(topic: str, key: str, **extra: Any) -> dict[str, Any]:
    """A send span's attributes (OpenTelemetry's messaging conventions) plus ``extra``."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": topic,
        "messaging.kafka.message.key": key,
        **extra,
    }


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_INSTRUMENTATION, __version__)


class SendTracer:
    """One ``send <topic>`` span (kind PRODUCER) per event sent, its context injected
    into the record's headers (``traceparent``, and ``tracestate`` when there is one).

    The span starts before ``produce()`` and ends on the delivery report, when the
    partition and offset are known (or with an error status when delivery failed).
    """

    def __init__(self) -> None:
        self._tracer = _tracer()

    def start(self, topic: str, key: str, headers: list[tuple[str, str | bytes | None]]) -> Span:
        """Start the send span of one record and append its trace headers to ``headers``."""
        span = self._tracer.start_span(
            f"send {topic}",
            kind=SpanKind.PRODUCER,
            attributes=_send_attributes(topic, key),
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        headers.extend(carrier.items())
        return span

    @staticmethod
    def delivered(span: Span, error: Any, message: Any) -> None:
        """End ``span`` with the delivery report of its record."""
        if error is None:
            span.set_attribute("messaging.destination.partition.id", str(message.partition()))
            span.set_attribute("messaging.kafka.offset", int(message.offset()))
        else:
            span.set_attribute("error.type", str(error.name()))
            span.set_status(Status(StatusCode.ERROR, str(error.str())))
        span.end()

    @staticmethod
    def failed(span: Span, detail: str) -> None:
        """End ``span`` of a record librdkafka refused locally."""
        span.set_attribute("error.type", "rejected")
        span.set_status(Status(StatusCode.ERROR, detail))
        span.end()


SourceKey = tuple[str, int, int]


class TransformTracer:
    """``spr transform`` continues each sampled input event's trace into its output
    record: a ``send <output topic>`` span (kind PRODUCER), a child of the input's send
    span, whose context replaces nothing and is appended to the output record's headers.

    The span ends when the record is handed to the transactional producer: its delivery
    is only known when the transaction commits, for a whole batch at once. Unsampled
    input events get no span and no ``traceparent`` on their output record.
    """

    def __init__(self) -> None:
        self._tracer = _tracer()

    @staticmethod
    def sampled_inputs(messages: Sequence[Any]) -> dict[SourceKey, tuple[bytes, bytes | None]]:
        """The sampled trace contexts of a ``consume()`` result, by topic, partition and
        offset (read by the core, without a Python object for an unsampled event)."""
        from spr._impl import core

        return {
            (topic, partition, offset): (parent, state)
            for parent, state, topic, partition, offset in core.sampled_traces(
                messages, len(messages)
            )
        }

    def continue_into(
        self,
        topic: str,
        key: bytes,
        partition: int,
        headers: list[tuple[str, bytes]],
        inputs: Mapping[SourceKey, tuple[bytes, bytes | None]],
    ) -> Span | None:
        """Start the span of one output record when its input was sampled, and append its
        ``traceparent`` (and ``tracestate``) to ``headers``; None otherwise."""
        named = dict(headers)
        try:
            source = (
                named["spr-source-topic"].decode(),
                int(named["spr-source-partition"]),
                int(named["spr-source-offset"]),
            )
        except (KeyError, ValueError):
            return None
        found = inputs.get(source)
        if found is None:
            return None
        carrier = {"traceparent": found[0].decode("ascii")}
        if found[1]:
            carrier["tracestate"] = found[1].decode("ascii", "replace")
        span = self._tracer.start_span(
            f"send {topic}",
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.PRODUCER,
            attributes=_send_attributes(
                topic,
                key.decode("ascii", "replace"),
                **{
                    "messaging.destination.partition.id": str(partition),
                    "spr.source.topic": source[0],
                    "spr.source.partition": source[1],
                    "spr.source.offset": source[2],
                },
            ),
        )
        out: dict[str, str] = {}
        inject(out, context=trace.set_span_in_context(span))
        headers.extend((name, value.encode("ascii")) for name, value in out.items())
        return span

    def produce_all(
        self,
        produce: Callable[..., Any],
        when_full: Callable[[str, bytes, bytes, int, Any], None],
        topic: str,
        messages: Sequence[Any],
        records: Sequence[tuple[bytes, bytes, int, list[tuple[str, bytes]]]],
    ) -> None:
        """Produce ``records`` (the core's rekeyed output of ``messages``) with
        ``produce``, continuing the sampled inputs' traces; ``when_full`` retries a
        record the producer's full queue refused (BufferError)."""
        inputs = self.sampled_inputs(messages)
        for key, value, partition, headers in records:
            span = self.continue_into(topic, key, partition, headers, inputs) if inputs else None
            try:
                produce(topic, value, key, partition=partition, headers=headers)
            except BufferError:
                when_full(topic, value, key, partition, headers)
            finally:
                if span is not None:
                    span.end()


def _link(found: TraceLink) -> Link | None:
    carrier = {"traceparent": found.traceparent}
    if found.tracestate:
        carrier["tracestate"] = found.tracestate
    context: SpanContext = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    if not context.is_valid:
        return None
    return Link(
        context,
        attributes={
            "messaging.destination.name": found.topic,
            "messaging.destination.partition.id": str(found.partition),
            "messaging.kafka.offset": found.offset,
        },
    )


def database_name(dsn: str) -> str | None:
    """The database a DSN names (``db.namespace``), or None; never the DSN itself."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        name = conninfo_to_dict(dsn).get("dbname")
    except Exception:
        return None
    return str(name) if name else os.environ.get("PGDATABASE")


class BatchTracer:
    """One ``apply batch`` span (kind CONSUMER) per flush, linked to the sampled events.

    :meth:`start` is called before the batch is handed to the flush thread (so before the
    COPY); :meth:`end` with the time the flush thread saw COMMIT return. Retries and dead
    letters become span events. Safe to call from the loop's thread only. ``tracer``
    defaults to spr's tracer of the global provider.
    """

    def __init__(
        self,
        *,
        group: str,
        topics: Sequence[str],
        table: str,
        dsn: str,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._tracer = tracer or _tracer()
        self._base: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "apply batch",
            "messaging.consumer.group.name": group,
            "db.system": "postgresql",
            "db.system.name": "postgresql",
            "db.operation.name": "INSERT",
            "db.collection.name": table,
        }
        if len(topics) == 1:
            self._base["messaging.destination.name"] = topics[0]
        namespace = database_name(dsn)
        if namespace:
            self._base["db.namespace"] = namespace

    def start(
        self,
        *,
        links: Sequence[TraceLink],
        messages: int,
        events: int,
        rows: int,
        duplicates: int,
        invalid: int,
        partitions: Sequence[tuple[str, int]],
    ) -> Span:
        attributes = dict(self._base)
        attributes.update(
            {
                "messaging.batch.message_count": messages,
                "spr.batch.events": events,
                "spr.batch.rows": rows,
                "spr.events.duplicate": duplicates,
                "spr.events.invalid": invalid,
                "spr.batch.partitions": [f"{t}/{p}" for t, p in sorted(partitions)],
                "spr.batch.links": len(links),
            }
        )
        made = [link for link in map(_link, links) if link is not None]
        return self._tracer.start_span(
            "apply batch", kind=SpanKind.CONSUMER, attributes=attributes, links=made
        )

    @staticmethod
    def event(span: Span, name: str, attributes: Mapping[str, Any]) -> None:
        span.add_event(name, attributes=dict(attributes))

    @staticmethod
    def end(
        span: Span,
        outcome: str,
        *,
        applied: int | None = None,
        stale: int | None = None,
        rejected: int | None = None,
        error: BaseException | None = None,
        end_ns: int | None = None,
    ) -> None:
        span.set_attribute("spr.outcome", outcome)
        if applied is not None:
            span.set_attribute("spr.rows.applied", applied)
        if stale is not None:
            span.set_attribute("spr.rows.stale", stale)
        if rejected is not None:
            span.set_attribute("spr.rows.rejected", rejected)
            if rejected:
                span.add_event("dead letters", attributes={"spr.rows.rejected": rejected})
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            sqlstate = getattr(error, "sqlstate", None)
            if sqlstate:
                span.set_attribute("db.response.status_code", str(sqlstate))
            span.set_status(Status(StatusCode.ERROR, outcome))
        elif outcome != "committed":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end(end_time=end_ns)


def wall_ns() -> int:
    """Span timestamps are wall-clock nanoseconds (what OTLP carries)."""
    return time.time_ns()
