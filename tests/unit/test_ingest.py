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


def _outcome(impl: ModuleType, messages: list[Any]) -> tuple[Any, ...]:
    ring = impl.IdempotencyRing(64, 60_000)
    batch = impl.Batch()
    first = batch.ingest(
        messages[: len(messages) // 2], ring, 10, assigned={("t", 0), ("t", 1), ("u", 0)}
    )
    second = batch.ingest(
        messages[len(messages) // 2 :], ring, 20, assigned={("t", 0), ("t", 1), ("u", 0)}
    )
    return (
        [(r.errors, [(m.offset(), m.topic(), m.partition(), why) for m, why in r.invalid],
          r.duplicates, r.consumed, r.partition_counts) for r in (first, second)],
        batch.copy_data(), batch.rows(), batch.next_offsets(), batch.nbytes,
        batch.events_added, ring.hits, ring.lookups,
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(specs)
def test_compiled_and_twin_ingest_agree(compiled: ModuleType, spec: Any) -> None:
    messages = _messages(spec)
    assert _outcome(compiled, messages) == _outcome(_core_py, messages)


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
