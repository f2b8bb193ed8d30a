"""The dead-letter topic (design §6): writing dead letters, listing them, redriving them.

A dead letter is the original message (key, value and headers, byte for byte, null
values included) re-produced to ``<topic>.dlq`` with six more headers that say what went
wrong and where it came from. :class:`DeadLetterWriter` uses an idempotent producer
(``acks=all``); the engine calls :meth:`DeadLetterWriter.flush` before it moves any
offset past a dead-lettered event, and stops when it raises
:class:`spr.errors.DeadLetterUnavailable`: an offset is never committed past an event
that was neither applied nor dead-lettered.

``spr dlq list`` summarises a dead-letter topic; ``spr dlq redrive`` re-produces its
dead letters to their source topic, once: it commits its own consumer-group offsets on
the dead-letter topic after each delivered batch. A redriven event that was already
applied is harmless, because the engine dedups on entity and sequence and the database
only moves an entity forward.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from spr.classify import ErrorClass
from spr.config import merge_kafka_config
from spr.devstack import default_bootstrap
from spr.errors import ConfigError, DeadLetterUnavailable, ServerUnavailable

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DLQ_SUFFIX",
    "DeadLetter",
    "DeadLetterSummary",
    "DeadLetterWriter",
    "InvalidEventSink",
    "PartitionSummary",
    "RedriveReport",
    "SourceRecord",
    "dlq_topic_for",
    "format_summary",
    "read_dead_letters",
    "redrive",
    "redrive_group",
    "register",
    "summarize",
]

DLQ_SUFFIX = ".dlq"

HEADER_ERROR_CLASS = "spr-error-class"
HEADER_ERROR = "spr-error"
HEADER_SOURCE_TOPIC = "spr-source-topic"
HEADER_SOURCE_PARTITION = "spr-source-partition"
HEADER_SOURCE_OFFSET = "spr-source-offset"
HEADER_ATTEMPTS = "spr-attempts"
HEADER_REDRIVEN_FROM = "spr-redriven-from"
# Reserved for spr: an original header with one of these names is replaced, not kept, so
# each dead letter carries exactly one of each.
DEAD_LETTER_HEADERS = (
    HEADER_ERROR_CLASS,
    HEADER_ERROR,
    HEADER_SOURCE_TOPIC,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_OFFSET,
    HEADER_ATTEMPTS,
)
_REDRIVE_STRIPPED = frozenset((*DEAD_LETTER_HEADERS, HEADER_REDRIVEN_FROM))

# The broker accepts 10 MB messages; a source message at that limit plus its spr headers
# must still fit, so the producer and the dead-letter topic allow 1 MiB more.
MAX_DEAD_LETTER_BYTES = 10 * 1024 * 1024 + 1024 * 1024
MAX_REASON_CHARS = 1000

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

# Settings an AdminClient shares with the producer (where and how to connect).
_CONNECTION_PREFIXES = ("bootstrap.", "security.", "sasl.", "ssl.", "socket.", "client.", "broker.")

_kafka_log = logging.getLogger("spr.kafka")
_kafka_log.addHandler(logging.NullHandler())
_log = logging.getLogger("spr.dlq")

Headers = tuple[tuple[str, bytes | None], ...]


def dlq_topic_for(source_topic: str, dlq_topic: str | None = None) -> str:
    """The dead-letter topic of ``source_topic``: ``dlq_topic`` when given (``{topic}`` in
    it is replaced by the source topic), else ``<source_topic>.dlq``."""
    if dlq_topic is None:
        return source_topic + DLQ_SUFFIX
    return dlq_topic.replace("{topic}", source_topic)


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """The parts of a consumed message that a dead letter keeps, byte for byte."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: Headers = ()

    @classmethod
    def from_message(cls, message: Any) -> SourceRecord:
        """From a confluent-kafka :class:`Message` (or anything with its accessors)."""
        headers = message.headers() or ()
        return cls(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=message.value(),
            headers=tuple((name, value) for name, value in headers),
        )


def _error_text(error: KafkaError | None) -> str:
    if error is None:
        return "unknown error"
    return f"{error.name()}: {error.str()}"


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
    ) -> None:
        self.bootstrap = bootstrap
        self.dlq_topic = dlq_topic
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
        self._producer = Producer({**self.config, "error_cb": self._on_error, "logger": _kafka_log})
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
        _log.debug("dead-letter producer: %s", _error_text(error))

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        if not self._first_failure:
            self._first_failure = f"{message.topic()} rejected a dead letter ({_error_text(error)})"

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
                f"'{topic}' ({_error_text(exc.args[0] if exc.args else None)})"
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
        conf = {k: v for k, v in self.config.items() if k.startswith(_CONNECTION_PREFIXES)}
        conf["logger"] = _kafka_log
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
                    f"({_error_text(error if isinstance(error, KafkaError) else None)})"
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
        while librdkafka's queue is full. Raises DeadLetterUnavailable when the topic
        cannot be found or created, when librdkafka refuses the message, or after a
        fatal producer error.
        """
        if self._fatal is not None:
            raise DeadLetterUnavailable(
                f"the dead-letter producer failed fatally ({_error_text(self._fatal)})"
            )
        record = (
            message if isinstance(message, SourceRecord) else SourceRecord.from_message(message)
        )
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
        self._produce(
            topic,
            partition=max(record.partition, 0) % partitions,
            key=record.key,
            value=record.value,
            headers=headers,
        )
        self.sent += 1

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
                    f"({_error_text(error if isinstance(error, KafkaError) else None)})"
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
                f"the dead-letter producer failed fatally ({_error_text(self._fatal)})",
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


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One dead letter as read back: the original message and what spr said about it.

    ``headers`` are the original headers (spr's six removed). Missing or malformed spr
    headers read as ``"unknown"`` / ``-1``, so a foreign message in the topic is visible
    instead of fatal.
    """

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    error_class: str
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    attempts: int

    @classmethod
    def from_message(cls, message: Any) -> DeadLetter:
        raw: Sequence[tuple[str, bytes | None]] = message.headers() or ()
        spr_headers: dict[str, str] = {}
        for name, value in raw:
            if name in DEAD_LETTER_HEADERS:
                spr_headers[name] = (value or b"").decode("utf-8", "replace")

        def number(name: str) -> int:
            try:
                return int(spr_headers.get(name, "-1"))
            except ValueError:
                return -1

        return cls(
            dlq_topic=message.topic(),
            dlq_partition=message.partition(),
            dlq_offset=message.offset(),
            key=message.key(),
            value=message.value(),
            headers=tuple((n, v) for n, v in raw if n not in DEAD_LETTER_HEADERS),
            error_class=spr_headers.get(HEADER_ERROR_CLASS, "unknown"),
            error=spr_headers.get(HEADER_ERROR, ""),
            source_topic=spr_headers.get(HEADER_SOURCE_TOPIC, ""),
            source_partition=number(HEADER_SOURCE_PARTITION),
            source_offset=number(HEADER_SOURCE_OFFSET),
            attempts=number(HEADER_ATTEMPTS),
        )


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": MAX_DEAD_LETTER_BYTES * 2,
            "max.partition.fetch.bytes": MAX_DEAD_LETTER_BYTES,
            "logger": _kafka_log,
        }
    )


def _partitions_of(client: Any, topic: str, bootstrap: str, timeout: float) -> list[int] | None:
    """Partition ids of ``topic``, or None when it does not exist."""
    try:
        metadata = client.list_topics(topic=topic, timeout=timeout)
    except KafkaException:
        raise ServerUnavailable(
            f"Kafka is not reachable at {bootstrap}; start it (spr dev up) or pass the "
            "right --bootstrap"
        ) from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        return None
    return sorted(info.partitions)


def read_dead_letters(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    *,
    bootstrap: str,
    timeout: float = 10.0,
) -> Iterator[DeadLetter]:
    """Read ``topic`` from ``starts`` (partition → offset) up to the end offsets as they
    were when reading began; yields each message as a :class:`DeadLetter`.

    Blocks while fetching. Raises ServerUnavailable when no progress is made for
    ``timeout`` seconds.
    """
    ends: dict[int, int] = {}
    positions: dict[int, int] = {}
    for partition, start in starts.items():
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
        except KafkaException:
            raise ServerUnavailable(f"Kafka is not reachable at {bootstrap}") from None
        begin = max(start, low)
        if begin < high:
            ends[partition] = high
            positions[partition] = begin
    if not ends:
        return
    consumer.assign([TopicPartition(topic, p, o) for p, o in positions.items()])
    last_progress = time.monotonic()
    while any(positions[p] < ends[p] for p in ends):
        messages = consumer.consume(500, 0.5)
        progressed = False
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise ServerUnavailable(f"reading '{topic}' failed ({_error_text(error)})")
            at_partition, at_offset = message.partition(), message.offset()
            if at_partition not in ends or at_offset is None or at_offset >= ends[at_partition]:
                continue
            positions[at_partition] = at_offset + 1
            progressed = True
            yield DeadLetter.from_message(message)
        if not messages:
            # Offsets may have gaps (compaction, transaction markers): trust the position.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= 0 and tp.offset > positions[tp.partition]:
                    positions[tp.partition] = tp.offset
                    progressed = True
        if progressed:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > timeout:
            raise ServerUnavailable(
                f"reading '{topic}' from {bootstrap} made no progress for {timeout:g} s"
            )


# ------------------------------------------------------------------------------- list
@dataclass
class PartitionSummary:
    """Dead letters from one source partition: how many, and their source offsets."""

    count: int = 0
    first_source_offset: int = -1
    last_source_offset: int = -1

    def add(self, offset: int) -> None:
        self.count += 1
        if self.first_source_offset < 0 or offset < self.first_source_offset:
            self.first_source_offset = offset
        self.last_source_offset = max(self.last_source_offset, offset)


@dataclass
class DeadLetterSummary:
    """What ``spr dlq list`` reports about the dead letters of one source topic."""

    source_topic: str
    dlq_topic: str
    exists: bool
    total: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_partition: dict[int, PartitionSummary] = field(default_factory=dict)
    samples: list[DeadLetter] = field(default_factory=list)


def summarize(
    *,
    bootstrap: str,
    source_topic: str,
    dlq_topic: str | None = None,
    samples: int = 3,
    timeout: float = 10.0,
) -> DeadLetterSummary:
    """Read the whole dead-letter topic of ``source_topic`` (without committing anything)
    and summarise the dead letters that came from it. ``samples`` are picked with
    distinct reasons first. Blocks; raises ServerUnavailable when Kafka is unreachable."""
    name = dlq_topic_for(source_topic, dlq_topic)
    consumer = _consumer(bootstrap, "spr-dlq-list")
    try:
        partitions = _partitions_of(consumer, name, bootstrap, timeout)
        summary = DeadLetterSummary(source_topic, name, exists=partitions is not None)
        if partitions is None:
            return summary
        spare: list[DeadLetter] = []
        reasons: set[str] = set()
        for letter in read_dead_letters(
            consumer, name, dict.fromkeys(partitions, 0), bootstrap=bootstrap, timeout=timeout
        ):
            if letter.source_topic != source_topic:
                continue
            summary.total += 1
            summary.by_class[letter.error_class] += 1
            summary.by_partition.setdefault(letter.source_partition, PartitionSummary()).add(
                letter.source_offset
            )
            if len(summary.samples) < samples and letter.error not in reasons:
                reasons.add(letter.error)
                summary.samples.append(letter)
            elif len(spare) < samples:
                spare.append(letter)
        summary.samples += spare[: max(0, samples - len(summary.samples))]
        summary.samples.sort(key=lambda d: (d.source_partition, d.source_offset))
        return summary
    finally:
        consumer.close()


def _show_value(value: bytes | None, limit: int = 80) -> str:
    if value is None:
        return "null (tombstone)"
    text = value[: limit * 4].decode("utf-8", "backslashreplace")
    if len(text) > limit or len(value) > limit * 4:
        return f"{text[:limit]!r}… ({len(value)} bytes)"
    return repr(text)


def format_summary(summary: DeadLetterSummary) -> str:
    """The readable text of ``spr dlq list``."""
    if not summary.exists:
        return (
            f"no dead letters for '{summary.source_topic}': "
            f"topic '{summary.dlq_topic}' does not exist"
        )
    lines = [
        f"{summary.total} dead letter(s) for '{summary.source_topic}' in '{summary.dlq_topic}'"
    ]
    if not summary.total:
        return lines[0]
    lines.append("by error class:")
    for error_class, count in sorted(summary.by_class.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {error_class:<10} {count}")
    lines.append("by source partition:")
    for partition in sorted(summary.by_partition):
        part = summary.by_partition[partition]
        lines.append(
            f"  partition {partition}: {part.count}, source offsets "
            f"{part.first_source_offset}..{part.last_source_offset}"
        )
    lines.append("samples:")
    for letter in summary.samples:
        lines.append(
            f"  [{letter.source_partition}@{letter.source_offset}] {letter.error_class} "
            f"after {letter.attempts} attempt(s): {letter.error}"
        )
        lines.append(f"      value: {_show_value(letter.value)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- redrive
@dataclass
class RedriveReport:
    """What one ``spr dlq redrive`` did."""

    source_topic: str
    dlq_topic: str
    group: str
    redriven: int = 0
    skipped: int = 0


def redrive_group(source_topic: str, error_class: str | None = None) -> str:
    """The default consumer group that records redrive progress.

    A class filter gets its own group: the skipped dead letters stay pending for a later
    redrive (an unfiltered one re-produces the filtered class once more, which the
    engine's sequence guard makes harmless).
    """
    group = f"spr-redrive.{source_topic}"
    return f"{group}.{error_class}" if error_class else group


def redrive(
    *,
    bootstrap: str,
    source_topic: str,
    dlq_topic: str | None = None,
    group: str | None = None,
    error_class: str | None = None,
    batch_size: int = 1000,
    timeout: float = 30.0,
    producer_config: Mapping[str, Any] | None = None,
) -> RedriveReport:
    """Re-produce the dead letters of ``source_topic`` that this group has not redriven.

    Each goes back to its source partition (or wherever the partitioner puts its key, if
    that partition no longer exists) with its original key, value and headers; spr's
    headers are replaced by ``spr-redriven-from: <dlq topic>:<partition>:<offset>``.
    ``error_class`` limits it to one class. Progress is committed as the group's offsets
    on the dead-letter topic after every ``batch_size`` dead letters are acknowledged,
    so running it again re-produces nothing twice; a crash between a delivery and its
    commit re-produces that batch once more, which the engine's sequence guard makes
    harmless. Blocks; raises ServerUnavailable, ConfigError (no such source topic) or
    DeadLetterUnavailable (a re-produced event was not acknowledged; nothing past it is
    committed).
    """
    if error_class is not None:
        error_class = str(ErrorClass(error_class))
    name = dlq_topic_for(source_topic, dlq_topic)
    group = group or redrive_group(source_topic, error_class)
    report = RedriveReport(source_topic, name, group)
    consumer = _consumer(bootstrap, group)
    producer: Producer | None = None
    try:
        partitions = _partitions_of(consumer, name, bootstrap, timeout)
        if partitions is None:
            return report
        source_partitions = _partitions_of(consumer, source_topic, bootstrap, timeout)
        if source_partitions is None:
            raise ConfigError(f"source topic '{source_topic}' does not exist on {bootstrap}")
        try:
            committed = consumer.committed(
                [TopicPartition(name, p) for p in partitions], timeout=timeout
            )
        except KafkaException:
            raise ServerUnavailable(
                f"cannot read the offsets of group '{group}' from {bootstrap}"
            ) from None
        starts = {
            tp.partition: (tp.offset if tp.offset != OFFSET_INVALID and tp.offset >= 0 else 0)
            for tp in committed
        }
        producer = Producer(
            {
                **merge_kafka_config(
                    {**DLQ_PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap},
                    producer_config or {},
                ),
                "logger": _kafka_log,
            }
        )
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(_error_text(error))

        pending: dict[int, int] = {}

        def commit() -> None:
            assert producer is not None
            remaining = producer.flush(timeout)
            if failures or remaining:
                detail = failures[0] if failures else f"{remaining} unacknowledged"
                raise DeadLetterUnavailable(
                    f"re-producing dead letters to '{source_topic}' failed ({detail}); "
                    "progress was committed only up to the last acknowledged batch",
                    failed=len(failures) + remaining,
                )
            if pending:
                consumer.commit(
                    offsets=[TopicPartition(name, p, o) for p, o in pending.items()],
                    asynchronous=False,
                )
                pending.clear()

        in_batch = 0
        for letter in read_dead_letters(
            consumer, name, starts, bootstrap=bootstrap, timeout=timeout
        ):
            pending[letter.dlq_partition] = letter.dlq_offset + 1
            in_batch += 1
            if letter.source_topic != source_topic or (
                error_class is not None and letter.error_class != error_class
            ):
                report.skipped += 1
            else:
                headers = [(n, v) for n, v in letter.headers if n not in _REDRIVE_STRIPPED]
                headers.append(
                    (
                        HEADER_REDRIVEN_FROM,
                        f"{name}:{letter.dlq_partition}:{letter.dlq_offset}".encode(),
                    )
                )
                kwargs: dict[str, Any] = {
                    "key": letter.key,
                    "value": letter.value,
                    "headers": headers,
                }
                if letter.source_partition in source_partitions:
                    kwargs["partition"] = letter.source_partition
                while True:
                    try:
                        producer.produce(source_topic, on_delivery=on_delivery, **kwargs)
                        break
                    except BufferError:
                        producer.poll(0.1)
                producer.poll(0)
                report.redriven += 1
            if in_batch >= batch_size:
                commit()
                in_batch = 0
        commit()
        return report
    finally:
        consumer.close()


# ---------------------------------------------------------------------------- command
def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``spr dlq list|redrive``."""
    dlq = subparsers.add_parser("dlq", help="inspect dead letters and redrive them")
    actions = dlq.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--topic", required=True, help="the source topic")
        parser.add_argument(
            "--dlq-topic", default=None, help="the dead-letter topic (default <topic>.dlq)"
        )
        parser.add_argument(
            "--bootstrap",
            default=None,
            help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)",
        )

    listing = actions.add_parser("list", help="summarise the dead letters of a topic")
    common(listing)
    listing.add_argument(
        "--samples", type=int, default=3, help="how many dead letters to show (default 3)"
    )
    listing.set_defaults(func=_list_main)

    again = actions.add_parser(
        "redrive", help="re-produce dead letters to their source topic, once"
    )
    common(again)
    again.add_argument(
        "--group",
        default=None,
        help="consumer group recording progress (default spr-redrive.<topic>)",
    )
    again.add_argument(
        "--error-class",
        choices=[c.value for c in ErrorClass],
        default=None,
        help="redrive only dead letters of this class",
    )
    again.set_defaults(func=_redrive_main)


def _bootstrap(args: argparse.Namespace) -> str:
    bootstrap: str = args.bootstrap or default_bootstrap()
    return bootstrap


def _list_main(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise ConfigError(f"--samples must be 0 or more, got {args.samples}")
    summary = summarize(
        bootstrap=_bootstrap(args),
        source_topic=args.topic,
        dlq_topic=args.dlq_topic,
        samples=args.samples,
    )
    print(format_summary(summary))
    return 0


def _redrive_main(args: argparse.Namespace) -> int:
    report = redrive(
        bootstrap=_bootstrap(args),
        source_topic=args.topic,
        dlq_topic=args.dlq_topic,
        group=args.group,
        error_class=args.error_class,
    )
    print(
        f"redrove {report.redriven} dead letter(s) from '{report.dlq_topic}' to "
        f"'{report.source_topic}' (skipped {report.skipped}; progress in group '{report.group}')"
    )
    return 0
