"""The batch (design §4, §5): the rows of one flush, collapsed to the newest event per
entity, with the next offset of each partition.

Twin of ``src/spr/_core/batch.pxi``; the rules are in the :class:`Batch` docstring. The
fused ingest is in ``ingest``, the COPY encoder in ``copy``. Pure computation: nothing
blocks.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from spr._core_py.copy import _copy_chunks, _copy_data, _event_ts_valid
from spr._core_py.ingest import _ingest
from spr._core_py.ints import _INT32_MAX, _check_int64
from spr._core_py.ring import IdempotencyRing
from spr._event import (
    DEFAULT_LIMITS,
    MISROUTED_BY_SEQUENCE,
    STATE_COLUMNS,
    DecodeLimits,
    Event,
    IngestResult,
)
from spr.errors import ConfigError

# Per buffered row, on top of the payload: the Event, its strings and the index entry.
ROW_OVERHEAD_BYTES = 160
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _python_value(column: str, event: Event, topic: str, partition: int, offset: int) -> Any:
    if column == "payload":
        return event.payload.decode("utf-8")
    if column == "event_ts":
        ts = event.timestamp_ms
        if not _event_ts_valid(ts):
            return None
        return _UNIX_EPOCH + timedelta(milliseconds=ts)
    if column == "kafka_topic":
        return topic
    if column == "kafka_partition":
        return partition
    if column == "kafka_offset":
        return offset
    return getattr(event, column)


def check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """Validate a column list against :data:`STATE_COLUMNS`; raises ConfigError."""
    result = tuple(columns)
    if not result:
        raise ConfigError("the column list is empty")
    for column in result:
        if column not in STATE_COLUMNS:
            raise ConfigError(
                f"unknown column {column!r}; expected some of {', '.join(STATE_COLUMNS)}"
            )
    if len(set(result)) != len(result):
        raise ConfigError(f"the column list repeats a column: {', '.join(result)}")
    return result


class Batch:
    """The rows of one flush, collapsed to the newest event per entity.

    ``add`` keeps, per ``(entity_type, entity_id)``, the event with the highest sequence
    (on a tie, the highest offset), so the staging data never carries a key twice
    (design §5). Both ``add`` and ``advance`` move the partition's next offset to
    ``offset + 1`` (never backwards). Rows keep the order in which their entity first
    appeared. ``COPY_FORMAT`` is ``"binary"``: it needs no escaping and no timestamp
    formatting, and measured faster to build than text. Not thread-safe.
    """

    COPY_FORMAT = "binary"

    __slots__ = ("_columns", "_events_added", "_index", "_nbytes", "_next", "_rows")

    def __init__(self, columns: Sequence[str] = STATE_COLUMNS) -> None:
        self._columns = check_columns(columns)
        self._index: dict[tuple[str, str], int] = {}
        self._rows: list[tuple[Event, str, int, int]] = []
        self._next: dict[tuple[str, int], int] = {}
        self._events_added = 0
        self._nbytes = 0

    @property
    def columns(self) -> tuple[str, ...]:
        """The staging columns, in COPY order."""
        return self._columns

    @property
    def events_added(self) -> int:
        """Events passed to ``add`` since creation or the last ``clear``."""
        return self._events_added

    @property
    def row_count(self) -> int:
        """Distinct entities buffered (the rows ``copy_data`` would write)."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the buffered rows, for the memory bound."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, event: Event, topic: str, partition: int, offset: int) -> None:
        """Buffer ``event`` read from ``topic``/``partition`` at ``offset``."""
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        _check_position(partition, offset)
        key = (event.entity_type, event.entity_id)
        index = self._index.get(key)
        if index is None:
            self._index[key] = len(self._rows)
            self._rows.append((event, topic, partition, offset))
            self._nbytes += ROW_OVERHEAD_BYTES + len(event.payload)
        else:
            old, _, _, old_offset = self._rows[index]
            if event.sequence > old.sequence or (
                event.sequence == old.sequence and offset > old_offset
            ):
                self._rows[index] = (event, topic, partition, offset)
                self._nbytes += len(event.payload) - len(old.payload)
        self._events_added += 1
        self._advance(topic, partition, offset)

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """Mark ``offset`` consumed without a row (a duplicate or a dead letter)."""
        _check_position(partition, offset)
        self._advance(topic, partition, offset)

    def ingest(
        self,
        messages: Iterable[Any],
        ring: IdempotencyRing,
        now_ms: int,
        assigned: Container[tuple[str, int]] | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        check_keys: bool = True,
        partitions: Mapping[str, int] | None = None,
        on_misrouted: int = MISROUTED_BY_SEQUENCE,
    ) -> IngestResult:
        """Take one ``consume()`` result into the batch, message by message, in order.

        A message whose ``error()`` is set is returned in ``errors`` (never data). A
        message of a partition not in ``assigned`` (when given) is skipped without a
        trace: it was fetched before a revoke, and the next owner reads it. Every other
        message is decoded (``decode_event`` with its offset and broker timestamp);
        then, when ``check_keys``, its Kafka key must be ``partition_key(entity_type:
        entity_id)`` (design §3; a missing key fails too). A message failing either is
        returned in ``invalid`` with its reason. When ``partitions`` (topic -> partition
        count) names the message's topic, a message whose partition is not
        ``partition_for(partition_key, count)`` is *misrouted* (counted per topic); as
        ``on_misrouted`` says (``MISROUTED_BY_SEQUENCE``: only when the event has no
        sequence of its own; ``MISROUTED_APPLY``: never; ``MISROUTED_DEAD_LETTER``:
        always) it is returned in ``misrouted_letters`` with its reason instead of being
        batched. The rest are looked up in ``ring``
        (fingerprint of ``entity_type:entity_id:sequence`` at ``now_ms``): a hit counts
        as a duplicate; a miss is added (collapsed like :meth:`add`). Every data message
        of an assigned partition advances its partition's next offset. Raises only on a
        bad argument (a message that is not a Kafka message, a wrong type).
        """
        return _ingest(
            self, messages, ring, now_ms, assigned, limits, check_keys, partitions, on_misrouted
        )

    def _advance(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        if self._next.get(key, -1) <= offset:
            self._next[key] = offset + 1

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """``(topic, partition) -> highest offset seen + 1``, for the offsets table."""
        return dict(self._next)

    def count_rows(self, lane: int = 0, lanes: int = 1) -> int:
        """How many rows belong to ``lane``: their partition % ``lanes`` is ``lane``."""
        return len(self._lane(lane, lanes))

    def rows(self, lane: int = 0, lanes: int = 1) -> list[tuple[Any, ...]]:
        """The collapsed rows as Python values in ``columns`` order. ``payload`` is the
        JSON text (str); ``event_ts`` an aware UTC datetime, or None when unknown. With
        ``lanes``, only the rows of ``lane`` (see :meth:`count_rows`)."""
        columns = self._columns
        return [
            tuple(_python_value(c, event, topic, partition, offset) for c in columns)
            for event, topic, partition, offset in self._lane(lane, lanes)
        ]

    def copy_data(self, lane: int = 0, lanes: int = 1) -> bytes:
        """The whole ``COPY ... FROM STDIN (FORMAT binary)`` stream for the rows:
        header, one tuple per row in ``columns`` order, trailer. With ``lanes``, only
        the rows of ``lane`` (see :meth:`count_rows`)."""
        return _copy_data(self._lane(lane, lanes), self._columns)

    def copy_chunks(
        self, chunk_bytes: int = 1 << 20, lane: int = 0, lanes: int = 1
    ) -> Iterator[bytes]:
        """``copy_data(lane, lanes)`` in pieces of about ``chunk_bytes`` (whole rows; a
        row larger than that is a piece of its own): their concatenation is
        ``copy_data(lane, lanes)``. For streaming COPY without holding the whole stream
        in memory at once."""
        # A generator: the arguments are checked on the first next(), chunk_bytes
        # first, as the compiled core does.
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        yield from _copy_chunks(self._lane(lane, lanes), self._columns, chunk_bytes)

    def _lane(self, lane: int, lanes: int) -> list[tuple[Event, str, int, int]]:
        if lanes < 1 or not 0 <= lane < lanes:
            raise ValueError(f"lane must be in [0, lanes) with lanes >= 1, got {lane} of {lanes}")
        if lanes == 1:
            return self._rows
        return [row for row in self._rows if row[2] % lanes == lane]

    def clear(self) -> None:
        """Drop every row, offset and counter; the columns stay."""
        self._index.clear()
        self._rows.clear()
        self._next.clear()
        self._events_added = 0
        self._nbytes = 0


def _check_position(partition: int, offset: int) -> None:
    if not -(2**31) <= partition <= _INT32_MAX:
        raise OverflowError(f"partition must fit in a signed 32-bit int, got {partition}")
    _check_int64(offset, "offset")
