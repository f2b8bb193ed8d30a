"""``spr dlq list``: what a dead-letter topic holds for one source topic."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from spr.dlq.reader import DeadLetter, partitions_of, read_dead_letters, reading_consumer
from spr.dlq.record import (
    dlq_topic_for,
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
    """What ``spr dlq list`` reports about the dead letters of one source topic.

    ``by_group`` counts the letters by the consumer group that wrote them (``spr-group``;
    ``"unknown"`` for a letter without it). ``group``, when set, is the one group whose
    letters were counted; every other field then covers only those.
    """

    source_topic: str
    dlq_topic: str
    exists: bool
    total: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_partition: dict[int, PartitionSummary] = field(default_factory=dict)
    samples: list[DeadLetter] = field(default_factory=list)
    by_group: Counter[str] = field(default_factory=Counter)
    group: str | None = None


def summarize(
    *,
    bootstrap: str,
    source_topic: str,
    dlq_topic: str | None = None,
    samples: int = 3,
    timeout: float = 10.0,
    group: str | None = None,
) -> DeadLetterSummary:
    """Read the whole dead-letter topic of ``source_topic`` (without committing anything)
    and summarise the dead letters that came from it, only those written by consumer
    group ``group`` when it is given (``"unknown"`` selects letters that name no group).
    ``samples`` are picked with distinct reasons first. Blocks; raises ServerUnavailable
    when Kafka is unreachable."""
    name = dlq_topic_for(source_topic, dlq_topic)
    consumer = reading_consumer(bootstrap, "spr-dlq-list")
    try:
        partitions = partitions_of(consumer, name, bootstrap, timeout)
        summary = DeadLetterSummary(
            source_topic, name, exists=partitions is not None, group=group or None
        )
        if partitions is None:
            return summary
        spare: list[DeadLetter] = []
        reasons: set[str] = set()
        for letter in read_dead_letters(
            consumer, name, dict.fromkeys(partitions, 0), bootstrap=bootstrap, timeout=timeout
        ):
            if letter.source_topic != source_topic:
                continue
            if summary.group is not None and letter.group != summary.group:
                continue
            summary.total += 1
            summary.by_class[letter.error_class] += 1
            summary.by_group[letter.group] += 1
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
    written_by = f" from group '{summary.group}'" if summary.group is not None else ""
    lines = [
        f"{summary.total} dead letter(s) for '{summary.source_topic}'{written_by} "
        f"in '{summary.dlq_topic}'"
    ]
    if not summary.total:
        return lines[0]
    lines.append("by error class:")
    for error_class, count in sorted(summary.by_class.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {error_class:<10} {count}")
    if summary.by_group:
        lines.append("by consumer group:")
        for group, count in sorted(summary.by_group.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {group:<10} {count}")
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
