"""Batch assembly (design §4, §5): the rows and offsets of one flush.

A :class:`Batch` collapses each entity to its newest event (highest sequence, then
highest offset), so the merge never touches a row twice, tracks the next offset of each
partition, and renders the staging data for ``COPY ... FROM STDIN (FORMAT binary)``.
The column set comes from the table mapping (a subset of :data:`STATE_COLUMNS`), never
from the data. Pure computation: nothing blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spr._event import COLUMN_TYPES, STATE_COLUMNS
from spr._impl import core

__all__ = ["COLUMN_TYPES", "STATE_COLUMNS", "Batch"]

if TYPE_CHECKING:
    from spr._core_py import Batch as Batch
else:
    Batch = core.Batch
    """``Batch(columns=STATE_COLUMNS)``: raises ConfigError for an unknown, repeated or
    empty column list. ``add(event, topic, partition, offset)``, ``advance(topic,
    partition, offset)``, ``next_offsets()``, ``rows()``, ``copy_data()``,
    ``copy_chunks(chunk_bytes)``, ``clear()``; read-only ``columns``, ``events_added``,
    ``row_count``, ``nbytes``; ``len()`` is the row count. ``COPY_FORMAT`` is
    ``"binary"``.

    ``ingest(messages, ring, now_ms, assigned=None, limits, check_keys=True) ->
    IngestResult`` is the engine's fused path for one ``consume()`` result: errors are
    handed back, unassigned partitions skipped, each value decoded, its Kafka key checked
    against ``partition_key(entity_type:entity_id)``, its fingerprint looked up in the
    ring, and the event collapsed into the batch; invalid events come back with their
    reasons (see :meth:`spr._core_py.Batch.ingest`). The compiled batch keeps no Python
    object per row: rows are C structs whose text lives in one byte arena.
    """
