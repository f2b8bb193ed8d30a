from collections.abc import Container, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar, final

from typing_extensions import Self, disjoint_base

from spr._event import DecodeLimits, Event, IngestResult, RekeyResult

__all__ = [
    "PROBE_WINDOW",
    "ZERO_FINGERPRINT_SUBSTITUTE",
    "Batch",
    "IdempotencyRing",
    "SourceTable",
    "check_key",
    "decode_batch",
    "decode_event",
    "decode_with_sequence",
    "event_fingerprint",
    "fingerprint",
    "murmur2",
    "partition_for",
    "partition_key",
    "rekey",
    "route_many",
    "sampled_traces",
    "source_fingerprint",
    "traceparent_sampled",
]

PROBE_WINDOW: int
ZERO_FINGERPRINT_SUBSTITUTE: int

def partition_key(routing_key: str) -> str: ...
def murmur2(data: bytes) -> int: ...
def partition_for(key: str | bytes, num_partitions: int) -> int: ...
def route_many(routing_keys: Sequence[str], num_partitions: int) -> tuple[list[str], list[int]]: ...
def check_key(message_key: Any, event: Event) -> None: ...
def fingerprint(idempotency_key: str | bytes) -> int: ...
def event_fingerprint(entity_type: str, entity_id: str, sequence: int) -> int: ...

@disjoint_base
class IdempotencyRing:
    def __new__(cls, capacity: int, ttl_ms: int) -> Self: ...
    @property
    def capacity(self) -> int: ...
    @property
    def ttl_ms(self) -> int: ...
    @property
    def lookups(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...
    def seen_or_add(self, fingerprint: int, now_ms: int) -> bool: ...
    def seen_or_add_many(self, fingerprints: Iterable[int], now_ms: int) -> list[bool]: ...

@final
class SourceTable(IdempotencyRing):
    def claim(self, entity: int, source: int, now_ms: int) -> int: ...

def decode_event(
    value: bytes | None,
    *,
    offset: int,
    timestamp_ms: int,
    limits: DecodeLimits = ...,
) -> Event: ...
def decode_with_sequence(
    value: bytes | None,
    *,
    offset: int,
    timestamp_ms: int,
    limits: DecodeLimits = ...,
) -> tuple[Event, bool]: ...
def decode_batch(
    values: Sequence[bytes | None],
    offsets: Sequence[int],
    timestamps_ms: Sequence[int],
    limits: DecodeLimits = ...,
) -> tuple[list[Event | None], list[tuple[int, str]]]: ...

@final
class Batch:
    COPY_FORMAT: ClassVar[str]
    def __new__(cls, columns: Sequence[str] = ...) -> Self: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def events_added(self) -> int: ...
    @property
    def row_count(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, event: Event, topic: str, partition: int, offset: int) -> None: ...
    def advance(self, topic: str, partition: int, offset: int) -> None: ...
    def ingest(
        self,
        messages: Iterable[Any],
        ring: IdempotencyRing,
        now_ms: int,
        assigned: Container[tuple[str, int]] | None = ...,
        limits: DecodeLimits = ...,
        check_keys: bool = ...,
        partitions: Mapping[str, int] | None = ...,
        on_misrouted: int = ...,
    ) -> IngestResult: ...
    def next_offsets(self) -> dict[tuple[str, int], int]: ...
    def rows(self) -> list[tuple[Any, ...]]: ...
    def copy_data(self) -> bytes: ...
    def copy_chunks(self, chunk_bytes: int = ...) -> Iterator[bytes]: ...
    def clear(self) -> None: ...

def source_fingerprint(topic: str, partition: int) -> int: ...
def rekey(
    messages: Iterable[Any],
    ring: IdempotencyRing,
    sources: SourceTable | None,
    source_names: MutableMapping[int, str],
    now_ms: int,
    output_partitions: int,
    assigned: Container[tuple[str, int]] | None = ...,
    limits: DecodeLimits = ...,
) -> RekeyResult: ...
def traceparent_sampled(value: bytes | str | None) -> bool: ...
def sampled_traces(
    messages: Sequence[Any], cap: int
) -> list[tuple[bytes, bytes | None, str, int, int]]: ...
