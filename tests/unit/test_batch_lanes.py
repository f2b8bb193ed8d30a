"""A batch read by lanes: every row in exactly one lane (its partition % lanes), the
compiled core and the twin byte for byte alike (the flush lanes, spr.engine.lanes)."""

from __future__ import annotations

from collections import Counter
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ingest import _messages, body, msg, specs

from spr import _core_py
from spr._event import STATE_COLUMNS

_PARTITION = STATE_COLUMNS.index("kafka_partition")


def _batch(core: ModuleType, messages: list[Any]) -> Any:
    batch = core.Batch()
    batch.ingest(messages, core.IdempotencyRing(4096, 60_000), 0)
    return batch


def _lanes(batch: Any, lanes: int) -> list[tuple[Any, ...]]:
    return [
        (batch.count_rows(lane, lanes), batch.rows(lane, lanes), batch.copy_data(lane, lanes),
         b"".join(batch.copy_chunks(200, lane, lanes)))
        for lane in range(lanes)
    ]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(specs, st.integers(1, 4))
def test_compiled_and_twin_split_lanes_alike(compiled: ModuleType, spec: Any, lanes: int) -> None:
    messages = _messages(spec)
    assert _lanes(_batch(compiled, messages), lanes) == _lanes(_batch(_core_py, messages), lanes)


@settings(max_examples=150, deadline=None)
@given(specs, st.integers(1, 4))
def test_every_row_is_in_exactly_the_lane_of_its_partition(
    compiled: ModuleType, spec: Any, lanes: int
) -> None:
    for core in (_core_py, compiled):
        batch = _batch(core, _messages(spec))
        seen: Counter[tuple[Any, ...]] = Counter()
        for lane in range(lanes):
            rows = batch.rows(lane, lanes)
            assert batch.count_rows(lane, lanes) == len(rows)
            assert all(row[_PARTITION] % lanes == lane for row in rows)
            seen.update(rows)
        assert seen == Counter(batch.rows())
        if lanes == 1:
            assert batch.copy_data(0, 1) == batch.copy_data()


@pytest.mark.parametrize("chunk_bytes", [1, 500, 1 << 20])
def test_lane_chunks_concatenate_to_the_lane_and_none_is_empty(
    core: ModuleType, chunk_bytes: int
) -> None:
    messages = [msg(i, f"e{i}", 1, partition=i % 5, value=body(f"e{i}", 1, state="s" * (i % 40)))
                for i in range(400)]  # fmt: skip
    batch = _batch(core, messages)
    header_and_trailer = len(core.Batch().copy_data())
    for lane in range(3):
        chunks = list(batch.copy_chunks(chunk_bytes, lane, 3))
        assert b"".join(chunks) == batch.copy_data(lane, 3)
        # Only the first chunk carries the header and only the last the trailer; no
        # chunk is cut without a row of the lane in it.
        assert all(len(chunk) > header_and_trailer for chunk in chunks[1:-1])
        if chunk_bytes == 1:
            assert len(chunks) == batch.count_rows(lane, 3)


@pytest.mark.parametrize(("lane", "lanes"), [(0, 0), (-1, 2), (2, 2), (5, 1)])
def test_a_lane_outside_the_lanes_is_refused(core: ModuleType, lane: int, lanes: int) -> None:
    batch = core.Batch()
    with pytest.raises(ValueError, match="lane must be in"):
        batch.count_rows(lane, lanes)
    with pytest.raises(ValueError, match="lane must be in"):
        batch.rows(lane, lanes)
    with pytest.raises(ValueError, match="lane must be in"):
        batch.copy_data(lane, lanes)
    with pytest.raises(ValueError, match="lane must be in"):
        list(batch.copy_chunks(1024, lane, lanes))
