"""Checking a contender's table against the state the events must produce.

The expected state comes from :func:`spr.dev.loadgen.expected_state` (or the producer's
manifest): for every entity, the newest ``sequence`` with its ``state`` and ``event_id``.
:func:`compare` sorts every discrepancy into one of three effects, each of which must be
0 for a run to pass:

``lost``
    An expected effect is not in the table: the entity has no row (``missing``), or its
    row holds an older sequence than expected (``older``: the newest event was never
    applied, or an older event overwrote it, e.g. a stale event applied without a
    sequence guard).
``wrong``
    The row has the expected sequence but not its content (``mismatched``: another
    ``state`` or ``event_id``).
``duplicated``
    Effects that no event of this run explains: more than one row for an entity
    (``extra_rows``), rows for entities that were never produced (``unexpected``), and
    rows with a newer sequence than any produced event of that entity (``newer``).

Pure comparison, plus :func:`fetch_rows` and :func:`expected_from_topic` which block on
PostgreSQL and Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ExpectedEntity",
    "Verification",
    "compare",
    "expected_from_topic",
    "fetch_rows",
    "stored_offsets",
]

# (sequence, state, event_id) per "entity_type:entity_id".
ExpectedEntity = Mapping[str, Any]
_EXAMPLES = 5


@dataclass(frozen=True, kw_only=True)
class Verification:
    """The outcome of one comparison; ``ok`` when lost, wrong and duplicated are all 0."""

    expected_entities: int
    rows: int
    lost: int
    wrong: int
    duplicated: int
    missing: int
    older: int
    mismatched: int
    extra_rows: int
    unexpected: int
    newer: int
    examples: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0 and self.duplicated == 0

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["examples"] = list(self.examples)
        document["ok"] = self.ok
        return document


def compare(
    expected: Mapping[str, ExpectedEntity],
    rows: Iterable[tuple[str, str, int | None, str | None, str | None]],
) -> Verification:
    """Compare ``rows`` (entity_type, entity_id, sequence, state, event_id) with
    ``expected`` (``{"type:id": {"sequence", "state", "event_id"}}``). Never raises on
    bad data: a NULL sequence counts as older than any expected one."""
    seen: dict[str, tuple[int, str | None, str | None]] = {}
    extra_rows = unexpected = 0
    count = 0
    examples: list[str] = []

    def example(text: str) -> None:
        if len(examples) < _EXAMPLES:
            examples.append(text)

    for entity_type, entity_id, sequence, state, event_id in rows:
        count += 1
        key = f"{entity_type}:{entity_id}"
        if key not in expected:
            unexpected += 1
            example(f"{key}: not produced")
            continue
        row = (-1 if sequence is None else int(sequence), state, event_id)
        previous = seen.get(key)
        if previous is not None:
            extra_rows += 1
            example(f"{key}: more than one row")
            # Judge the entity by its newest row; the others are counted above.
            if row[0] <= previous[0]:
                continue
        seen[key] = row
    missing = older = mismatched = newer = 0
    for key, want in expected.items():
        got = seen.get(key)
        if got is None:
            missing += 1
            example(f"{key}: no row")
            continue
        want_sequence = int(want["sequence"])
        if got[0] < want_sequence:
            older += 1
            example(f"{key}: sequence {got[0]} < expected {want_sequence}")
        elif got[0] > want_sequence:
            newer += 1
            example(f"{key}: sequence {got[0]} > expected {want_sequence}")
        elif got[1] != want["state"] or got[2] != want["event_id"]:
            mismatched += 1
            example(
                f"{key}: state/event_id {got[1]}/{got[2]} != {want['state']}/{want['event_id']}"
            )
    return Verification(
        expected_entities=len(expected),
        rows=count,
        lost=missing + older,
        wrong=mismatched,
        duplicated=extra_rows + unexpected + newer,
        missing=missing,
        older=older,
        mismatched=mismatched,
        extra_rows=extra_rows,
        unexpected=unexpected,
        newer=newer,
        examples=tuple(examples),
    )


def fetch_rows(dsn: str, table: str) -> list[tuple[str, str, int | None, str | None, str | None]]:
    """Every row of ``table`` as (entity_type, entity_id, sequence, state, event_id).
    Blocks; raises psycopg errors (a missing table raises UndefinedTable)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        query = sql.SQL(
            "SELECT entity_type::text, entity_id::text, sequence::bigint, state::text, "
            "event_id::text FROM {}"
        ).format(sql.Identifier(table))
        return [(str(r[0]), str(r[1]), r[2], r[3], r[4]) for r in conn.execute(query).fetchall()]


def expected_from_topic(
    bootstrap: str, topic: str, stop_offsets: Mapping[int, int], *, timeout_s: float = 60.0
) -> dict[str, dict[str, Any]]:
    """The expected state of the messages of ``topic`` below ``stop_offsets`` (partition ->
    next offset), for a contender that consumed only part of the topic. Reads those
    messages again from the start of each partition (blocks, at most ``timeout_s``) and
    decodes them with :func:`spr.decode.decode_event`; invalid ones are ignored."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    from spr.decode import decode_event
    from spr.errors import InvalidEvent

    newest: dict[str, tuple[int, str, str]] = {}
    remaining = {p: n for p, n in stop_offsets.items() if n > 0}
    if not remaining:
        return {}
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "spr-bench-verify",
            "enable.auto.commit": "false",
            "enable.partition.eof": "false",
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, -2) for p in remaining])
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            messages: list[Any] = consumer.consume(5_000, 0.5)
            for message in messages:
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                stop = remaining.get(partition)
                if stop is None or offset >= stop:
                    continue
                if offset == stop - 1:
                    del remaining[partition]
                try:
                    event = decode_event(
                        message.value(), offset=offset, timestamp_ms=message.timestamp()[1]
                    )
                except InvalidEvent:
                    continue
                key = f"{event.entity_type}:{event.entity_id}"
                current = newest.get(key)
                if current is None or event.sequence > current[0]:
                    newest[key] = (event.sequence, event.state, event.event_id)
        if remaining:
            raise TimeoutError(f"could not re-read {topic} within {timeout_s:g} s")
    finally:
        consumer.close()
    return {
        key: {"sequence": seq, "state": state, "event_id": event_id}
        for key, (seq, state, event_id) in newest.items()
    }


def stored_offsets(dsn: str, table: str, group: str, topic: str) -> dict[int, int]:
    """The next offsets ``group`` stored for ``topic`` in the offsets ``table``."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT partition, next_offset FROM {} WHERE group_id = %s AND topic = %s"
            ).format(sql.Identifier(table)),
            (group, topic),
        ).fetchall()
    return {int(p): int(o) for p, o in rows}
