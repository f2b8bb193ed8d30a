"""``spr dlq redrive``: re-produce dead letters to their source topic, once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from spr.classify import ErrorClass
from spr.config import merge_kafka_config
from spr.dlq.reader import DeadLetter, partitions_of, read_dead_letters, reading_consumer
from spr.dlq.record import (
    HEADER_REDRIVEN_FROM,
    KAFKA_LOG,
    REDRIVE_STRIPPED,
    dlq_topic_for,
    error_text,
)
from spr.dlq.writer import DLQ_PRODUCER_DEFAULTS
from spr.errors import ConfigError, DeadLetterUnavailable, ServerUnavailable


# ---------------------------------------------------------------------------- redrive
@dataclass
class RedriveReport:
    """What one ``spr dlq redrive`` did.

    ``redriven`` letters were re-produced; ``skipped`` ones were read and not
    re-produced: letters of another source topic or error class, and ``duplicates``
    (counted in ``skipped`` too), copies of a source position that was already redriven
    (several consumer groups dead-letter the same event, one letter each).
    """

    source_topic: str
    dlq_topic: str
    group: str
    redriven: int = 0
    skipped: int = 0
    duplicates: int = 0


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
    """Re-produce the dead letters of ``source_topic`` that this group has not redriven,
    each source position (topic, partition, offset) once.

    Each goes back to its source partition (or wherever the partitioner puts its key, if
    that partition no longer exists) with its original key, value and headers; spr's
    headers are replaced by ``spr-redriven-from: <dlq topic>:<partition>:<offset>``.
    ``error_class`` limits it to one class. Progress is committed as the group's offsets
    on the dead-letter topic after every ``batch_size`` dead letters are acknowledged,
    so running it again re-produces nothing twice; a crash between a delivery and its
    commit re-produces that batch once more, which the engine's sequence guard makes
    harmless.

    Several consumer groups reading one topic each dead-letter an invalid event, so one
    source position can have several letters (``spr-group`` tells them apart). Only the
    first is re-produced; the others count as ``duplicates``, also when they arrive
    after an earlier redrive sent that position: the positions this group already
    redrove are read back from the part of the dead-letter topic it has passed (so a
    redrive reads that part again, and holds one entry per redriven position).

    Blocks; raises ServerUnavailable, ConfigError (no such source topic, or a
    dead-letter topic that is the source topic) or DeadLetterUnavailable (a re-produced
    event was not acknowledged; nothing past it is committed).
    """
    if error_class is not None:
        error_class = str(ErrorClass(error_class))
    name = dlq_topic_for(source_topic, dlq_topic)
    if name == source_topic:
        raise ConfigError(
            f"the dead-letter topic of '{source_topic}' is '{source_topic}' itself; "
            "redrive reads dead letters from one topic and re-produces them to another"
        )
    group = group or redrive_group(source_topic, error_class)
    report = RedriveReport(source_topic, name, group)
    consumer = reading_consumer(bootstrap, group)
    producer: Producer | None = None
    try:
        partitions = partitions_of(consumer, name, bootstrap, timeout)
        if partitions is None:
            return report
        source_partitions = partitions_of(consumer, source_topic, bootstrap, timeout)
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

        def eligible(letter: DeadLetter) -> bool:
            return letter.source_topic == source_topic and (
                error_class is None or letter.error_class == error_class
            )

        # The positions this group redrove in earlier runs: the eligible letters before
        # its committed offsets (each position's first letter there was re-produced).
        sent: set[tuple[str, int, int]] = set()
        passed = {p: o for p, o in starts.items() if o > 0}
        if passed:
            for letter in read_dead_letters(
                consumer,
                name,
                dict.fromkeys(passed, 0),
                bootstrap=bootstrap,
                timeout=timeout,
                until=passed,
            ):
                position = letter.source_position
                if position is not None and eligible(letter):
                    sent.add(position)
        producer = Producer(
            {
                **merge_kafka_config(
                    {**DLQ_PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap},
                    producer_config or {},
                ),
                "logger": KAFKA_LOG,
            }
        )
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(error_text(error))

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
            position = letter.source_position
            if not eligible(letter):
                report.skipped += 1
            elif position is not None and position in sent:
                report.skipped += 1
                report.duplicates += 1
            else:
                if position is not None:
                    sent.add(position)
                headers = [(n, v) for n, v in letter.headers if n not in REDRIVE_STRIPPED]
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
