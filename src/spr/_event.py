"""The canonical event and the fixed table columns, shared by both cores.

This module is pure Python with no spr imports, so ``spr._core`` and ``spr._core_py``
can both import it without a cycle through :mod:`spr._impl`.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

__all__ = [
    "COLUMN_TYPES",
    "DEFAULT_LIMITS",
    "STATE_COLUMNS",
    "DecodeLimits",
    "Event",
]


class Event(msgspec.Struct, frozen=True, gc=False):
    """One entity state change in canonical form (design §2).

    ``payload`` is the original JSON value, byte for byte, for the ``payload jsonb``
    column. ``timestamp_ms`` is epoch milliseconds: the producer's ``timestamp`` when
    present, otherwise the broker timestamp (a negative broker timestamp means "not
    available" and is written as NULL).
    """

    event_id: str
    entity_type: str
    entity_id: str
    sequence: int
    state: str
    timestamp_ms: int
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Bounds applied to every message before it is parsed.

    ``max_bytes`` caps the size of a value; ``max_depth`` caps the nesting of arrays and
    objects (the top-level object counts as 1). Both are checked before JSON parsing.
    """

    max_bytes: int = 1_048_576
    max_depth: int = 64

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {self.max_depth}")


DEFAULT_LIMITS = DecodeLimits()

STATE_COLUMNS: tuple[str, ...] = (
    "entity_type",
    "entity_id",
    "sequence",
    "state",
    "event_id",
    "payload",
    "event_ts",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)

COLUMN_TYPES: dict[str, str] = {
    "entity_type": "text",
    "entity_id": "text",
    "sequence": "bigint",
    "state": "text",
    "event_id": "text",
    "payload": "jsonb",
    "event_ts": "timestamptz",
    "kafka_topic": "text",
    "kafka_partition": "integer",
    "kafka_offset": "bigint",
}
