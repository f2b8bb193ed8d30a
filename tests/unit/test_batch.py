from __future__ import annotations

import struct
from datetime import datetime, timezone
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py, batch
from spr.batch import COLUMN_TYPES, STATE_COLUMNS
from spr.decode import Event
from spr.errors import ConfigError

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
TRAILER = b"\xff\xff"


def event(entity_id: str, sequence: int, state: str = "s", ts: int = 946_684_800_001) -> Event:
    payload = f'{{"id":"{entity_id}","s":{sequence}}}'.encode()
    return Event(f"e{sequence}", "order", entity_id, sequence, state, ts, payload)


def test_columns() -> None:
    assert tuple(COLUMN_TYPES) == STATE_COLUMNS
    assert COLUMN_TYPES["payload"] == "jsonb" and COLUMN_TYPES["event_ts"] == "timestamptz"
    assert batch.Batch.COPY_FORMAT == "binary"


@pytest.mark.parametrize("columns", [(), ("entity_type", "nope"), ("state", "state")])
def test_bad_columns(core: ModuleType, columns: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        core.Batch(columns)


def test_collapse_newest_sequence_then_offset(core: ModuleType) -> None:
    b = core.Batch()
    b.add(event("a", 2, "two"), "t", 0, 10)
    b.add(event("b", 1), "t", 0, 11)
    b.add(event("a", 1, "old"), "t", 0, 12)  # lower sequence: ignored
    b.add(event("a", 3, "three"), "t", 1, 5)
    b.add(event("a", 3, "three-later"), "t", 1, 7)  # tie: higher offset wins
    b.add(event("a", 3, "three-earlier"), "t", 1, 6)  # tie, lower offset: ignored
    assert (len(b), b.row_count, b.events_added) == (2, 2, 6)
    rows = b.rows()
    assert [(r[1], r[2], r[3], r[9]) for r in rows] == [
        ("a", 3, "three-later", 7),
        ("b", 1, "s", 11),
    ]
    assert b.next_offsets() == {("t", 0): 13, ("t", 1): 8}


def test_same_id_different_type_are_different_entities(core: ModuleType) -> None:
    b = core.Batch()
    b.add(event("a", 1), "t", 0, 1)
    b.add(Event("x", "user", "a", 1, "s", 0, b"{}"), "t", 0, 2)
    assert len(b) == 2


def test_next_offsets_and_advance(core: ModuleType) -> None:
    b = core.Batch()
    assert b.next_offsets() == {}
    b.advance("t", 0, 4)
    b.add(event("a", 1), "t", 0, 2)  # earlier offset never moves next offset back
    b.advance("u", 0, 0)
    b.advance("t", 3, 9)
    b.add(event("a", 1), "t", 0, 8)
    b.advance("t", 3, 1)
    assert b.next_offsets() == {("t", 0): 9, ("u", 0): 1, ("t", 3): 10}
    assert len(b) == 1 and b.events_added == 2


def test_rows_python_values(core: ModuleType) -> None:
    b = core.Batch()
    b.add(event("a", 1, ts=1_700_000_000_123), "topic", 3, 42)
    b.add(event("b", 1, ts=-1), "topic", 3, 43)
    (row_a, row_b) = b.rows()
    assert row_a == (
        "order",
        "a",
        1,
        "s",
        "e1",
        '{"id":"a","s":1}',
        datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=timezone.utc),
        "topic",
        3,
        42,
    )
    assert row_b[6] is None


def test_copy_binary_byte_exact(core: ModuleType) -> None:
    b = core.Batch()
    # 2000-01-01T00:00:00.001Z: one millisecond after PostgreSQL's epoch.
    b.add(Event("ev", "ty", "ü", 258, "st", 946_684_800_001, b'{"a":1}'), "tp", 2, 513)
    expected = (
        HEADER
        + b"\x00\x0a"
        + b"\x00\x00\x00\x02ty"
        + b"\x00\x00\x00\x02\xc3\xbc"
        + b"\x00\x00\x00\x08" + b"\x00" * 6 + b"\x01\x02"
        + b"\x00\x00\x00\x02st"
        + b"\x00\x00\x00\x02ev"
        + b"\x00\x00\x00\x08\x01" + b'{"a":1}'
        + b"\x00\x00\x00\x08" + b"\x00" * 6 + b"\x03\xe8"
        + b"\x00\x00\x00\x02tp"
        + b"\x00\x00\x00\x04\x00\x00\x00\x02"
        + b"\x00\x00\x00\x08" + b"\x00" * 6 + b"\x02\x01"
        + TRAILER
    )  # fmt: skip
    assert b.copy_data() == expected


def test_copy_subset_columns_and_null_timestamp(core: ModuleType) -> None:
    b = core.Batch(("kafka_offset", "event_ts", "entity_id"))
    b.add(event("x", 1, ts=-1), "t", 0, 7)
    b.add(event("y", 1, ts=0), "t", 0, 8)
    pg_zero = (0 - 946_684_800_000) * 1000
    expected = (
        HEADER
        + b"\x00\x03" + struct.pack(">iq", 8, 7) + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x01x"
        + b"\x00\x03" + struct.pack(">iq", 8, 8) + struct.pack(">iq", 8, pg_zero)
        + b"\x00\x00\x00\x01y"
        + TRAILER
    )  # fmt: skip
    assert b.copy_data() == expected
    assert b.rows() == [(7, None, "x"), (8, datetime(1970, 1, 1, tzinfo=timezone.utc), "y")]


def test_empty_and_clear(core: ModuleType) -> None:
    b = core.Batch()
    assert b.copy_data() == HEADER + TRAILER
    assert b.rows() == [] and b.nbytes == 0
    b.add(event("a", 1), "t", 0, 1)
    assert b.nbytes > len(event("a", 1).payload)
    b.clear()
    assert (len(b), b.events_added, b.nbytes, b.next_offsets(), b.rows()) == (0, 0, 0, {}, [])
    assert b.copy_data() == HEADER + TRAILER
    b.add(event("a", 1), "t", 0, 1)
    assert b.next_offsets() == {("t", 0): 2}


def test_nbytes_tracks_replacements(core: ModuleType) -> None:
    b = core.Batch()
    small = Event("e", "t", "a", 1, "s", 0, b"{}")
    large = Event("e", "t", "a", 2, "s", 0, b'{"pad":"' + b"x" * 1000 + b'"}')
    b.add(small, "t", 0, 0)
    before = b.nbytes
    b.add(large, "t", 0, 1)
    assert b.nbytes == before + len(large.payload) - len(small.payload)


def test_many_rows_grow(core: ModuleType) -> None:
    b = core.Batch()
    for i in range(5000):
        b.add(event(str(i % 3000), i), "t", i % 4, i)
    assert len(b) == 3000
    assert b.copy_data() == _core_py_copy(b)


def _core_py_copy(b: object) -> bytes:
    pure = _core_py.Batch()
    for i in range(5000):
        pure.add(event(str(i % 3000), i), "t", i % 4, i)
    return pure.copy_data()


def test_position_range(core: ModuleType) -> None:
    b = core.Batch()
    with pytest.raises(OverflowError):
        b.add(event("a", 1), "t", 2**31, 0)
    with pytest.raises(OverflowError):
        b.advance("t", 0, 2**63)


adds = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "ü"]),
        st.integers(0, 5),
        st.sampled_from(["t1", "t2"]),
        st.integers(0, 3),
        st.integers(0, 50),
        st.booleans(),
        st.integers(-5, 2**45),
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(operations=adds, columns=st.permutations(STATE_COLUMNS).map(lambda c: c[:7]))
def test_compiled_equals_twin(
    compiled: ModuleType,
    operations: list[tuple[str, int, str, int, int, bool, int]],
    columns: tuple[str, ...],
) -> None:
    pure, fast = _core_py.Batch(columns), compiled.Batch(columns)
    for entity_id, sequence, topic, partition, offset, is_row, ts in operations:
        for b in (pure, fast):
            if is_row:
                b.add(
                    Event("id", "ty", entity_id, sequence, "st", ts, b"[1]"),
                    topic,
                    partition,
                    offset,
                )
            else:
                b.advance(topic, partition, offset)
    assert pure.copy_data() == fast.copy_data()
    assert pure.rows() == fast.rows()
    assert pure.next_offsets() == fast.next_offsets()
    assert (pure.nbytes, pure.events_added, len(pure)) == (
        fast.nbytes,
        fast.events_added,
        len(fast),
    )
