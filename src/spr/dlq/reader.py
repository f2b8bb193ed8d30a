"""Reading a dead-letter topic back, from given positions up to its end."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

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
    UNKNOWN,
    Headers,
    error_text,
)
from spr.errors import ServerUnavailable


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One dead letter as read back: the original message and what spr said about it.

    ``headers`` are the original headers (spr's removed). ``group`` is the consumer
    group that wrote the letter (``spr-group``). Missing or malformed spr headers read
    as ``"unknown"`` / ``-1`` (a letter written before ``spr-group`` existed has group
    ``"unknown"``), so a foreign message in the topic is visible instead of fatal.
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
    group: str = UNKNOWN

    @property
    def source_position(self) -> tuple[str, int, int] | None:
        """The event's place in its source topic (topic, partition, offset), or None when
        the letter does not say (a foreign message, or a malformed header)."""
        if not self.source_topic or self.source_partition < 0 or self.source_offset < 0:
            return None
        return (self.source_topic, self.source_partition, self.source_offset)

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
            error_class=spr_headers.get(HEADER_ERROR_CLASS, UNKNOWN),
            error=spr_headers.get(HEADER_ERROR, ""),
            source_topic=spr_headers.get(HEADER_SOURCE_TOPIC, ""),
            source_partition=number(HEADER_SOURCE_PARTITION),
            source_offset=number(HEADER_SOURCE_OFFSET),
            attempts=number(HEADER_ATTEMPTS),
            group=spr_headers.get(HEADER_GROUP) or UNKNOWN,
        )


def reading_consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": MAX_DEAD_LETTER_BYTES * 2,
            "max.partition.fetch.bytes": MAX_DEAD_LETTER_BYTES,
            "logger": KAFKA_LOG,
        }
    )


def partitions_of(client: Any, topic: str, bootstrap: str, timeout: float) -> list[int] | None:
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
    until: Mapping[int, int] | None = None,
) -> Iterator[DeadLetter]:
    """Read ``topic`` from ``starts`` (partition → offset) up to the end offsets as they
    were when reading began, or up to ``until`` (partition → offset, exclusive) where
    that is lower; yields each message as a :class:`DeadLetter`.

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
        if until is not None:
            high = min(high, until.get(partition, high))
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
                raise ServerUnavailable(f"reading '{topic}' failed ({error_text(error)})")
            at_partition, at_offset = message.partition(), message.offset()
            if (
                at_partition not in ends
                or at_offset is None
                or at_offset >= ends[at_partition]
                # Before the start, or already yielded: a message fetched for an earlier
                # assignment of this consumer.
                or at_offset < positions[at_partition]
            ):
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
