"""Batch.ingest: the fused consume -> decode -> key check -> dedup -> collapse path."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py
from spr._event import (
    MISROUTED_APPLY,
    MISROUTED_BY_SEQUENCE,
    MISROUTED_DEAD_LETTER,
    REASON_MISROUTED_HELD,
    REASON_MISROUTED_NO_SEQUENCE,
    reason_misrouted,
)
from spr.decode import decode_event
from spr.errors import InvalidEvent
from spr.routing import partition_key

TS = 1_700_000_000_000


class FakeMessage:
    """A test double with confluent_kafka.Message's methods (the compiled core reads
    real Messages through their C struct and anything else through these methods)."""

    def __init__(self, topic: str, partition: int, offset: int, value: Any, key: Any,
                 error: Any = None, timestamp: int = TS) -> None:  # fmt: skip
        self._args = (topic, partition, offset, value, key, error, timestamp)

    def error(self) -> Any:
        return self._args[5]

    def topic(self) -> str:
        return self._args[0]

    def partition(self) -> int:
        return self._args[1]

    def offset(self) -> int:
        return self._args[2]

    def value(self) -> Any:
        return self._args[3]

    def key(self) -> Any:
        return self._args[4]

    def timestamp(self) -> tuple[int, int]:
        return (1, self._args[6])


def body(entity: str, seq: int | None, state: str = "paid", **extra: Any) -> bytes:
    event: dict[str, Any] = {"entity_type": "order", "entity_id": entity, "state": state}
    if seq is not None:
        event["sequence"] = seq
    event.update(extra)
    return json.dumps(event).encode()


def key(entity: str, entity_type: str = "order") -> bytes:
    return partition_key(f"{entity_type}:{entity}").encode()


def msg(offset: int, entity: str, seq: int | None, *, partition: int = 0, topic: str = "t",
        real: bool = False, **kw: Any) -> Any:  # fmt: skip
    value = kw.pop("value", body(entity, seq))
    message_key = kw.pop("key", key(entity))
    if real:
        return Message(topic=topic, partition=partition, offset=offset, key=message_key,
                       value=value, timestamp=(1, TS))  # fmt: skip
    return FakeMessage(topic, partition, offset, value, message_key, **kw)


@pytest.mark.parametrize("real", [False, True], ids=["methods", "message"])
def test_ingest_classifies_every_message(core: ModuleType, real: bool) -> None:
    ring = core.IdempotencyRing(1024, 60_000)
    batch = core.Batch()
    error = FakeMessage("t", 0, -1, None, None, error=KafkaError(-185))
    if real:
        error = Message(error=KafkaError(-185))
    messages = [
        msg(0, "a", 1, real=real),
        msg(1, "a", 2, real=real),
        error,
        msg(2, "a", 1, real=real),  # duplicate of offset 0
        msg(3, "b", 5, real=real, value=b"not json"),
        msg(4, "c", 1, real=real, key=key("other")),
        msg(5, "d", 1, real=real, key=None),
        msg(6, "e", 3, real=real, partition=1),
        msg(7, "f", 1, real=real, partition=2),  # not assigned: skipped
        msg(8, "g", None, real=real),  # no sequence: the offset
    ]
    result = batch.ingest(messages, ring, 1000, assigned={("t", 0), ("t", 1)})
    assert result.errors == [error]
    reasons = [(m.offset(), reason) for m, reason in result.invalid]
    assert [offset for offset, _ in reasons] == [3, 4, 5]
    assert reasons[0][1].startswith("not valid JSON")
    assert reasons[1][1].startswith(f"message key {key('other').decode()!r} does not match")
    assert reasons[2][1].startswith("message has no key")
    assert result.duplicates == 1 and result.consumed == 8
    assert result.partition_counts == {("t", 0): 7, ("t", 1): 1}
    assert batch.events_added == 4
    assert batch.next_offsets() == {("t", 0): 9, ("t", 1): 7}
    rows = {r[1]: r for r in batch.rows()}
    assert set(rows) == {"a", "e", "g"}
    assert rows["a"][2] == 2 and rows["a"][4] == "order:a:2"  # event id fallback
    assert rows["g"][2] == 8 and rows["g"][9] == 8
    # Exactly what add() builds from decode_event(), byte for byte.
    reference = core.Batch()
    for offset, entity, seq, partition in ((0, "a", 1, 0), (1, "a", 2, 0), (6, "e", 3, 1),
                                           (8, "g", None, 0)):  # fmt: skip
        event = decode_event(body(entity, seq), offset=offset, timestamp_ms=TS)
        reference.add(event, "t", partition, offset)
    assert batch.copy_data() == reference.copy_data()
    assert batch.nbytes == reference.nbytes


def test_key_reasons_are_check_keys(core: ModuleType) -> None:
    event = decode_event(body("a", 1), offset=0, timestamp_ms=0)
    for message_key in (None, b"0123456789abcdef", "wrong", key("b"), b"\xff" * 50):
        with pytest.raises(InvalidEvent) as expected:
            core.check_key(message_key, event)
        result = core.Batch().ingest(
            [msg(0, "a", 1, key=message_key)], core.IdempotencyRing(16, 1000), 0
        )
        assert result.invalid[0][1] == expected.value.reason
    # A str key equal to the partition key is accepted, as check_key accepts it.
    result = core.Batch().ingest(
        [msg(0, "a", 1, key=key("a").decode())], core.IdempotencyRing(16, 1000), 0
    )
    assert not result.invalid


def test_key_check_can_be_switched_off(core: ModuleType) -> None:
    result = core.Batch().ingest(
        [msg(0, "a", 1, key=None)], core.IdempotencyRing(16, 1000), 0, check_keys=False
    )
    assert not result.invalid


def test_rows_keep_their_key_across_growth(core: ModuleType) -> None:
    # Thousands of entities force the index and the arena to grow more than once.
    batch = core.Batch()
    ring = core.IdempotencyRing(1 << 16, 60_000)
    messages = [
        msg(i, f"e{i % 5000}", 0, value=body(f"e{i % 5000}", i // 5000, state="x" * (1 + i % 40)))
        for i in range(20_000)
    ]
    result = batch.ingest(messages, ring, 0)
    assert not result.invalid and result.duplicates == 0 and len(batch) == 5000
    rows = {r[1]: r for r in batch.rows()}
    assert rows["e7"][2] == 3 and rows["e7"][3] == "x" * (1 + 15_007 % 40)


# -- misrouting (design §10) -------------------------------------------------------

N = 4


def home(entity: str, count: int = N) -> int:
    """The partition the entity's key maps to."""
    result: int = _core_py.partition_for(key(entity), count)
    return result


def misrouted_reason(entity: str, partition: int, why: str, count: int = N) -> str:
    return reason_misrouted(
        "t", partition, f"order:{entity}", key(entity).decode(), home(entity, count), count, why
    )


@pytest.mark.parametrize("real", [False, True], ids=["methods", "message"])
@pytest.mark.parametrize("check_keys", [True, False], ids=["keys", "no-keys"])
@pytest.mark.parametrize(
    "mode", [MISROUTED_BY_SEQUENCE, MISROUTED_APPLY, MISROUTED_DEAD_LETTER],
    ids=["by-sequence", "apply", "dead-letter"],
)  # fmt: skip
def test_misrouted_events(core: ModuleType, real: bool, check_keys: bool, mode: int) -> None:
    wrong = {entity: (home(entity) + 1) % N for entity in "abcdefg"}
    messages = [
        msg(10, "a", 1, partition=home("a"), real=real),  # where its key maps: applied
        msg(11, "b", 1, partition=wrong["b"], real=real),  # misrouted, its own sequence
        msg(12, "c", None, partition=wrong["c"], real=real),  # misrouted, no sequence
        msg(13, "d", 1, partition=wrong["d"], topic="u", real=real),  # topic not checked
        msg(14, "e", 1, partition=wrong["e"], real=real, value=b"{"),  # invalid first
        msg(15, "f", None, partition=home("f"), real=real),  # no sequence, routed
        msg(16, "b", 1, partition=wrong["b"], real=real),  # misrouted again (a duplicate)
        msg(17, "g", 2, partition=wrong["g"], real=real,
            value=json.dumps({"type": "order", "entityId": "g", "seq": 2,
                              "status": "x"}).encode()),  # alias names: its own sequence
    ]  # fmt: skip
    ring = core.IdempotencyRing(1024, 60_000)
    batch = core.Batch()
    result = batch.ingest(messages, ring, 0, check_keys=check_keys, partitions={"t": N},
                          on_misrouted=mode)  # fmt: skip
    assert result.misrouted == {"t": 4}
    with_sequence = {
        11: misrouted_reason("b", wrong["b"], REASON_MISROUTED_HELD),
        16: misrouted_reason("b", wrong["b"], REASON_MISROUTED_HELD),
        17: misrouted_reason("g", wrong["g"], REASON_MISROUTED_HELD),
    }
    without = {12: misrouted_reason("c", wrong["c"], REASON_MISROUTED_NO_SEQUENCE)}
    expected = {
        MISROUTED_BY_SEQUENCE: without,
        MISROUTED_APPLY: {},
        MISROUTED_DEAD_LETTER: {**with_sequence, **without},
    }[mode]
    letters = [(m.offset(), why) for m, why in result.misrouted_letters]
    assert letters == sorted(expected.items())
    assert [m.offset() for m, _ in result.invalid] == [14]
    assert result.consumed == 8
    held = {offset for offset, _ in letters}
    batched = {m.offset() for m in messages if m.offset() not in held | {14, 16}}
    assert {r[9] for r in batch.rows()} == batched
    # A held event never reaches the ring; an applied one does (16 is b's duplicate).
    assert ring.lookups == len(batched) + (16 not in held)
    assert result.duplicates == (16 not in held)
    # Every data message advances its partition, held ones too.
    next_offsets: dict[tuple[str, int], int] = {}
    for m in messages:
        next_offsets[(m.topic(), m.partition())] = max(
            next_offsets.get((m.topic(), m.partition()), 0), m.offset() + 1
        )
    assert batch.next_offsets() == next_offsets


def test_misrouting_is_checked_only_when_asked(core: ModuleType) -> None:
    wrong = (home("a") + 1) % N
    messages = [msg(0, "a", None, partition=wrong), msg(1, "b", None, partition=home("b"))]
    for partitions in (None, {}, {"t": 0}, {"u": N}):
        result = core.Batch().ingest(messages, core.IdempotencyRing(64, 1000), 0,
                                     partitions=partitions)  # fmt: skip
        assert result.misrouted == {} and result.misrouted_letters == []
    result = core.Batch().ingest(messages, core.IdempotencyRing(64, 1000), 0)
    assert (result.misrouted, result.misrouted_letters) == ({}, [])
    assert len(result) == 7
    # Another partition count moves the keys; every topic is counted by itself.
    counts = {"t": 7, "u": 5}
    messages = [msg(i, f"e{i}", None, topic=("t", "u")[i % 2], partition=i % 3)
                for i in range(40)]  # fmt: skip
    result = core.Batch().ingest(messages, core.IdempotencyRing(64, 1000), 0, partitions=counts)
    misrouted: dict[str, int] = {}
    for m in messages:
        if _core_py.partition_for(key(f"e{m.offset()}"), counts[m.topic()]) != m.partition():
            misrouted[m.topic()] = misrouted.get(m.topic(), 0) + 1
    assert list(result.misrouted.items()) == list(misrouted.items())
    assert len(result.misrouted_letters) == sum(misrouted.values())


def test_bad_partition_count(core: ModuleType) -> None:
    ring = core.IdempotencyRing(64, 1000)
    messages = [msg(0, "a", 1, value=b"{"), msg(1, "a", 1)]
    # Only an event that reaches the check raises, as partition_for would.
    result = core.Batch().ingest(messages[:1], ring, 0, partitions={"t": -1})
    assert len(result.invalid) == 1
    for count in (-1, 2**31):
        with pytest.raises(ValueError, match="num_partitions must be between 1 and 2"):
            core.Batch().ingest(messages, ring, 0, partitions={"t": count})


# -- the two implementations agree on random input --------------------------------

entities = st.sampled_from(["a", "b", "c", "ü", "x" * 300])
specs = st.lists(
    st.tuples(
        st.sampled_from(["ok", "ok", "ok", "dup", "bad_json", "bad_key", "no_key", "error",
                         "alias", "no_seq", "other_topic"]),
        entities,
        st.integers(0, 5),
        st.integers(0, 2),
    ),
    max_size=40,
)  # fmt: skip


def _messages(spec: list[tuple[str, str, int, int]]) -> list[Any]:
    messages: list[Any] = []
    offsets: dict[tuple[str, int], int] = {}
    for kind, entity, seq, partition in spec:
        topic = "u" if kind == "other_topic" else "t"
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        value = body(entity, None if kind == "no_seq" else seq, state=f"s{seq}")
        message_key: Any = key(entity)
        error = None
        if kind == "dup" and messages:
            value = messages[-1].value() or value
        elif kind == "bad_json":
            value = value[:-1]
        elif kind == "bad_key":
            message_key = key(entity + "!")
        elif kind == "no_key":
            message_key = None
        elif kind == "error":
            error = KafkaError(-185)
        elif kind == "alias":
            value = json.dumps({"type": "order", "entityId": entity, "seq": seq,
                                "status": "aliased", "ts": 5}).encode()  # fmt: skip
        messages.append(FakeMessage(topic, partition, offset, value, message_key, error=error))
    return messages


def _outcome(impl: ModuleType, messages: list[Any], **options: Any) -> tuple[Any, ...]:
    ring = impl.IdempotencyRing(64, 60_000)
    batch = impl.Batch()
    assigned = {("t", 0), ("t", 1), ("u", 0)}
    first = batch.ingest(messages[: len(messages) // 2], ring, 10, assigned, **options)
    second = batch.ingest(messages[len(messages) // 2 :], ring, 20, assigned, **options)
    return (
        [(r.errors, [(m.offset(), m.topic(), m.partition(), why) for m, why in r.invalid],
          r.duplicates, r.consumed, r.partition_counts, list(r.misrouted.items()),
          [(m.offset(), m.topic(), m.partition(), why) for m, why in r.misrouted_letters])
         for r in (first, second)],
        batch.copy_data(), batch.rows(), batch.next_offsets(), batch.nbytes,
        batch.events_added, ring.hits, ring.lookups,
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(specs)
def test_compiled_and_twin_ingest_agree(compiled: ModuleType, spec: Any) -> None:
    messages = _messages(spec)
    assert _outcome(compiled, messages) == _outcome(_core_py, messages)


@settings(max_examples=200, deadline=None)
@given(
    specs,
    st.sampled_from([{"t": 3}, {"t": 2, "u": 1}, {"u": 3, "t": 3}, {"t": 0}, {"x": 2}, None]),
    st.sampled_from([MISROUTED_BY_SEQUENCE, MISROUTED_APPLY, MISROUTED_DEAD_LETTER]),
    st.booleans(),
)
def test_compiled_and_twin_agree_on_misrouting(
    compiled: ModuleType, spec: Any, partitions: Any, mode: int, check_keys: bool
) -> None:
    messages = _messages(spec)
    options = {"partitions": partitions, "on_misrouted": mode, "check_keys": check_keys}
    assert _outcome(compiled, messages, **options) == _outcome(_core_py, messages, **options)


@pytest.mark.parametrize("chunk_bytes", [1, 500, 4096, 1 << 20])
def test_copy_chunks_concatenate_to_copy_data(core: ModuleType, chunk_bytes: int) -> None:
    batch = core.Batch()
    assert b"".join(batch.copy_chunks(chunk_bytes)) == batch.copy_data()
    messages = [msg(i, f"e{i % 300}", i, value=body(f"e{i % 300}", i, state="s" * (i % 50 + 1)))
                for i in range(1000)]  # fmt: skip
    batch.ingest(messages, core.IdempotencyRing(4096, 60_000), 0)
    chunks = list(batch.copy_chunks(chunk_bytes))
    assert b"".join(chunks) == batch.copy_data()
    if chunk_bytes <= 4096:
        assert len(chunks) > 1
    with pytest.raises(ValueError):
        list(batch.copy_chunks(0))
