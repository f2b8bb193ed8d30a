"""Writing dead letters: an idempotent producer, flushed before any offset moves past them."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from spr.classify import ErrorClass
from spr.config import EngineConfig, connection_settings, merge_kafka_config
from spr.dlq.record import (
    DEAD_LETTER_HEADERS,
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_ERROR_CLASS,
    HEADER_GROUP,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    KAFKA_LOG,
    MAX_DEAD_LETTER_BYTES,
    MAX_REASON_CHARS,
    SourceRecord,
    dlq_topic_for,
    error_text,
)
from spr.errors import DeadLetterUnavailable

log = logging.getLogger("spr.dlq")

# Design §6 and the brief: idempotent, every replica acknowledges, big values allowed.
DLQ_PRODUCER_DEFAULTS: Mapping[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "lz4",
    "linger.ms": 5,
    "message.max.bytes": MAX_DEAD_LETTER_BYTES,
    # Bounded, so that an unwritable dead-letter topic stops consumption within a minute
    # instead of librdkafka's five.
    "message.timeout.ms": 60_000,
}


class DeadLetterWriter:
    """Writes dead letters with an idempotent producer; not thread-safe.

    ``dlq_topic`` names the dead-letter topic (see :func:`dlq_topic_for`; default
    ``<topic>.dlq``). When ``create_topic`` is true a missing dead-letter topic is created
    on first use with as many partitions as its source topic, so that a dead letter goes
    to the partition of the same number and keeps its source partition's order; a
    dead-letter topic that already exists with fewer partitions gets
    ``source_partition % partitions``. ``producer_config`` overrides librdkafka settings
    (defaults: :data:`DLQ_PRODUCER_DEFAULTS`). Use as a context manager, or call
    :meth:`close`.

    ``group`` is the consumer group on whose behalf it writes; each letter then carries
    it as ``spr-group`` (without it the header is left out, and the letter reads back as
    group ``"unknown"``). ``source_topics`` are the topics the writer's run consumes: it
    refuses to write a dead letter into any of them, or into the letter's own source
    topic (design §6, fatal: the letter would be consumed and dead-lettered again
    without end). :class:`spr.config.EngineConfig` refuses such a setting before any
    server is touched; this is the second guard, for any other caller. ``producer``,
    when given, is the producer the letters are written with (``spr transform``'s
    transactional one), instead of one of the writer's own.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        dlq_topic: str | None = None,
        producer_config: Mapping[str, Any] | None = None,
        create_topic: bool = True,
        replication_factor: int = -1,
        topic_config: Mapping[str, str] | None = None,
        metadata_timeout: float = 10.0,
        group: str | None = None,
        source_topics: Collection[str] = (),
        producer: Any | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.dlq_topic = dlq_topic
        self.group = group or None
        self.source_topics = frozenset(source_topics)
        self.create_topic = create_topic
        self.replication_factor = replication_factor
        self.topic_config: dict[str, str] = {
            "max.message.bytes": str(MAX_DEAD_LETTER_BYTES),
            **(topic_config or {}),
        }
        self.metadata_timeout = metadata_timeout
        self.config = merge_kafka_config(
            {**DLQ_PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap}, producer_config or {}
        )
        # A given producer (a transactional one: spr transform writes its dead letters in
        # the batch's transaction) is used as it is; flushing it is its owner's business.
        self._producer = producer or Producer(
            {**self.config, "error_cb": self._on_error, "logger": KAFKA_LOG}
        )
        self._partitions: dict[str, int] = {}
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self._first_failure = ""
        self._fatal: KafkaError | None = None

    # ---------------------------------------------------------------------- callbacks
    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
        log.debug("dead-letter producer: %s", error_text(error))

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if not self._first_failure:
            self._first_failure = f"{message.topic()} rejected a dead letter ({error_text(error)})"

    # -------------------------------------------------------------------------- topics
    def topic_for(self, source_topic: str) -> str:
        """The dead-letter topic that dead letters of ``source_topic`` go to."""
        return dlq_topic_for(source_topic, self.dlq_topic)

    def _partition_count(self, topic: str) -> int | None:
        try:
            metadata = self._producer.list_topics(topic=topic, timeout=self.metadata_timeout)
        except KafkaException as exc:
            raise DeadLetterUnavailable(
                f"cannot reach Kafka at {self.bootstrap} to look up dead-letter topic "
                f"'{topic}' ({error_text(exc.args[0] if exc.args else None)})"
            ) from None
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return None
        return len(info.partitions)

    def ensure_topic(self, source_topic: str) -> tuple[str, int]:
        """Make sure the dead-letter topic of ``source_topic`` exists; returns its name
        and partition count. Blocks for a metadata round trip the first time per topic
        (and for topic creation when needed). Raises DeadLetterUnavailable when it does
        not exist and cannot be created."""
        name = self.topic_for(source_topic)
        known = self._partitions.get(name)
        if known is not None:
            return name, known
        count = self._partition_count(name)
        if count is None:
            if not self.create_topic:
                raise DeadLetterUnavailable(
                    f"dead-letter topic '{name}' does not exist on {self.bootstrap} "
                    "and creating it is turned off"
                )
            count = self._create(name, self._partition_count(source_topic) or 1)
        self._partitions[name] = count
        return name, count

    def admin_config(self) -> dict[str, Any]:
        """The AdminClient settings: the producer's connection settings (where and how to
        connect: bootstrap, security, SASL, SSL, socket, client id), none of its
        producer-only ones."""
        conf = connection_settings(self.config)
        conf["logger"] = KAFKA_LOG
        return conf

    def _create(self, name: str, partitions: int) -> int:
        topic = NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=self.replication_factor,
            config=self.topic_config,
        )
        try:
            admin = AdminClient(self.admin_config())
            future = admin.create_topics([topic], operation_timeout=self.metadata_timeout)[name]
            future.result(timeout=self.metadata_timeout + 5)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            # Another consumer of the group may have created it a moment ago.
            if not (
                isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS
            ):
                raise DeadLetterUnavailable(
                    f"cannot create dead-letter topic '{name}' on {self.bootstrap} "
                    f"({error_text(error if isinstance(error, KafkaError) else None)})"
                ) from None
        except Exception as exc:  # e.g. the future's TimeoutError
            raise DeadLetterUnavailable(
                f"cannot create dead-letter topic '{name}' on {self.bootstrap} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        deadline = time.monotonic() + self.metadata_timeout
        while True:
            count = self._partition_count(name)
            if count is not None:
                return count
            if time.monotonic() >= deadline:
                raise DeadLetterUnavailable(
                    f"dead-letter topic '{name}' was created but has no partitions in the "
                    f"metadata after {self.metadata_timeout} s"
                )
            time.sleep(0.1)

    # --------------------------------------------------------------------------- write
    def send(
        self,
        message: Any,
        error_class: ErrorClass | str,
        reason: str,
        attempts: int,
    ) -> None:
        """Queue a dead letter for ``message`` (a confluent-kafka Message or a
        :class:`SourceRecord`); delivery is confirmed only by :meth:`flush`.

        Blocks only to look up or create the dead-letter topic (once per topic) and
        while librdkafka's queue is full. Raises DeadLetterUnavailable when the
        dead-letter topic is the record's source topic or another topic of this run
        (nothing is written, no topic is created), when the topic cannot be found or
        created, when librdkafka refuses the message, or after a fatal producer error.
        """
        if self._fatal is not None:
            raise DeadLetterUnavailable(
                f"the dead-letter producer failed fatally ({error_text(self._fatal)})"
            )
        record = (
            message if isinstance(message, SourceRecord) else SourceRecord.from_message(message)
        )
        self._refuse_a_consumed_topic(record.topic)
        topic, partitions = self.ensure_topic(record.topic)
        headers: list[tuple[str, bytes | None]] = [
            (name, value) for name, value in record.headers if name not in DEAD_LETTER_HEADERS
        ]
        headers += [
            (HEADER_ERROR_CLASS, str(ErrorClass(error_class)).encode()),
            (HEADER_ERROR, reason[:MAX_REASON_CHARS].encode("utf-8", "backslashreplace")),
            (HEADER_SOURCE_TOPIC, record.topic.encode()),
            (HEADER_SOURCE_PARTITION, str(record.partition).encode()),
            (HEADER_SOURCE_OFFSET, str(record.offset).encode()),
            (HEADER_ATTEMPTS, str(attempts).encode()),
        ]
        if self.group is not None:
            headers.append((HEADER_GROUP, self.group.encode()))
        self._produce(
            topic,
            partition=max(record.partition, 0) % partitions,
            key=record.key,
            value=record.value,
            headers=headers,
        )
        self.sent += 1

    def _refuse_a_consumed_topic(self, source_topic: str) -> None:
        target = self.topic_for(source_topic)
        if target == source_topic or target in self.source_topics:
            what = "its own source topic" if target == source_topic else "a topic this run consumes"
            raise DeadLetterUnavailable(
                f"refusing to write a dead letter of '{source_topic}' into '{target}', "
                f"{what}: it would be consumed and dead-lettered again without end"
            )

    def _produce(self, topic: str, **kwargs: Any) -> None:
        deadline = time.monotonic() + float(self.config["message.timeout.ms"]) / 1000
        while True:
            try:
                self._producer.produce(topic, on_delivery=self._on_delivery, **kwargs)
                break
            except BufferError:
                # The local queue is full: wait for deliveries, within the delivery budget.
                if time.monotonic() >= deadline:
                    raise DeadLetterUnavailable(
                        f"the dead-letter producer's queue to '{topic}' stayed full"
                    ) from None
                self._producer.poll(0.1)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                raise DeadLetterUnavailable(
                    f"Kafka refused a dead letter for '{topic}' "
                    f"({error_text(error if isinstance(error, KafkaError) else None)})"
                ) from None
        self._producer.poll(0)

    @property
    def pending(self) -> int:
        """Dead letters queued or in flight, not yet acknowledged or failed."""
        return len(self._producer)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every dead letter sent so far is acknowledged, at most ``timeout``
        seconds.

        Raises DeadLetterUnavailable if any dead letter was rejected or timed out, if the
        producer failed fatally (both are permanent for this writer: every later flush
        raises too), or if some are still unacknowledged when ``timeout`` runs out.
        """
        remaining = self._producer.flush(timeout)
        if self._fatal is not None:
            raise DeadLetterUnavailable(
                f"the dead-letter producer failed fatally ({error_text(self._fatal)})",
                failed=max(self.failed, remaining),
            )
        if self.failed:
            raise DeadLetterUnavailable(
                f"{self.failed} dead letter(s) could not be written: {self._first_failure}",
                failed=self.failed,
            )
        if remaining:
            raise DeadLetterUnavailable(
                f"{remaining} dead letter(s) were not acknowledged by Kafka at "
                f"{self.bootstrap} within {timeout:g} s",
                failed=remaining,
            )

    def close(self, timeout: float = 30.0) -> None:
        """Flush (raising like :meth:`flush`) and release the producer."""
        self.flush(timeout)

    def __enter__(self) -> DeadLetterWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()


class InvalidEventSink:
    """:class:`DeadLetterWriter` behind the engine's ``DeadLetterSink`` hook
    (``send(message, reason)``, ``flush()``): every message it receives is INVALID, after
    one attempt, unless ``send`` is told another class. ``flush`` blocks up to
    ``flush_timeout`` seconds and raises DeadLetterUnavailable like
    :meth:`DeadLetterWriter.flush`."""

    def __init__(self, writer: DeadLetterWriter, *, flush_timeout: float = 30.0) -> None:
        self.writer = writer
        self.flush_timeout = flush_timeout

    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None:
        """Queue a dead letter of class ``error_class`` (INVALID by default; the engine
        passes ``"data"`` for rows PostgreSQL rejected). Raises DeadLetterUnavailable,
        also for any unexpected error of the writer."""
        try:
            self.writer.send(message, ErrorClass(error_class), reason, 1)
        except DeadLetterUnavailable:
            raise
        except Exception as exc:
            raise DeadLetterUnavailable(
                f"a dead letter could not be queued ({type(exc).__name__}: {exc})"
            ) from exc

    def flush(self) -> None:
        try:
            self.writer.flush(self.flush_timeout)
        except DeadLetterUnavailable:
            raise
        except Exception as exc:
            raise DeadLetterUnavailable(
                f"dead letters could not be flushed ({type(exc).__name__}: {exc})"
            ) from exc


def dead_letter_sink(config: EngineConfig) -> InvalidEventSink | None:
    """The engine's dead-letter hook for ``config``: ``<topic>.dlq`` (or
    ``config.dlq_topic``), written by an idempotent producer that connects the way the
    consumer does (the connection part of ``config.kafka``), created on first use. Each
    letter names ``config.group_id`` (``spr-group``), and none is ever written into one
    of ``config.topics``. None when dead letters are turned off."""
    if not config.dead_letters:
        return None
    writer = DeadLetterWriter(
        bootstrap=config.bootstrap,
        dlq_topic=config.dlq_topic,
        producer_config=connection_settings(config.kafka),
        group=config.group_id,
        source_topics=config.topics,
    )
    return InvalidEventSink(writer)
