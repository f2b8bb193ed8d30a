"""The engine's decisions with a fake consumer and a fake sink (no servers)."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from spr.clock import FakeClock
from spr.config import BackpressurePolicy, BatchPolicy, EngineConfig
from spr.engine import Backpressure, Engine, FlushFailed
from spr.routing import partition_key
from spr.sink.postgres import FlushResult


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        self._t, self._p, self._o, self._v = topic, partition, offset, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def key(self) -> bytes:
        # What spr's producer sends: the partition key of the entity (design §3).
        try:
            body = json.loads(self._v or b"")
            return partition_key(f"{body['entity_type']}:{body['entity_id']}").encode()
        except (ValueError, KeyError, TypeError):
            return b"not-an-entity"


def ev(topic: str, partition: int, offset: int, entity: str, seq: int, state: str = "s") -> Msg:
    body = {"entity_type": "order", "entity_id": entity, "sequence": seq, "state": state}
    return Msg(topic, partition, offset, json.dumps(body).encode())


def tp(topic: str, partition: int) -> Any:
    return SimpleNamespace(topic=topic, partition=partition)


class FakeConsumer:
    """Plays a script: each consume() pops one step (a list of messages, or a callable
    that gets the consumer and returns messages). An empty script stops the engine."""

    def __init__(self, script: list[Any], engine_ref: list[Engine]) -> None:
        self.script = deque(script)
        self.engine_ref = engine_ref
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[dict[tuple[str, int], int]] = []
        self.paused: set[tuple[str, int]] = set()
        self.assigned: dict[tuple[str, int], int] = {}
        self.closed = False

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        return SimpleNamespace(topics={"t": SimpleNamespace(error=None, partitions={0: 0, 1: 1})})

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        self.callbacks = callbacks

    def consume(self, num: int, timeout: float) -> list[Any]:
        if not self.script:
            self.engine_ref[0].stop()
            return []
        step = self.script.popleft()
        return step(self) if callable(step) else step

    def incremental_assign(self, parts: list[Any]) -> None:
        self.assigned.update({(p.topic, p.partition): p.offset for p in parts})

    def incremental_unassign(self, parts: list[Any]) -> None:
        for p in parts:
            self.assigned.pop((p.topic, p.partition), None)

    def pause(self, parts: list[Any]) -> None:
        self.paused |= {(p.topic, p.partition) for p in parts}

    def resume(self, parts: list[Any]) -> None:
        self.paused -= {(p.topic, p.partition) for p in parts}

    def seek(self, part: Any) -> None:
        self.seeks.append((part.topic, part.partition, part.offset))

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append({(p.topic, p.partition): p.offset for p in offsets})

    def close(self) -> None:
        if self.assigned and "on_revoke" in self.callbacks:
            self.callbacks["on_revoke"](self, [tp(t, p) for t, p in sorted(self.assigned)])
        self.closed = True


class FakeSink:
    def __init__(self, stored: dict[tuple[str, int], int] | None = None) -> None:
        self.stored = dict(stored or {})
        self.rows: dict[str, tuple[int, str]] = {}
        self.flushes: list[dict[tuple[str, int], int]] = []
        self.block = threading.Event()
        self.block.set()
        self.cancelled = threading.Event()
        self.fail: BaseException | None = None

    def connect(self) -> None: ...

    def ensure_schema(self, *, auto_create: bool) -> None: ...

    def close(self) -> None: ...

    def cancel(self) -> None:
        self.cancelled.set()
        self.block.set()

    def load_offsets(self, group: str, topics: Any) -> dict[tuple[str, int], int]:
        return dict(self.stored)

    def flush(self, batch: Any) -> FlushResult:
        self.block.wait(10)
        if self.cancelled.is_set():
            self.cancelled.clear()
            raise RuntimeError("canceling statement due to user request")
        if self.fail is not None:
            raise self.fail
        applied = 0
        for row in batch.rows():
            key, seq, state = row[1], row[2], row[3]
            if key not in self.rows or seq > self.rows[key][0]:
                self.rows[key] = (seq, state)
                applied += 1
        offsets = batch.next_offsets()
        for k, v in offsets.items():
            self.stored[k] = max(self.stored.get(k, 0), v)
        self.flushes.append(offsets)
        return FlushResult(rows=batch.row_count, applied=applied,
                           stale=batch.row_count - applied, offsets=offsets)  # fmt: skip


class FakeAdmin:
    """Answers offset look-ups as ``watermarks(keys, latest)`` says; no server."""

    def __init__(self, watermarks: Callable[[Any, bool], dict[tuple[str, int], int]]) -> None:
        self.watermarks = watermarks

    def end_offsets(self, keys: Any, *, committed_only: bool = False) -> Any:
        return self.watermarks(keys, True)

    def log_start_offsets(self, keys: Any) -> Any:
        return self.watermarks(keys, False)


def make_engine(
    script: list[Any],
    sink: FakeSink,
    *,
    watermarks: Callable[[Any, bool], dict[tuple[str, int], int]] = lambda keys, latest: {},
    **overrides: Any,
) -> tuple[Engine, FakeConsumer]:
    ref: list[Engine] = []
    consumer = FakeConsumer(script, ref)
    config = EngineConfig(
        group_id="g", topics=("t",), batch=overrides.pop("batch", BatchPolicy(max_rows=3)),
        **overrides,
    )  # fmt: skip
    admin = FakeAdmin(watermarks)
    engine = Engine(config, consumer_factory=lambda conf: consumer, sink_factory=lambda: sink,
                    admin_factory=lambda conf: admin)  # type: ignore[arg-type]  # fmt: skip
    ref.append(engine)
    return engine, consumer


def assign(*parts: tuple[str, int]) -> Callable[[FakeConsumer], list[Any]]:
    def step(consumer: FakeConsumer) -> list[Any]:
        consumer.callbacks["on_assign"](consumer, [tp(t, p) for t, p in parts])
        return []

    return step


def test_everything_is_flushed_in_order_with_duplicates_and_invalid_counted() -> None:
    sink = FakeSink(stored={("t", 1): 10})
    script = [
        assign(("t", 0), ("t", 1)),
        [ev("t", 0, 0, "a", 1), ev("t", 0, 1, "a", 2), ev("t", 1, 10, "b", 1)],
        [ev("t", 0, 2, "a", 1), Msg("t", 0, 3, b"not json"), ev("t", 1, 11, "b", 3)],
        [ev("t", 0, 4, "a", 2), ev("t", 1, 12, "b", 2), ev("t", 0, 5, "c", 1)],
    ]
    engine, consumer = make_engine(script, sink)
    stats = engine.run()
    assert consumer.assigned == {} and consumer.closed
    assert sink.stored == {("t", 0): 6, ("t", 1): 13}
    assert sink.rows == {"a": (2, "s"), "b": (3, "s"), "c": (1, "s")}
    assert stats.consumed == 9 and stats.invalid == 1
    assert stats.duplicate == 2  # a:1 and a:2 came again
    assert stats.consumed == stats.applied + stats.stale + stats.collapsed + stats.duplicate + 1
    # Kafka is committed only with offsets the database already holds.
    for committed in consumer.commits:
        for key, offset in committed.items():
            assert offset <= sink.stored[key]


def test_database_offsets_decide_where_partitions_start() -> None:
    sink = FakeSink(stored={("t", 0): 42})
    engine, consumer = make_engine([assign(("t", 0), ("t", 1))], sink)
    seen: dict[tuple[str, int], int] = {}
    original = consumer.incremental_assign

    def record(parts: list[Any]) -> None:
        seen.update({(p.topic, p.partition): p.offset for p in parts})
        original(parts)

    consumer.incremental_assign = record  # type: ignore[method-assign]
    engine.run()
    assert seen == {("t", 0): 42, ("t", 1): -2}  # -2: OFFSET_BEGINNING (auto.offset.reset)


def test_revoke_flushes_pending_work_before_returning() -> None:
    sink = FakeSink()
    at_revoke: dict[str, Any] = {}

    def revoke(consumer: FakeConsumer) -> list[Any]:
        consumer.callbacks["on_revoke"](consumer, [tp("t", 1)])
        at_revoke["stored"] = dict(sink.stored)
        # Fetched before the revoke: must be ignored, the next owner reads it.
        return [ev("t", 1, 1, "late", 1)]

    script = [assign(("t", 0), ("t", 1)), [ev("t", 0, 0, "a", 1), ev("t", 1, 0, "b", 1)], revoke]
    engine, _ = make_engine(script, sink, batch=BatchPolicy(max_rows=100, max_age_ms=60_000))
    engine.run()
    assert at_revoke["stored"] == {("t", 0): 1, ("t", 1): 1}
    assert "late" not in sink.rows


def test_lost_partitions_drop_in_flight_work_and_clear_the_ring() -> None:
    sink = FakeSink()
    sink.block.clear()  # the flush hangs until cancelled

    def lose(consumer: FakeConsumer) -> list[Any]:
        consumer.callbacks["on_lost"](consumer, [tp("t", 0)])
        sink.block.set()  # later flushes go through
        return []

    script = [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1)],
        [],  # the flush starts and blocks
        lose,
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1)],  # redelivered: not a duplicate any more
    ]
    engine, _ = make_engine(script, sink, batch=BatchPolicy(max_rows=1))

    engine.run()
    stats = engine.stats()
    assert stats.rollbacks == 1 and stats.partitions_lost == 1 and stats.duplicate == 0
    assert sink.rows == {"a": (1, "s")} and sink.stored == {("t", 0): 1}


def test_revoke_over_budget_rolls_back_and_rewinds_the_rest() -> None:
    sink = FakeSink()
    sink.block.clear()

    def revoke(consumer: FakeConsumer) -> list[Any]:
        consumer.callbacks["on_revoke"](consumer, [tp("t", 1)])
        sink.block.set()
        return [ev("t", 0, 5, "stale-fetch", 1)]  # predates the rewind: dropped

    script = [
        assign(("t", 0), ("t", 1)),
        [ev("t", 0, 0, "a", 1), ev("t", 1, 0, "b", 1)],
        [],
        revoke,
        [],
    ]
    engine, consumer = make_engine(
        script, sink, batch=BatchPolicy(max_rows=1), revoke_budget_ms=300
    )
    engine.run()
    stats = engine.stats()
    assert stats.rollbacks == 1
    assert ("t", 0, -2) in consumer.seeks  # back to where the database says
    assert "stale-fetch" not in sink.rows and sink.flushes == []


def test_a_failing_flush_stops_the_engine_and_commits_nothing() -> None:
    sink = FakeSink()
    sink.fail = ValueError("boom")
    script = [assign(("t", 0)), [ev("t", 0, 0, "a", 1)], [], [], []]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=1))
    with pytest.raises(FlushFailed, match="boom"):
        engine.run()
    assert consumer.commits == [] and sink.stored == {}


def test_max_events_stops_exactly() -> None:
    sink = FakeSink()
    script = [assign(("t", 0)), [ev("t", 0, i, f"e{i}", 1) for i in range(10)]]
    engine, _ = make_engine(script, sink, max_events=4)
    stats = engine.run()
    assert stats.consumed == 4 and sink.stored == {("t", 0): 4}


def test_backpressure_hysteresis_and_backoff() -> None:
    clock = FakeClock()
    policy = BackpressurePolicy(slow_flush_ms=50, memory_bound_bytes=1000, cool_down_ms=100,
                                max_cool_down_ms=400, resume_ratio=0.5)  # fmt: skip
    bp = Backpressure(policy, clock)
    assert not bp.update(inflight_age_s=0.01, buffered_bytes=0, batch_full=True)
    # A slow flush alone does not pause: the next batch keeps growing (group commit).
    assert not bp.update(inflight_age_s=0.06, buffered_bytes=0, batch_full=False)
    # Slow with the next batch full pauses, and the pause lasts at least the cool-down.
    assert bp.update(inflight_age_s=0.06, buffered_bytes=0, batch_full=True)
    clock.advance(0.05)
    assert bp.update(inflight_age_s=None, buffered_bytes=0, batch_full=False)
    # Still slow when the cool-down ends: it doubles, up to the maximum.
    clock.advance(0.06)
    assert bp.update(inflight_age_s=0.2, buffered_bytes=0, batch_full=True)
    assert bp.cool_down_s == pytest.approx(0.2)
    for _ in range(3):
        clock.advance(bp.cool_down_s)
        bp.update(inflight_age_s=1.0, buffered_bytes=0, batch_full=True)
    assert bp.cool_down_s == pytest.approx(0.4)
    clock.advance(0.5)
    assert not bp.update(inflight_age_s=None, buffered_bytes=0, batch_full=False)
    bp.flush_finished(0.01)
    assert bp.cool_down_s == pytest.approx(0.1)
    # Slow with buffered bytes past resume_ratio of the bound counts as full too.
    assert bp.update(inflight_age_s=0.06, buffered_bytes=600, batch_full=False)
    clock.advance(0.2)
    assert not bp.update(inflight_age_s=None, buffered_bytes=0, batch_full=False)
    bp.flush_finished(0.01)
    # Memory: pause at the bound, resume only at half of it.
    assert bp.update(inflight_age_s=None, buffered_bytes=1000, batch_full=False)
    assert bp.update(inflight_age_s=None, buffered_bytes=700, batch_full=False)
    assert not bp.update(inflight_age_s=None, buffered_bytes=500, batch_full=False)
    # A full batch behind a young flush is flow control (the engine blocks), not a pause.
    assert not bp.update(inflight_age_s=0.0, buffered_bytes=0, batch_full=True)
    assert not bp.update(inflight_age_s=None, buffered_bytes=0, batch_full=True)
