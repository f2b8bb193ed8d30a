"""The dead-letter topic (design §6): writing dead letters, listing them, redriving them.

A dead letter is the original message (key, value and headers, byte for byte, null
values included) re-produced to ``<topic>.dlq`` with spr's headers (design §6): what
went wrong, where it came from, and ``spr-group``, the consumer group that wrote it. A
dead-letter topic that the run consumes is refused (it would loop). :class:`DeadLetterWriter` uses an idempotent producer
(``acks=all``); the engine calls :meth:`DeadLetterWriter.flush` before it moves any
offset past a dead-lettered event, and stops when it raises
:class:`spr.errors.DeadLetterUnavailable`: an offset is never committed past an event
that was neither applied nor dead-lettered.

``spr dlq list`` summarises a dead-letter topic; ``spr dlq redrive`` re-produces its
dead letters to their source topic, once: it commits its own consumer-group offsets on
the dead-letter topic after each delivered batch, and re-produces each source position
once however many groups dead-lettered it. A redriven event that was already
applied is harmless, because the engine dedups on entity and sequence and the database
only moves an entity forward.
"""

from __future__ import annotations

from spr.dlq.reader import DeadLetter, read_dead_letters
from spr.dlq.record import (
    DEAD_LETTER_HEADERS,
    DLQ_SUFFIX,
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_ERROR_CLASS,
    HEADER_GROUP,
    HEADER_REDRIVEN_FROM,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    MAX_DEAD_LETTER_BYTES,
    SourceRecord,
    dlq_topic_for,
)
from spr.dlq.redrive import RedriveReport, redrive, redrive_group
from spr.dlq.summary import DeadLetterSummary, PartitionSummary, format_summary, summarize
from spr.dlq.writer import (
    DLQ_PRODUCER_DEFAULTS,
    DeadLetterWriter,
    InvalidEventSink,
    dead_letter_sink,
)

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DLQ_PRODUCER_DEFAULTS",
    "DLQ_SUFFIX",
    "HEADER_ATTEMPTS",
    "HEADER_ERROR",
    "HEADER_ERROR_CLASS",
    "HEADER_GROUP",
    "HEADER_REDRIVEN_FROM",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "MAX_DEAD_LETTER_BYTES",
    "DeadLetter",
    "DeadLetterSummary",
    "DeadLetterWriter",
    "InvalidEventSink",
    "PartitionSummary",
    "RedriveReport",
    "SourceRecord",
    "dead_letter_sink",
    "dlq_topic_for",
    "format_summary",
    "read_dead_letters",
    "redrive",
    "redrive_group",
    "summarize",
]
