"""rekey: the routing stage's core (design §10), one consume() result to output records."""

from __future__ import annotations

import hashlib
import json
from types import ModuleType
from typing import Any

import pytest
import xxhash
from confluent_kafka import KafkaError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py
from spr._event import RekeyResult, reason_unorderable
from spr.decode import decode_event
from spr.errors import InvalidEvent

TS = 1_700_000_000_000


class FakeMessage:
    """confluent_kafka.Message's methods, without its C struct (see test_ingest.py)."""

    def __init__(self, topic: str, partition: int, offset: int, value: Any,
                 error: Any = None, timestamp: int = TS) -> None:  # fmt: skip
        self._args = (topic, partition, offset, value, error, timestamp)

    def error(self) -> Any:
        return self._args[4]

    def topic(self) -> str:
        return self._args[0]

    def partition(self) -> int:
        return self._args[1]

    def offset(self) -> int:
        return self._args[2]

    def value(self) -> Any:
        return self._args[3]

    def key(self) -> Any:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1 if self._args[5] >= 0 else 0, self._args[5])


def message(topic: str, partition: int, offset: int, value: Any, *, real: bool,
            timestamp: int = TS) -> Any:  # fmt: skip
    if real:
        kind = 1 if timestamp >= 0 else 0
        return Message(topic=topic, partition=partition, offset=offset, value=value,
                       timestamp=(kind, timestamp))  # fmt: skip
    return FakeMessage(topic, partition, offset, value, timestamp=timestamp)


def enc(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def expected_record(
    routing_key: str,
    event_id: str,
    sequence: int,
    state: str,
    timestamp: int | None,
    value: bytes,
    source: tuple[str, int, int],
    outputs: int,
) -> tuple[bytes, bytes, int, list[tuple[str, bytes]]]:
    """The record, built without msgspec: the design's names and headers, the JSON as
    ``json.dumps`` writes it (which escapes exactly what msgspec escapes)."""
    entity_type, entity_id = routing_key.split(":", 1)
    head: dict[str, Any] = {"event_id": event_id, "entity_type": entity_type,
                            "entity_id": entity_id, "sequence": sequence, "state": state}  # fmt: skip
    if timestamp is not None:
        head["timestamp"] = timestamp
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    output = text[:-1].encode() + b',"payload":' + value + b"}"
    key = hashlib.sha256(routing_key.encode()).digest()[:8].hex().encode()
    topic, partition, offset = source
    headers = [
        ("idempotency-key", f"{routing_key}:{sequence}".encode()),
        ("schema-version", b"v2"),
        ("spr-source-topic", topic.encode()),
        ("spr-source-partition", str(partition).encode()),
        ("spr-source-offset", str(offset).encode()),
    ]
    return key, output, _core_py.partition_for(key, outputs), headers


def test_source_fingerprint(core: ModuleType) -> None:
    assert core.source_fingerprint("t", 3) == xxhash.xxh64_intdigest(b"t\x003")
    assert core.source_fingerprint("ü", -1) == xxhash.xxh64_intdigest("ü\x00-1".encode())
    assert core.source_fingerprint("t", 3) != core.source_fingerprint("t", 4)


@pytest.mark.parametrize("real", [False, True], ids=["methods", "message"])
def test_rekey_by_hand(core: ModuleType, real: bool) -> None:
    ring = core.IdempotencyRing(1024, 60_000)
    sources = core.SourceTable(1024, 60_000)
    names: dict[int, str] = {}
    odd = 'q"\\\n\t\x01\x7fé😀'
    values = {
        "canonical": enc({"event_id": "e-1", "entity_type": "order", "entity_id": "1",
                          "sequence": 4, "state": "paid", "timestamp": 1700, "x": [1]}),
        "alias": enc({"id": "e-2", "type": "order", "entityId": "2", "seq": 9,
                      "status": "new", "ts": 5}),
        "no_sequence": b'{ "entity_type" : "order", "entity_id": "3", "state": "s" }',
        "no_timestamp": enc({"entity_type": "order", "entity_id": "4", "state": "s",
                             "sequence": 1}),
        "odd": enc({"entity_type": "k" + odd, "entity_id": odd, "state": odd,
                    "eventId": odd, "sequence": 2}),
        "late": enc({"entity_type": "order", "entity_id": "5", "state": "s", "sequence": 1}),
        "invalid": b'{"entity_type": "order"',
    }  # fmt: skip
    error = FakeMessage("t", 0, -1, None, error=KafkaError(-185))
    if real:
        error = Message(error=KafkaError(-185))
    messages = [
        message("t", 0, 10, values["canonical"], real=real),
        error,
        message("t", 0, 11, values["alias"], real=real),
        message("t", 0, 12, values["no_sequence"], real=real),
        message("t", 0, 13, values["no_timestamp"], real=real, timestamp=-1),
        message("t", 0, 14, values["invalid"], real=real),
        message("t", 0, 15, values["canonical"], real=real),  # a duplicate
        message("t", 1, 7, values["no_sequence"], real=real),  # order:3 from t[1]
        message("u", 0, 3, values["no_sequence"], real=real),  # and from u[0]
        message("t", 0, 16, values["no_sequence"], real=real),  # t[0] again: fine
        message("t", 2, 5, values["canonical"], real=real),  # not assigned: skipped
        message("t", 1, 8, values["odd"], real=real, timestamp=-5),
        message("t", 1, 9, values["late"], real=real, timestamp=2**40),
        message("t", 1, 10, values["no_timestamp"], real=real),  # order:4:1 again
    ]
    assigned = {("t", 0), ("t", 1), ("u", 0)}
    result = core.rekey(messages, ring, sources, names, 1000, 6, assigned)
    assert isinstance(result, RekeyResult)
    assert result.errors == [error]
    with pytest.raises(InvalidEvent) as info:
        decode_event(values["invalid"], offset=14, timestamp_ms=TS)
    assert [(m.offset(), why) for m, why in result.invalid] == [(14, info.value.reason)]
    assert [(m.topic(), m.partition(), why) for m, why in result.unorderable] == [
        ("t", 1, reason_unorderable("order:3", "t[0]", "t[1]")),
        ("u", 0, reason_unorderable("order:3", "t[0]", "u[0]")),
    ]
    assert result.consumed == 12
    assert result.partition_counts == {("t", 0): 7, ("t", 1): 4, ("u", 0): 1}
    assert list(result.positions.items()) == [(("t", 0), 17), (("t", 1), 11), (("u", 0), 4)]
    assert names == {core.source_fingerprint(t, p): f"{t}[{p}]" for t, p in assigned}
    k = f"k{odd}:{odd}"
    assert result.records == [
        expected_record("order:1", "e-1", 4, "paid", 1700, values["canonical"], ("t", 0, 10), 6),
        expected_record("order:2", "e-2", 9, "new", 5, values["alias"], ("t", 0, 11), 6),
        expected_record("order:3", "order:3:12", 12, "s", TS, values["no_sequence"],
                        ("t", 0, 12), 6),
        expected_record("order:4", "order:4:1", 1, "s", None, values["no_timestamp"],
                        ("t", 0, 13), 6),
        expected_record("order:3", "order:3:16", 16, "s", TS, values["no_sequence"],
                        ("t", 0, 16), 6),
        expected_record(k, odd, 2, odd, None, values["odd"], ("t", 1, 8), 6),
        expected_record("order:5", "order:5:1", 1, "s", 2**40, values["late"], ("t", 1, 9), 6),
    ]  # fmt: skip
    assert result.duplicates == 2 and ring.lookups == 9
    assert (sources.lookups, sources.hits) == (4, 3)
    # The output's first key is event_id: spr run decodes it on its fast path.
    assert all(r[1].startswith(b'{"event_id":') for r in result.records)
    # A second batch remembers the claims; an unknown holder is named generically.
    names.clear()
    later = core.rekey([message("u", 0, 4, values["no_sequence"], real=real)], ring, sources,
                       names, 2000, 6)  # fmt: skip
    assert [why for _, why in later.unorderable] == [
        reason_unorderable("order:3", "another source partition", "u[0]")
    ]
    assert names == {core.source_fingerprint("u", 0): "u[0]"}
    assert later.positions == {("u", 0): 5}


def test_rekey_without_a_source_table(core: ModuleType) -> None:
    value = enc({"entity_type": "order", "entity_id": "3", "state": "s"})
    messages = [FakeMessage("t", p, 5, value) for p in range(3)]
    names: dict[int, str] = {}
    result = core.rekey(messages, core.IdempotencyRing(64, 1000), None, names, 0, 1)
    assert not result.unorderable and names == {}
    assert [r[2] for r in result.records] == [0]
    # All three are order:3:5 (the offset is the sequence): the ring drops two.
    assert len(result.records) == 1 and result.duplicates == 2
    assert result.positions == {("t", 0): 6, ("t", 1): 6, ("t", 2): 6}


def test_rekey_empty_and_bad_arguments(core: ModuleType) -> None:
    ring = core.IdempotencyRing(64, 1000)
    assert core.rekey([], ring, None, {}, 0, 12) == RekeyResult([], [], [], 0, 0, {}, [], {})
    for outputs in (0, -1, 2**31):
        with pytest.raises(ValueError, match="output_partitions must be between 1 and 2"):
            core.rekey([], ring, None, {}, 0, outputs)


def test_positions_follow_the_last_message(core: ModuleType) -> None:
    # Offsets as consume() hands them out; a rewind (a seek) moves the position back.
    value = enc({"entity_type": "o", "entity_id": "1", "state": "s", "sequence": 1})
    offsets = [(0, 5), (1, 2), (0, 6), (0, 3), (1, 3)]
    messages = [FakeMessage("t", p, o, value) for p, o in offsets]
    result = core.rekey(messages, core.IdempotencyRing(64, 1000), None, {}, 0, 3)
    assert list(result.positions.items()) == [(("t", 0), 4), (("t", 1), 4)]


def test_extreme_offsets_and_timestamps(core: ModuleType) -> None:
    # A sequence-less event takes its offset, whatever the client handed out.
    value = enc({"entity_type": "order", "entity_id": "3", "state": "s"})
    sources = core.SourceTable(64, 1000)
    for offset, timestamp in ((-1001, 2**63 - 1), (-(2**63), 0), (2**63 - 1, -(2**63))):
        message = FakeMessage("t", 0, offset, value, timestamp=timestamp)
        result = core.rekey([message], core.IdempotencyRing(64, 1000), sources, {}, 0, 5)
        shown = timestamp if timestamp >= 0 else None
        assert result.records == [
            expected_record("order:3", f"order:3:{offset}", offset, "s", shown, value,
                            ("t", 0, offset), 5)
        ]  # fmt: skip
        assert result.positions == {("t", 0): offset + 1}


def test_every_ascii_character_is_written_as_msgspec_writes_it(compiled: ModuleType) -> None:
    text = "".join(map(chr, range(1, 128))) + "\x00é€😀\u2028"
    value = enc({"entity_type": text, "entity_id": text, "state": text, "event_id": text,
                 "sequence": 1, "timestamp": 2})  # fmt: skip
    results = [
        impl.rekey([FakeMessage("t", 0, 0, value)], impl.IdempotencyRing(8, 10), None, {}, 0, 9)
        for impl in (_core_py, compiled)
    ]
    assert results[0] == results[1] and len(results[0].records) == 1


def test_both_cores_export_the_same_names(compiled: ModuleType) -> None:
    assert compiled.__all__ == _core_py.__all__
    for name in ("SourceTable", "decode_with_sequence", "rekey", "source_fingerprint"):
        assert name in compiled.__all__


# -- the two implementations agree on random input --------------------------------

# Every character the JSON writer treats apart (quote, backslash, the control characters)
# turns up often, next to plain ASCII and multi-byte UTF-8.
entities = st.sampled_from(["a", "b", "ü", "x" * 300]) | st.text(
    st.sampled_from(list('ab"\\\b\t\n\f\r\x00\x01\x1f\x7fé€😀'))
    | st.characters(exclude_categories=("Cs",)),
    min_size=1,
    max_size=5,
)
specs = st.lists(
    st.tuples(
        st.sampled_from(["ok", "ok", "ok", "no_seq", "no_seq", "dup", "bad_json", "error",
                         "alias", "no_ts", "bad_ts", "other_topic", "unassigned", "empty_id",
                         "tombstone", "str_value"]),
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
        topic = {"other_topic": "u", "unassigned": "v"}.get(kind, "t")
        offset = offsets.get((topic, partition), 0)
        offsets[(topic, partition)] = offset + 1
        state = f"s{seq}" if seq % 3 else entity
        obj: dict[str, Any] = {"entity_type": "order", "entity_id": entity, "state": state}
        if kind != "no_seq":
            obj["sequence"] = seq
        if kind not in ("no_ts", "bad_ts"):
            obj["timestamp"] = seq * 1000
        if kind == "alias":
            obj = {"type": "order", "entityId": entity, "seq": seq, "status": "a", "id": "i"}
        if kind == "empty_id":
            obj["event_id"] = ""
        value: Any = json.dumps(obj, ensure_ascii=seq % 2 == 0).encode()
        error = None
        if kind == "dup" and messages:
            value = messages[-1].value() or value
        elif kind == "bad_json":
            value = value[:-1]
        elif kind == "error":
            error = KafkaError(-185)
        elif kind == "tombstone":
            value = None
        elif kind == "str_value":
            value = value.decode()
        timestamp = -1 if kind == "bad_ts" else TS + offset
        messages.append(FakeMessage(topic, partition, offset, value, error, timestamp))
    return messages


def _outcome(impl: ModuleType, messages: list[Any], with_sources: bool, outputs: int) -> Any:
    ring = impl.IdempotencyRing(32, 60_000)
    sources = impl.SourceTable(16, 60_000) if with_sources else None
    names: dict[int, str] = {}
    assigned = {("t", 0), ("t", 1), ("t", 2), ("u", 0), ("u", 1)}
    half = len(messages) // 2
    results = [
        impl.rekey(messages[:half], ring, sources, names, 10, outputs, assigned),
        impl.rekey(messages[half:], ring, sources, names, 20, outputs),
    ]
    counters = (sources.lookups, sources.hits, sources.evictions) if sources else None
    return results, names, (ring.lookups, ring.hits, ring.evictions), counters


@settings(max_examples=300, deadline=None)
@given(specs, st.booleans(), st.sampled_from([1, 3, 12]))
def test_compiled_and_twin_rekey_agree(
    compiled: ModuleType, spec: Any, with_sources: bool, outputs: int
) -> None:
    messages = _messages(spec)
    fast = _outcome(compiled, messages, with_sources, outputs)
    assert fast == _outcome(_core_py, messages, with_sources, outputs)
    # Byte for byte: the headers' values are bytes, the records' keys and values too.
    for result in fast[0]:
        for key, value, _, headers in result.records:
            assert type(key) is bytes and type(value) is bytes
            assert all(type(name) is str and type(data) is bytes for name, data in headers)
