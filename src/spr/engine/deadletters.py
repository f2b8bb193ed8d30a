"""Dead letters of the engine: invalid events and rows the database rejects (design §6).

Invariant: an offset never reaches the database past an event that was neither applied
nor dead-lettered. Invalid events are sent as they are found, in consumption order, and
:meth:`DeadLetters.flush` makes them durable before the batch that holds their offsets
is handed off. Rows the database rejects are sent from the flush thread inside the
flush's transaction, and flushed before its commit. A dead letter that cannot be
written stops the pipeline (:class:`~spr.engine.failures.FirstFailure`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from spr.classify import ErrorClass, error_reason
from spr.clock import Clock
from spr.engine.failures import FirstFailure
from spr.errors import DeadLetterUnavailable, SprError
from spr.kafka.clients import read_positions
from spr.logs import log_event
from spr.sink.postgres import RejectedRow

__all__ = ["DeadLetterSink", "DeadLetters", "RateLimitedLog"]

log = logging.getLogger("spr.engine")


class DeadLetterSink(Protocol):
    """Where invalid events and rejected rows go (:class:`spr.dlq.InvalidEventSink`
    writes them to ``<topic>.dlq``).

    ``send(message, reason)`` is called on the engine's thread for each invalid message,
    in consumption order, before its offset is added to a batch. ``flush`` is called
    before a batch that holds such offsets is handed to the database, and must block
    until every sent dead letter is durable, or raise (the engine then stops without
    committing the batch). Rows the database rejects (class DATA) are sent from the
    flush thread as ``send(record, reason, error_class="data")`` followed by ``flush()``
    inside the flush's transaction; the engine serialises all calls with a lock. A
    record Kafka itself could not read (bad CRC, compression) is sent as a
    :class:`spr.dlq.SourceRecord` holding only its position, with the client's error as
    ``reason``. :func:`spr.dlq.dead_letter_sink` names the engine's consumer group in
    every letter (``spr-group``), and its ``send`` raises DeadLetterUnavailable rather
    than write into a topic the engine consumes (design §6: fatal, it would loop).
    """

    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None: ...

    def flush(self) -> None: ...


class RateLimitedLog:
    """At most one log line per ``interval_s``; the lines skipped are counted in the next."""

    def __init__(self, logger: logging.Logger, clock: Clock, interval_s: float = 1.0) -> None:
        self.logger = logger
        self.clock = clock
        self.interval_s = interval_s
        self._last = -1e18
        self._skipped = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self.clock.monotonic()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return
        self._last = now
        if self._skipped:
            message += f" ({self._skipped} similar line(s) suppressed)"
            self._skipped = 0
        self.logger.warning(message, *args)


class DeadLetters:
    """Routes the engine's dead letters to a :class:`DeadLetterSink` (or only counts
    them when there is none). ``invalid`` counts invalid events and unreadable records.

    ``kafka_conf`` (the consumer's settings) is how rejected rows' original messages are
    read back. Calls into the sink are serialised, since the flush thread and the loop
    both send.
    """

    def __init__(
        self,
        sink: DeadLetterSink | None,
        failure: FirstFailure,
        *,
        clock: Clock,
        kafka_conf: Mapping[str, Any],
        read_timeout_s: float = 10.0,
    ) -> None:
        self.sink = sink
        self.failure = failure
        self.kafka_conf = kafka_conf
        self.read_timeout_s = read_timeout_s
        self.invalid = 0
        self.misrouted = 0
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log, clock)

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    def invalid_event(
        self,
        message: Any,
        reason: str,
        position: tuple[str, int, int] | None = None,
        *,
        error_class: ErrorClass = ErrorClass.INVALID,
    ) -> None:
        """Count, log and dead-letter one message held back: an invalid one, or one of
        ``error_class`` MISROUTED (``position``: its topic, partition and offset, when
        ``message`` is a :class:`spr.dlq.SourceRecord`). An unwritable dead-letter topic
        stops the pipeline; the message's offset must not be committed."""
        if position is None:
            position = (message.topic(), message.partition(), message.offset())
        topic, partition, offset = position
        if error_class is ErrorClass.MISROUTED:
            self.misrouted += 1
        else:
            self.invalid += 1
        self._log.warning("%s event at %s[%d]@%d: %s", error_class, topic, partition, offset,
                          reason)  # fmt: skip
        sink = self.sink
        if sink is None or self.failure.failed:
            return
        try:
            with self._lock:
                sink.send(message, reason, error_class=str(error_class))
        except DeadLetterUnavailable as exc:
            self.failure.fail(exc)
            return
        log_event(
            log,
            "dlq",
            error_class=str(error_class),
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
        )

    def unreadable_record(self, topic: str, partition: int, offset: int, error: Any) -> bool:
        """A record the client could not read (bad CRC, compression...): dead-letter what
        is known of it, its position and the error. Returns True when its offset may
        move on; without dead letters the pipeline stops instead (it would be skipped
        unseen)."""
        reason = f"Kafka could not read the record: {error.str()}"
        if self.sink is None:
            self.failure.fail(
                SprError(
                    f"{topic}[{partition}]@{offset}: {reason}; dead letters are turned off, "
                    "so spr stops instead of skipping it"
                )
            )
            return False
        from spr.dlq import SourceRecord

        record = SourceRecord(topic=topic, partition=partition, offset=offset)
        self.invalid_event(record, reason, (topic, partition, offset))
        return not self.failure.failed

    def flush(self) -> None:
        """Block until every dead letter sent is durable; an error stops the pipeline
        and is raised."""
        sink = self.sink
        if sink is None:
            return
        try:
            with self._lock:
                sink.flush()
        except DeadLetterUnavailable as exc:
            self.failure.fail(exc)
            self.failure.raise_if_failed()

    def rejected_rows(self, rows: Sequence[RejectedRow]) -> None:
        """Dead-letter rows the database rejected (class DATA); runs on the flush thread,
        inside the flush's transaction, and blocks until Kafka acknowledged them all.

        The batch keeps no messages (that would cost an object per event in the hot
        loop), so the original key, value and headers are read back from Kafka by
        position; a message that is gone (retention) is rebuilt from the row: its
        partition key and payload, without headers. Raises DeadLetterUnavailable.
        """
        sink = self.sink
        assert sink is not None
        from spr.dlq import SourceRecord

        originals = self._read_back([(r.topic, r.partition, r.offset) for r in rows])
        with self._lock:
            for row in rows:
                record = originals.get((row.topic, row.partition, row.offset))
                if record is None:
                    record = SourceRecord(
                        topic=row.topic,
                        partition=row.partition,
                        offset=row.offset,
                        key=row.key,
                        value=row.value,
                    )
                reason = error_reason(row.error)
                sink.send(record, reason, error_class=str(ErrorClass.DATA))
                log_event(
                    log,
                    "dlq",
                    level=logging.WARNING,
                    error_class=str(ErrorClass.DATA),
                    topic=row.topic,
                    partition=row.partition,
                    offset=row.offset,
                    reason=reason,
                )
            sink.flush()

    def _read_back(self, positions: Sequence[tuple[str, int, int]]) -> dict[Any, Any]:
        from spr.dlq import SourceRecord

        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for topic, partition, offset in positions:
            first, last = ranges.get((topic, partition), (offset, offset))
            ranges[(topic, partition)] = (min(first, offset), max(last, offset))
        messages = read_positions(self.kafka_conf, ranges, timeout_s=self.read_timeout_s)
        wanted = set(positions)
        return {
            position: SourceRecord.from_message(message)
            for position, message in messages.items()
            if position in wanted
        }
