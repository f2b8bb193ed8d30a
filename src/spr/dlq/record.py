"""A dead letter's headers and the source record it keeps, byte for byte (design §6)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError

from spr.config.engine import DLQ_SUFFIX, dlq_topic_for

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DLQ_SUFFIX",
    "HEADER_ATTEMPTS",
    "HEADER_ERROR",
    "HEADER_ERROR_CLASS",
    "HEADER_GROUP",
    "HEADER_REDRIVEN_FROM",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "KAFKA_LOG",
    "MAX_DEAD_LETTER_BYTES",
    "MAX_REASON_CHARS",
    "REDRIVE_STRIPPED",
    "UNKNOWN",
    "Headers",
    "SourceRecord",
    "dlq_topic_for",
    "error_text",
]

HEADER_ERROR_CLASS = "spr-error-class"
HEADER_ERROR = "spr-error"
HEADER_SOURCE_TOPIC = "spr-source-topic"
HEADER_SOURCE_PARTITION = "spr-source-partition"
HEADER_SOURCE_OFFSET = "spr-source-offset"
HEADER_ATTEMPTS = "spr-attempts"
# The consumer group that wrote the letter: several groups reading one topic write into
# one dead-letter topic, and redrive must tell their copies of one event apart.
HEADER_GROUP = "spr-group"
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
    HEADER_GROUP,
)
REDRIVE_STRIPPED = frozenset((*DEAD_LETTER_HEADERS, HEADER_REDRIVEN_FROM))

# The broker accepts 10 MB messages; a source message at that limit plus its spr headers
# must still fit, so the producer and the dead-letter topic allow 1 MiB more.
MAX_DEAD_LETTER_BYTES = 10 * 1024 * 1024 + 1024 * 1024
MAX_REASON_CHARS = 1000

# librdkafka's own log lines go through logging, never straight to stderr.
KAFKA_LOG = logging.getLogger("spr.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())

# How a letter reads back when spr's header for its class or its group is missing.
UNKNOWN = "unknown"

Headers = tuple[tuple[str, bytes | None], ...]


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


def error_text(error: KafkaError | None) -> str:
    if error is None:
        return "unknown error"
    return f"{error.name()}: {error.str()}"
