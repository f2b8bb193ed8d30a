from __future__ import annotations

from array import array
from types import ModuleType

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py, dedup
from spr.errors import ConfigError

U64 = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=300)
@given(key=st.text(st.characters(exclude_categories=("Cs",)), max_size=200) | st.binary())
def test_fingerprint_is_xxh64(compiled: ModuleType, key: str | bytes) -> None:
    data = key.encode() if isinstance(key, str) else key
    expected = xxhash.xxh64_intdigest(data)
    assert _core_py.fingerprint(key) == expected
    assert compiled.fingerprint(key) == expected


def test_event_fingerprint(core: ModuleType) -> None:
    assert core.event_fingerprint("order", "o-1", 7) == xxhash.xxh64_intdigest(b"order:o-1:7")
    assert dedup.event_fingerprint("a", "ü", 0) == xxhash.xxh64_intdigest("a:ü:0".encode())


def test_first_sight_then_duplicate(core: ModuleType) -> None:
    ring = core.IdempotencyRing(1024, 1000)
    assert ring.seen_or_add(42, 0) is False
    assert ring.seen_or_add(42, 1) is True
    assert ring.seen_or_add(43, 1) is False
    assert (ring.lookups, ring.hits, ring.evictions, len(ring)) == (3, 1, 0, 2)
    assert (ring.capacity, ring.ttl_ms) == (1024, 1000)


def test_expiry(core: ModuleType) -> None:
    ring = core.IdempotencyRing(64, 100)
    ring.seen_or_add(7, 1000)
    assert ring.seen_or_add(7, 1099) is True
    assert ring.seen_or_add(7, 1100) is False  # expired at exactly ttl, re-added at 1100
    assert ring.seen_or_add(7, 1150) is True
    assert len(ring) == 1
    ring.seen_or_add(8, 5000)
    assert len(ring) == 1  # only 8 is live at t=5000


def test_hit_does_not_refresh(core: ModuleType) -> None:
    ring = core.IdempotencyRing(64, 100)
    ring.seen_or_add(7, 0)
    assert ring.seen_or_add(7, 90) is True
    assert ring.seen_or_add(7, 100) is False


def test_time_going_backwards(core: ModuleType) -> None:
    ring = core.IdempotencyRing(64, 100)
    ring.seen_or_add(1, 1_000_000)
    # A small step back keeps the entry (|now - added| < ttl) ...
    assert ring.seen_or_add(1, 999_950) is True
    # ... a large one expires it instead of making it live until the clock catches up.
    assert ring.seen_or_add(1, 0) is False
    # The re-added entry lives around the new time only; no entry is immortal.
    assert ring.seen_or_add(1, 50) is True
    assert ring.seen_or_add(1, 1_000_000) is False
    # Never a false duplicate, whatever the clock does.
    for fp, now in enumerate((5, -(2**63), 2**63 - 1, 0, 10**12, 3), start=1000):
        assert ring.seen_or_add(fp, now) is False


def test_extreme_times_do_not_overflow(core: ModuleType) -> None:
    ring = core.IdempotencyRing(16, 2**63 - 1)
    assert ring.seen_or_add(5, -(2**63)) is False
    assert ring.seen_or_add(5, 2**63 - 1) is False  # distance 2**64-1 > ttl
    assert ring.seen_or_add(5, 2**63 - 2) is True


def test_zero_fingerprint(core: ModuleType) -> None:
    ring = core.IdempotencyRing(16, 100)
    assert ring.seen_or_add(0, 0) is False
    assert ring.seen_or_add(0, 1) is True
    assert len(ring) == 1
    # 0 is stored as the documented substitute, so that value collides with it.
    assert ring.seen_or_add(core.ZERO_FINGERPRINT_SUBSTITUTE, 1) is True


def test_full_ring_evicts_oldest_and_forgets(core: ModuleType) -> None:
    ring = core.IdempotencyRing(4, 10_000)
    for fp in range(1, 5):
        assert ring.seen_or_add(fp, fp) is False
    assert ring.evictions == 0
    assert len(ring) == 4
    assert ring.seen_or_add(100, 10) is False  # every slot live: the oldest (fp 1) goes
    assert ring.evictions == 1
    assert len(ring) == 4
    assert ring.seen_or_add(1, 11) is False  # forgotten: a duplicate gets through
    assert [ring.seen_or_add(fp, 12) for fp in (3, 4, 100, 1)] == [True, True, True, True]
    assert ring.seen_or_add(2, 13) is False


def test_capacity_one(core: ModuleType) -> None:
    ring = core.IdempotencyRing(1, 100)
    assert ring.seen_or_add(1, 0) is False
    assert ring.seen_or_add(1, 0) is True
    assert ring.seen_or_add(2, 0) is False
    assert ring.seen_or_add(1, 0) is False
    assert ring.evictions == 2


def test_collisions_within_probe_window(core: ModuleType) -> None:
    # Find PROBE_WINDOW + 1 fingerprints with the same home slot in a big ring.
    capacity = 1 << 16
    same_home = [fp for fp in range(1, 3_000_000) if _core_py._home_slot(fp, capacity) == 5]
    same_home = same_home[: core.PROBE_WINDOW + 1]
    assert len(same_home) == core.PROBE_WINDOW + 1
    ring = core.IdempotencyRing(capacity, 1000)
    for t, fp in enumerate(same_home[:-1]):
        assert ring.seen_or_add(fp, t) is False
    assert all(ring.seen_or_add(fp, 20) for fp in same_home[:-1])
    assert ring.evictions == 0
    assert ring.seen_or_add(same_home[-1], 21) is False  # window full: oldest evicted
    assert ring.evictions == 1
    # The evicted one comes back as new, and pushes out the next oldest (added at 1) ...
    assert ring.seen_or_add(same_home[0], 22) is False
    assert ring.evictions == 2
    # ... while the newest entry survives, and the one pushed out is forgotten.
    assert ring.seen_or_add(same_home[-1], 22) is True
    assert ring.seen_or_add(same_home[1], 23) is False and ring.evictions == 3


def test_wraparound_at_table_end(core: ModuleType) -> None:
    capacity = 64
    at_end = [fp for fp in range(1, 200_000) if _core_py._home_slot(fp, capacity) == capacity - 1]
    at_end = at_end[:5]
    ring = core.IdempotencyRing(capacity, 1000)
    for fp in at_end:
        assert ring.seen_or_add(fp, 0) is False
    assert all(ring.seen_or_add(fp, 1) for fp in at_end)
    assert ring.evictions == 0
    assert len(ring) == 5


def test_expired_slots_are_reused_without_eviction(core: ModuleType) -> None:
    ring = core.IdempotencyRing(8, 10)
    for fp in range(1, 9):
        ring.seen_or_add(fp, 0)
    for fp in range(11, 19):
        assert ring.seen_or_add(fp, 100) is False
    assert ring.evictions == 0
    assert len(ring) == 8


def test_clear_forgets_but_keeps_counters(core: ModuleType) -> None:
    ring = core.IdempotencyRing(32, 100)
    ring.seen_or_add(1, 0)
    ring.seen_or_add(1, 0)
    ring.clear()
    assert len(ring) == 0
    assert ring.seen_or_add(1, 0) is False
    assert (ring.lookups, ring.hits) == (3, 1)


def test_many_forms(core: ModuleType) -> None:
    fps = [5, 6, 5, 0, 0, 2**64 - 1]
    expected = [False, False, True, False, True, False]
    for form in (fps, tuple(fps), array("Q", fps), memoryview(array("Q", fps))):
        ring = core.IdempotencyRing(128, 100)
        assert ring.seen_or_add_many(form, 0) == expected
        assert ring.lookups == len(fps)
    ring = core.IdempotencyRing(128, 100)
    assert ring.seen_or_add_many(array("Q", fps).tobytes(), 0) == expected
    assert ring.seen_or_add_many(iter([5]), 1) == [True]
    assert ring.seen_or_add_many([], 1) == []
    big = array("Q", range(1, 5000))
    assert ring.seen_or_add_many(big, 2) == [i in (5, 6) for i in range(1, 5000)]


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_fingerprint_range(core: ModuleType, bad: int) -> None:
    ring = core.IdempotencyRing(8, 100)
    with pytest.raises(OverflowError):
        ring.seen_or_add(bad, 0)
    with pytest.raises(OverflowError):
        ring.seen_or_add_many([1, bad], 0)


@pytest.mark.parametrize(("capacity", "ttl"), [(0, 1), (-1, 1), (8, 0), (8, -5), (2**41, 1)])
def test_bad_settings(core: ModuleType, capacity: int, ttl: int) -> None:
    with pytest.raises(ConfigError):
        core.IdempotencyRing(capacity, ttl)


ops = st.lists(
    st.tuples(st.integers(min_value=0, max_value=40), st.integers(-300, 300)), max_size=300
)


@settings(max_examples=200)
@given(
    capacity=st.integers(min_value=1, max_value=20),
    ttl=st.integers(min_value=1, max_value=200),
    operations=ops,
)
def test_compiled_equals_twin(
    compiled: ModuleType, capacity: int, ttl: int, operations: list[tuple[int, int]]
) -> None:
    pure = _core_py.IdempotencyRing(capacity, ttl)
    fast = compiled.IdempotencyRing(capacity, ttl)
    seen: set[int] = set()
    for fp, now in operations:
        result = pure.seen_or_add(fp, now)
        assert fast.seen_or_add(fp, now) == result
        assert not result or fp in seen  # never a false duplicate
        seen.add(fp)
    assert (pure.lookups, pure.hits, pure.evictions, len(pure)) == (
        fast.lookups,
        fast.hits,
        fast.evictions,
        len(fast),
    )
    batch = [fp for fp, _ in operations]
    assert pure.seen_or_add_many(batch, 7) == fast.seen_or_add_many(array("Q", batch), 7)


def test_public_module() -> None:
    ring = dedup.IdempotencyRing(8, 10)
    assert ring.seen_or_add(dedup.fingerprint("a:b:1"), 0) is False
    assert dedup.fingerprint(b"x") == xxhash.xxh64_intdigest(b"x")
    assert dedup.PROBE_WINDOW == 8


# -- SourceTable: the ring's table with a source per entity (design §10) --------------


def test_source_table_claims(core: ModuleType) -> None:
    table = core.SourceTable(64, 100)
    assert isinstance(table, core.IdempotencyRing)
    assert table.claim(1, 7, 0) == 0  # unclaimed: 7 holds it now
    assert table.claim(1, 7, 10) == 0  # the same source
    assert table.claim(1, 8, 20) == 7  # another source: the holder, which stays
    assert table.claim(1, 7, 30) == 0
    assert table.claim(2, 8, 30) == 0
    assert (table.lookups, table.hits, table.evictions, len(table)) == (5, 3, 0, 2)
    assert (table.capacity, table.ttl_ms) == (64, 100)


def test_source_table_expiry_is_not_refreshed_by_claims(core: ModuleType) -> None:
    table = core.SourceTable(64, 100)
    assert table.claim(1, 7, 0) == 0
    assert table.claim(1, 8, 99) == 7
    assert table.claim(1, 8, 100) == 0  # expired at exactly ttl: 8 claims afresh
    assert table.claim(1, 7, 150) == 8
    assert table.claim(1, 7, -1) == 0  # far enough back in time expires it too
    assert table.claim(1, 8, 0) == 7
    assert len(table) == 1


def test_source_table_extreme_values(core: ModuleType) -> None:
    table = core.SourceTable(16, 2**63 - 1)
    top = 2**64 - 1
    assert table.claim(0, top, -(2**63)) == 0
    assert table.claim(0, 1, -(2**63)) == top
    # 0 is stored as the documented substitute, so that value shares its claim.
    assert table.claim(core.ZERO_FINGERPRINT_SUBSTITUTE, 5, -(2**63)) == top
    assert table.claim(top, 1, 2**63 - 1) == 0


def test_source_table_evicts_oldest_claim(core: ModuleType) -> None:
    table = core.SourceTable(4, 10_000)
    for entity in range(1, 5):
        assert table.claim(entity, 10 + entity, entity) == 0
    assert table.claim(100, 50, 10) == 0  # every slot live: entity 1's claim goes
    assert table.evictions == 1
    assert table.claim(1, 99, 11) == 0  # forgotten: claimed afresh (evicting entity 2)
    assert [table.claim(entity, 1, 12) for entity in (3, 4, 100, 1)] == [13, 14, 50, 99]
    assert table.claim(2, 1, 13) == 0
    assert table.evictions == 3


def test_source_table_clear_keeps_counters(core: ModuleType) -> None:
    table = core.SourceTable(32, 100)
    table.claim(1, 7, 0)
    table.claim(1, 8, 0)
    table.clear()
    assert len(table) == 0
    assert table.claim(1, 8, 0) == 0
    assert table.claim(1, 7, 0) == 8
    assert (table.lookups, table.hits) == (4, 2)


@pytest.mark.parametrize(
    ("entity", "source", "now", "message"),
    [
        (-1, 1, 0, "fingerprint must be an unsigned 64-bit int, got -1"),
        (2**64, 1, 0, f"fingerprint must be an unsigned 64-bit int, got {2**64}"),
        (1, 1, 2**63, f"now_ms must fit in a signed 64-bit int, got {2**63}"),
        (1, 1, -(2**63) - 1, f"now_ms must fit in a signed 64-bit int, got {-(2**63) - 1}"),
        (1, 0, 0, "source must be a non-zero unsigned 64-bit int, got 0"),
        (1, -3, 0, "source must be a non-zero unsigned 64-bit int, got -3"),
        (1, 2**64, 0, f"source must be a non-zero unsigned 64-bit int, got {2**64}"),
    ],
)
def test_source_table_argument_range(
    core: ModuleType, entity: int, source: int, now: int, message: str
) -> None:
    table = core.SourceTable(8, 100)
    with pytest.raises(OverflowError) as info:
        table.claim(entity, source, now)
    assert str(info.value) == message
    assert table.lookups == 0


@pytest.mark.parametrize(("capacity", "ttl"), [(0, 1), (-1, 1), (8, 0), (8, -5), (2**41, 1)])
def test_source_table_bad_settings(core: ModuleType, capacity: int, ttl: int) -> None:
    with pytest.raises(ConfigError):
        core.SourceTable(capacity, ttl)


table_ops = st.lists(
    st.tuples(
        st.sampled_from(["claim"] * 12 + ["ring", "clear"]),
        st.integers(min_value=0, max_value=30),
        st.integers(min_value=1, max_value=4) | st.just(2**64 - 1),
        st.integers(-300, 300),
    ),
    max_size=300,
)


@settings(max_examples=200)
@given(
    capacity=st.integers(min_value=1, max_value=20),
    ttl=st.integers(min_value=1, max_value=200),
    operations=table_ops,
)
def test_source_table_compiled_equals_twin(
    compiled: ModuleType, capacity: int, ttl: int, operations: list[tuple[str, int, int, int]]
) -> None:
    tables = [impl.SourceTable(capacity, ttl) for impl in (_core_py, compiled)]
    for kind, entity, source, now in operations:
        if kind == "claim":
            results = [table.claim(entity, source, now) for table in tables]
        elif kind == "ring":  # the inherited ring method works on the same table
            results = [table.seen_or_add(entity, now) for table in tables]
        else:
            results = [table.clear() for table in tables]
        assert results[0] == results[1]
    pure, fast = tables
    assert (pure.lookups, pure.hits, pure.evictions, len(pure)) == (
        fast.lookups,
        fast.hits,
        fast.evictions,
        len(fast),
    )
