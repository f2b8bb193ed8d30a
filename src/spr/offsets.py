"""Start positions from the database, for a confluent-kafka loop of your own.

The database, not Kafka's committed offset, is the truth about what has been applied:
a flush stores the next offset of each partition in the same transaction as the rows.
When the group hands you partitions, position them at the stored offsets::

    sink = PostgresSink(dsn, group_id="orders")
    consumer.subscribe([topic], on_assign=on_assign_from_db(sink))

Partitions the database has never seen start where ``auto.offset.reset`` says:
``earliest`` (the default, as spr's engine uses) or ``latest``; ``error`` raises
ConfigError instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

from spr.errors import ConfigError
from spr.sink.postgres import PostgresSink

__all__ = ["assignment_from_db", "on_assign_from_db"]

_EARLIEST = ("earliest", "smallest", "beginning")
_LATEST = ("latest", "largest", "end")


def assignment_from_db(
    sink: PostgresSink,
    partitions: Iterable[TopicPartition],
    *,
    group: str | None = None,
    auto_offset_reset: str = "earliest",
) -> list[TopicPartition]:
    """``partitions`` positioned at the next offsets stored for ``group`` (default: the
    sink's group), ready for ``assign`` or ``incremental_assign``.

    A partition without a stored offset gets ``OFFSET_BEGINNING`` (``earliest``) or
    ``OFFSET_END`` (``latest``); with ``error`` it raises ConfigError. Blocks on one
    database query; raises ServerUnavailable or psycopg errors when it fails.
    """
    group = group or sink.group_id
    if not group:
        raise ConfigError("assignment_from_db needs a consumer group")
    reset = auto_offset_reset.lower()
    if reset not in (*_EARLIEST, *_LATEST, "error"):
        raise ConfigError(f"unknown auto.offset.reset {auto_offset_reset!r}")
    wanted = list(partitions)
    stored = sink.load_offsets(group, {p.topic for p in wanted})
    result = []
    for tp in wanted:
        offset = stored.get((tp.topic, tp.partition))
        if offset is None:
            if reset == "error":
                raise ConfigError(
                    f"no stored offset for {tp.topic}[{tp.partition}] and auto.offset.reset "
                    "is 'error'"
                )
            offset = OFFSET_BEGINNING if reset in _EARLIEST else OFFSET_END
        result.append(TopicPartition(tp.topic, tp.partition, offset))
    return result


def on_assign_from_db(
    sink: PostgresSink,
    *,
    group: str | None = None,
    incremental: bool = False,
    auto_offset_reset: str = "earliest",
) -> Callable[[Any, list[TopicPartition]], None]:
    """An ``on_assign`` callback that assigns the partitions at the database offsets.

    Pass ``incremental=True`` with the ``cooperative-sticky`` assignor or the
    ``consumer`` group protocol (it calls ``incremental_assign``), else ``assign``.
    """

    def _on_assign(consumer: Any, partitions: list[TopicPartition]) -> None:
        positioned = assignment_from_db(
            sink, partitions, group=group, auto_offset_reset=auto_offset_reset
        )
        if incremental:
            consumer.incremental_assign(positioned)
        else:
            consumer.assign(positioned)

    return _on_assign
