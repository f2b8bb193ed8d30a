"""Inputs shared by the asv suite, the pytest-benchmark suite and the ratio report.

Everything is deterministic (seeded), so runs are comparable.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Sequence
from types import ModuleType

import msgspec

from spr import _core_py
from spr._event import Event

try:
    from spr import _core as compiled_core  # type: ignore[attr-defined, unused-ignore]
except ImportError:  # pragma: no cover
    compiled_core = None

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
