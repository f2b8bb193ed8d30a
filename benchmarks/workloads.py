"""Inputs shared by the asv suite, the pytest-benchmark suite and the ratio report.

Everything is deterministic (seeded), so runs are comparable.
"""

from __future__ import annotations

import gc
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import msgspec

from spr import _core_py
from spr._event import Event
from spr._impl import compiled_core as compiled_core_or_none

compiled_core = compiled_core_or_none()

IMPLEMENTATIONS: dict[str, ModuleType] = {"python": _core_py}
if compiled_core is not None:
    IMPLEMENTATIONS["compiled"] = compiled_core

RING_TTL_MS = 60_000
RING_CAPACITY = 1 << 20


def routing_keys(n: int) -> list[str]:
    return [f"order:{i:08d}" for i in range(n)]


def fingerprints(n: int, duplicate_share: float = 0.1) -> array[int]:
    """n fingerprints of events, about ``duplicate_share`` of them redeliveries."""
    rng = random.Random(7)
    fps = array("Q", (rng.getrandbits(64) for _ in range(n)))
    for i in range(1, n):
        if rng.random() < duplicate_share:
            fps[i] = fps[rng.randrange(max(0, i - 10_000), i)]
    return fps


def dict_cache_seen_or_add(fps: Sequence[int], now_ms: int, seen: dict[int, int]) -> list[bool]:
    """The field report's cache: a dict of fingerprint -> first-seen time, checked inline."""
    ttl = RING_TTL_MS
    result = []
    append = result.append
    get = seen.get
    for fp in fps:
        t = get(fp)
        if t is not None and now_ms - t < ttl:
            append(True)
        else:
            seen[fp] = now_ms
            append(False)
    return result


def event_values(n: int, alias_every: int = 4) -> list[bytes]:
    """n JSON events of about 220 bytes in the canonical spelling, except one in
    ``alias_every`` (none when 0) that uses the other spellings."""
    rng = random.Random(11)
    values = []
    for i in range(n):
        entity = rng.randrange(100_000)
        if not alias_every or i % alias_every:
            head = (
                f'{{"event_id":"{rng.getrandbits(64):016x}-{i:08d}","entity_type":"order",'
                f'"entity_id":"order-{entity:06d}","sequence":{i},"state":"paid",'
                f'"timestamp":{1_700_000_000_000 + i}'
            )
        else:
            head = (
                f'{{"eventId":"{rng.getrandbits(64):016x}-{i:08d}","type":"order",'
                f'"entityId":"order-{entity:06d}","seq":{i},"status":"paid",'
                f'"ts":{1_700_000_000_000 + i}'
            )
        tail = (
            f',"data":{{"amount":{rng.randrange(10**6)},"currency":"EUR",'
            f'"customer":"c-{rng.randrange(10**5)}","items":[1,2,3]}}}}'
        )
        values.append((head + tail).encode())
    return values


class PlainEvent(msgspec.Struct):
    """The baseline: a bare Struct of the canonical fields, no aliases, no checks."""

    event_id: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    sequence: int | None = None
    state: str | None = None
    timestamp: int | None = None


PLAIN_DECODER = msgspec.json.Decoder(PlainEvent)


def bare_decode(values: Sequence[bytes]) -> list[PlainEvent]:
    decode = PLAIN_DECODER.decode
    return [decode(v) for v in values]


def decoded_events(n: int) -> list[Event]:
    values = event_values(n)
    events, _ = _core_py.decode_batch(values, range(n), [0] * n)
    return [e for e in events if e is not None]


def assemble(core: ModuleType, events: Sequence[Event]) -> bytes:
    """Batch assembly as the engine does it: add each event, then render the COPY data."""
    b = core.Batch()
    add = b.add
    for offset, event in enumerate(events):
        add(event, "orders", offset & 7, offset)
    data: bytes = b.copy_data()
    return data


Workload = Callable[[], object]


def consumed_messages(
    n: int, partitions: int = 12, run: int = 64, *, by_key: bool = False
) -> list[Any]:
    """n real ``confluent_kafka.Message`` objects of the ``spr bench`` workload (keys,
    5% duplicates, 2% stale events), in per-partition runs of ``run`` messages as
    ``consume()`` returns them: round robin over the partitions, or (``by_key``) each on
    the partition its key maps to, as spr's producer places them."""
    from spr.dev.loadgen import LoadSpec, generate

    spec = LoadSpec(count=n, entities=100_000, seed=3, duplicates=0.05, stale=0.02)
    events = list(generate(spec))
    by_partition: list[list[Any]] = [[] for _ in range(partitions)]
    for index, event in enumerate(events):
        where = _core_py.partition_for(event.key, partitions) if by_key else index % partitions
        by_partition[where].append(event)
    messages: list[Any] = []
    cursors = [0] * partitions
    while len(messages) < n:
        for partition in range(partitions):
            chunk = by_partition[partition][cursors[partition] : cursors[partition] + run]
            for position, event in enumerate(chunk, start=cursors[partition]):
                messages.append(
                    _message("bench", partition, position, event.key.encode(), event.value)
                )
            cursors[partition] += len(chunk)
    return messages


def _message(topic: str, partition: int, offset: int, key: bytes, value: bytes) -> Any:
    from confluent_kafka import Message

    # A str of its own per message, as confluent_kafka's consume() makes them.
    topic = "".join(topic)
    return Message(topic=topic, partition=partition, offset=offset, key=key, value=value,
                   timestamp=(1, 1_700_000_000_000 + offset))  # fmt: skip


def ingest(
    core: ModuleType,
    messages: Sequence[Any],
    chunk: int = 2_000,
    partitions: dict[str, int] | None = None,
) -> bytes:
    """The engine's path: ``Batch.ingest`` per consume()-sized chunk, then the COPY data;
    with ``partitions``, misrouted events are detected too (design §10)."""
    batch = core.Batch()
    ring = core.IdempotencyRing(RING_CAPACITY, RING_TTL_MS)
    for start in range(0, len(messages), chunk):
        batch.ingest(messages[start : start + chunk], ring, 1000, partitions=partitions)
    data: bytes = batch.copy_data()
    return data


def rekey(
    core: ModuleType, messages: Sequence[Any], chunk: int = 2_000, output_partitions: int = 12
) -> int:
    """The routing stage's path (``spr transform``): ``rekey`` per consume()-sized chunk,
    with a source table; returns the number of output records."""
    ring = core.IdempotencyRing(RING_CAPACITY, RING_TTL_MS)
    sources = core.SourceTable(RING_CAPACITY, RING_TTL_MS)
    names: dict[int, str] = {}
    records = 0
    for start in range(0, len(messages), chunk):
        result = core.rekey(
            messages[start : start + chunk], ring, sources, names, 1000, output_partitions
        )
        records += len(result.records)
    return records


def separate_steps(core: ModuleType, messages: Sequence[Any], chunk: int = 2_000) -> bytes:
    """The engine's path before the fused ingest: read each message, decode_batch,
    fingerprints, seen_or_add_many, Batch.add (no key check), then the COPY data."""
    batch = core.Batch()
    ring = core.IdempotencyRing(RING_CAPACITY, RING_TTL_MS)
    for start in range(0, len(messages), chunk):
        part = messages[start : start + chunk]
        values = [m.value() for m in part]
        offsets = [m.offset() for m in part]
        events, _ = core.decode_batch(values, offsets, [m.timestamp()[1] for m in part])
        fps = [core.event_fingerprint(e.entity_type, e.entity_id, e.sequence) for e in events]
        for m, e, seen in zip(part, events, ring.seen_or_add_many(fps, 1000), strict=True):
            if seen:
                batch.advance(m.topic(), m.partition(), m.offset())
            else:
                batch.add(e, m.topic(), m.partition(), m.offset())
    data: bytes = batch.copy_data()
    return data


@contextmanager
def frozen_inputs() -> Iterator[None]:
    """Time code as a consumer runs it: what exists now (the prepared inputs, such as
    100k Messages a consumer never holds at once) is moved out of the cyclic collector's
    sight, so that the collections the timed code triggers don't scan it. Code that
    makes container objects per item (``rekey``'s records) pays otherwise for the size
    of the workload, not for its own work."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
