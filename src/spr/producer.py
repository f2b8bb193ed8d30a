"""The spr producer: entity events onto Kafka, on the partition that owns the entity.

:class:`Producer` wraps a confluent-kafka ``Producer`` with the contract of design §3:

- the message key is the composite partition key,
  ``spr.routing.partition_key(f"{entity_type}:{entity_id}")``;
- the headers are ``idempotency-key`` = ``entity_type:entity_id:sequence`` and
  ``schema-version`` = ``v2``;
- librdkafka chooses the partition with ``partitioner=murmur2_random`` (the Java client's
  algorithm); spr never passes an explicit partition, because an idempotent producer
  should not mix explicit partitions with partitioner-chosen ones;
- the producer is idempotent (``acks=all``, ``enable.idempotence=true``), compresses with
  lz4 and lingers 5 ms.

Delivery failures are counted (:attr:`Producer.errors`) and raised as
:class:`spr.errors.ProducerError` by the next :meth:`Producer.flush` (or :meth:`close`);
they are never swallowed. A full local queue is handled by serving delivery reports and
retrying, never by dropping the message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Producer as _KafkaProducer

from spr._event import Event
from spr.config import merge_kafka_config
from spr.errors import ConfigError, InvalidEvent, ProducerError, ServerUnavailable
from spr.routing import partition_key

__all__ = [
    "PRODUCER_DEFAULTS",
    "SCHEMA_VERSION",
    "Producer",
    "idempotency_key",
    "merge_producer_config",
]

SCHEMA_VERSION = "v2"

# Design §3. Everything here can be overridden; see merge_producer_config.
PRODUCER_DEFAULTS: Mapping[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "lz4",
    "linger.ms": 5,
    "partitioner": "murmur2_random",
}

# Keys spr owns: they carry Python callables, so a librdkafka string cannot replace them.
_RESERVED_KEYS = frozenset({"on_delivery", "error_cb", "logger"})

_log = logging.getLogger("spr.producer")
_kafka_log = logging.getLogger("spr.kafka")
# librdkafka's own log lines (connection refused, retries) go to this logger; without a
# handler they would reach Python's last-resort stderr handler and bury the one-sentence
# errors spr promises. Applications that configure logging still receive them.
_kafka_log.addHandler(logging.NullHandler())

_EVENT_ENCODER = msgspec.json.Encoder()

# Errors that mean "no broker answered" as opposed to "a broker answered with an error".
_UNREACHABLE = frozenset(
    {
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TRANSPORT,
        KafkaError._RESOLVE,
        KafkaError._TIMED_OUT,
    }
)


def merge_producer_config(
    bootstrap: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The librdkafka configuration of an spr producer: defaults, then user overrides.

    Layers, later ones winning: :data:`PRODUCER_DEFAULTS`, ``bootstrap.servers`` from
    ``bootstrap``, then every key in ``overrides``. User keys always win, including the
    routing-relevant ``partitioner`` (overriding it breaks the routing contract, so only
    do it on purpose). Pure: builds a new dict and never contacts a broker. Raises
    :class:`ConfigError` for a key spr reserves for its own callbacks.
    """
    overrides = overrides or {}
    for key in overrides:
        if key in _RESERVED_KEYS:
            raise ConfigError(
                f"producer setting '{key}' is reserved by spr; read Producer.errors "
                "and flush() results instead"
            )
    return merge_kafka_config({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap}, overrides)


def idempotency_key(entity_type: str, entity_id: str, sequence: int) -> str:
    """The ``idempotency-key`` header value: ``entity_type:entity_id:sequence``."""
    return f"{entity_type}:{entity_id}:{sequence}"


def _check_identity(entity_type: object, entity_id: object, sequence: object) -> None:
    if not isinstance(entity_type, str) or not entity_type:
        raise InvalidEvent("entity_type must be a non-empty string")
    if not isinstance(entity_id, str) or not entity_id:
        raise InvalidEvent("entity_id must be a non-empty string")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise InvalidEvent("sequence must be an integer >= 0")


def _event_value(event: Event) -> bytes:
    if event.payload:
        return bytes(event.payload)
    return _EVENT_ENCODER.encode(
        {
            "event_id": event.event_id,
            "entity_type": event.entity_type,
            "entity_id": event.entity_id,
            "sequence": event.sequence,
            "state": event.state,
            "timestamp": event.timestamp_ms,
        }
    )


def _mapping_value(event: Mapping[str, Any]) -> bytes:
    for name in ("entity_type", "entity_id", "sequence", "state"):
        if name not in event:
            raise InvalidEvent(f"event has no '{name}' field")
    if not isinstance(event["state"], str) or not event["state"]:
        raise InvalidEvent("state must be a non-empty string")
    wire = dict(event)
    # The wire name of timestamp_ms is "timestamp" (design §2 aliases).
    if "timestamp_ms" in wire:
        wire["timestamp"] = wire.pop("timestamp_ms")
    try:
        return _EVENT_ENCODER.encode(wire)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidEvent(f"event cannot be encoded as JSON: {exc}") from None


class Producer:
    """Produces entity events to Kafka with spr's routing key, headers and guarantees.

    ``bootstrap`` is the broker list; ``config`` holds librdkafka overrides (merged by
    :func:`merge_producer_config`, user keys win); ``topic`` is the default topic of
    :meth:`send` and friends. Construction blocks for at most ``metadata_timeout_s``
    while it checks that a broker answers (:class:`ServerUnavailable` when none does)
    and that ``topic`` exists (:class:`ConfigError` when it does not; spr never relies
    on broker-side auto-creation).

    Sending is asynchronous: ``send*`` hands the message to librdkafka and returns.
    :meth:`flush` blocks until every message is acknowledged or failed and raises
    :class:`ProducerError` when any failed since the last report. Not thread-safe: use
    one instance per thread.

    ``tracing=True`` (needs the extra ``spr[otel]``, else :class:`ConfigError`) makes a
    ``send <topic>`` span per message with the global OpenTelemetry tracer provider, and
    injects its ``traceparent`` (and ``tracestate``) into the headers; the span ends on
    the message's delivery report. The application configures the provider (or calls
    :func:`spr.tracing.otel.configure`); off by default, and then nothing of
    OpenTelemetry is imported.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        config: Mapping[str, Any] | None = None,
        topic: str | None = None,
        metadata_timeout_s: float = 5.0,
        tracing: bool = False,
    ) -> None:
        if metadata_timeout_s <= 0:
            raise ConfigError(f"metadata_timeout_s must be > 0, got {metadata_timeout_s}")
        if topic is not None and not topic:
            raise ConfigError("topic must be a non-empty string")
        self.bootstrap = bootstrap
        self.topic = topic
        self.config: Mapping[str, Any] = merge_producer_config(bootstrap, config)
        self._sent = 0
        self._records = 0
        self._errors = 0
        self._errors_reported = 0
        self._first_error = ""
        self._unreachable: KafkaError | None = None
        self._fatal: KafkaError | None = None
        self._closed = False
        self._send_tracer: Any = None
        if tracing:
            from spr.tracing import require_otel

            require_otel()
            from spr.tracing.otel import SendTracer

            self._send_tracer = SendTracer()
        full = dict(self.config)
        full["on_delivery"] = self._on_delivery
        full["error_cb"] = self._on_error
        full["logger"] = _kafka_log
        try:
            self._producer = _KafkaProducer(full)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid producer configuration: {_describe(exc)}") from None
        try:
            self._check_broker(metadata_timeout_s)
        except BaseException:
            self._closed = True
            self._producer.purge(in_queue=True, in_flight=True)
            raise

    # ------------------------------------------------------------------ callbacks

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        # One shared callback for all messages: per-message closures would cost an
        # allocation per event on the hot path.
        if err is None:
            self._records += 1
            return
        self._errors += 1
        if not self._first_error:
            self._first_error = f"{err.str()} (topic '{msg.topic()}', key {msg.key()!r})"

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        if err.code() in _UNREACHABLE:
            self._unreachable = err
        _log.debug("librdkafka: %s", err)

    # ------------------------------------------------------------------- startup

    def _check_broker(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                metadata = self._producer.list_topics(
                    topic=self.topic, timeout=max(0.05, min(1.0, remaining))
                )
                break
            except KafkaException:
                # Serve error_cb: "all brokers down" arrives within milliseconds of a
                # refused connection, so a missing broker fails fast instead of waiting
                # out the whole timeout.
                self._producer.poll(0)
                if self._unreachable is not None or time.monotonic() >= deadline:
                    raise ServerUnavailable(
                        f"Kafka is not reachable at {self.bootstrap}; start it "
                        "(spr dev up) or pass the right --bootstrap"
                    ) from None
        if self.topic is None:
            return
        topic_md = metadata.topics.get(self.topic)
        if topic_md is None or topic_md.error is not None:
            reason = topic_md.error.str() if topic_md is not None and topic_md.error else ""
            raise ConfigError(
                f"topic '{self.topic}' does not exist on {self.bootstrap} ({reason}); "
                "create it first (spr produce --partitions N creates it)"
            )

    # ------------------------------------------------------------------- sending

    def send(self, event: Event | Mapping[str, Any], *, topic: str | None = None) -> None:
        """Queue one event; returns at once (blocks only while the local queue is full).

        ``event`` is an :class:`spr.decode.Event` (its ``payload``, the original JSON,
        is sent verbatim; an empty payload is replaced by the canonical JSON) or a
        mapping with the canonical field names ``entity_type``, ``entity_id``,
        ``sequence``, ``state`` and optionally ``event_id``, ``timestamp_ms`` (sent as
        ``timestamp``) and ``payload``, encoded as one JSON object. Raises
        :class:`InvalidEvent` when the identity fields are missing or malformed.
        """
        if isinstance(event, Event):
            value = _event_value(event)
            entity_type, entity_id, sequence = event.entity_type, event.entity_id, event.sequence
        elif isinstance(event, Mapping):
            value = _mapping_value(event)
            entity_type = event["entity_type"]
            entity_id = event["entity_id"]
            sequence = event["sequence"]
        else:
            raise InvalidEvent(f"cannot send a {type(event).__name__}; pass an Event or a mapping")
        self.send_raw(
            value, entity_type=entity_type, entity_id=entity_id, sequence=sequence, topic=topic
        )

    def send_many(
        self, events: Iterable[Event | Mapping[str, Any]], *, topic: str | None = None
    ) -> int:
        """Queue events in order and return how many were queued.

        Events of one entity share a key and therefore a partition, and the idempotent
        producer keeps a partition's order across retries, so per-entity order is the
        iteration order. Does not flush.
        """
        count = 0
        for event in events:
            self.send(event, topic=topic)
            count += 1
        return count

    def send_raw(
        self,
        value: bytes,
        *,
        entity_type: str,
        entity_id: str,
        sequence: int,
        topic: str | None = None,
    ) -> None:
        """Queue a pre-encoded JSON value with explicit identity fields.

        For callers that build the JSON themselves, such as the load generator writing
        alias field names of "other services" (design §2). The key and headers come
        from ``entity_type``, ``entity_id`` and ``sequence``; ``value`` is sent as is.
        Raises :class:`ProducerError` when librdkafka rejects the message locally (for
        example, larger than ``message.max.bytes``); such a rejection is also counted.
        """
        _check_identity(entity_type, entity_id, sequence)
        self._produce(
            topic or self._default_topic(),
            partition_key(f"{entity_type}:{entity_id}"),
            value,
            f"{entity_type}:{entity_id}:{sequence}",
        )

    def _default_topic(self) -> str:
        if self.topic is None:
            raise ConfigError("no topic: pass topic= to Producer() or to send()")
        return self.topic

    def _produce(self, topic: str, key: str, value: bytes, idempotency: str) -> None:
        if self._closed:
            raise ProducerError("the producer is closed")
        if self._fatal is not None:
            raise ProducerError(
                f"the producer hit a fatal error and cannot send: {self._fatal.str()}",
                failed=self._errors,
                first_error=self._fatal.str(),
            )
        headers: list[tuple[str, str | bytes | None]] = [
            ("idempotency-key", idempotency),
            ("schema-version", SCHEMA_VERSION),
        ]
        # Tracing on: a span per message, ended by its own delivery report (a closure per
        # message, a cost the untraced path never pays).
        tracer = self._send_tracer
        span: Any = None
        delivered: Callable[[KafkaError | None, Any], None] | None = None
        if tracer is not None:
            span = tracer.start(topic, key, headers)

            def traced(err: KafkaError | None, msg: Any) -> None:
                self._on_delivery(err, msg)
                tracer.delivered(span, err, msg)

            delivered = traced
        while True:
            try:
                if delivered is None:
                    self._producer.produce(topic, value, key, headers=headers)
                else:
                    self._producer.produce(
                        topic, value, key, headers=headers, on_delivery=delivered
                    )
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                # Never drop the message.
                self._producer.poll(0.05)
                continue
            except KafkaException as exc:
                self._errors += 1
                self._errors_reported = self._errors
                detail = _describe(exc)
                if tracer is not None:
                    tracer.failed(span, detail)
                raise ProducerError(
                    f"Kafka rejected a message for topic '{topic}': {detail}",
                    failed=1,
                    first_error=detail,
                ) from None
            break
        self._sent += 1
        # Serve delivery reports now and then without a system call per message.
        if not self._sent & 0x3FF:
            self._producer.poll(0)

    # ------------------------------------------------------------- completion

    def poll(self, timeout_s: float = 0.0) -> int:
        """Serve pending delivery reports for up to ``timeout_s``; returns how many."""
        return int(self._producer.poll(timeout_s))

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued message is acknowledged or failed.

        ``timeout_s=None`` waits as long as it takes (bounded by librdkafka's
        ``message.timeout.ms``, after which undelivered messages fail). Raises
        :class:`ProducerError` when messages are still queued at the timeout, or when
        any delivery failed since the last time an error was raised; each failure is
        reported once.
        """
        remaining = self._producer.flush(-1 if timeout_s is None else timeout_s)
        self._raise_new_errors()
        if remaining:
            raise ProducerError(
                f"{remaining} messages were still undelivered after {timeout_s} s",
                failed=0,
            )

    def _raise_new_errors(self) -> None:
        new = self._errors - self._errors_reported
        if new <= 0:
            return
        self._errors_reported = self._errors
        first = self._first_error
        self._first_error = ""
        raise ProducerError(
            f"{new} messages could not be delivered; the first failed with: {first}",
            failed=new,
            first_error=first,
        )

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (see :meth:`flush`, which may raise) and stop sending. Idempotent."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            self._closed = True
            if len(self._producer) == 0:
                # Stops librdkafka's threads now rather than at garbage collection.
                self._producer.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is already on its way: still flush what was queued, but do not
        # replace the caller's exception with a delivery report.
        try:
            self.close()
        except ProducerError as delivery:
            _log.error("while handling %r: %s", exc, delivery)

    # ---------------------------------------------------------------- counters

    @property
    def sent(self) -> int:
        """Messages handed to librdkafka so far."""
        return self._sent

    @property
    def records(self) -> int:
        """Messages the broker acknowledged (counted as delivery reports are served)."""
        return self._records

    @property
    def errors(self) -> int:
        """Messages that failed, locally or on delivery (never dropped silently)."""
        return self._errors

    @property
    def in_flight(self) -> int:
        """Messages and delivery reports librdkafka still holds."""
        return len(self._producer)


def _describe(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], KafkaError):
        return str(exc.args[0].str())
    return str(exc)
