from __future__ import annotations

import json
import re
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py, decode
from spr.decode import DEFAULT_LIMITS, DecodeLimits, Event
from spr.errors import ConfigError, InvalidEvent

BASE = {"entity_type": "order", "entity_id": "o-1", "state": "paid"}


def enc(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def decode_ok(core: ModuleType, value: bytes, offset: int = 10, ts: int = 99) -> Event:
    event: Event = core.decode_event(value, offset=offset, timestamp_ms=ts)
    return event


def reason(core: ModuleType, value: object, limits: DecodeLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(InvalidEvent) as info:
        core.decode_event(value, offset=1, timestamp_ms=2, limits=limits)
    assert info.value.reason == str(info.value)
    return info.value.reason


def test_canonical_event(core: ModuleType) -> None:
    value = enc({**BASE, "event_id": "e-1", "sequence": 4, "timestamp": 1700, "x": [1, {}]})
    assert decode_ok(core, value) == Event("e-1", "order", "o-1", 4, "paid", 1700, value)
    assert decode_ok(core, value).payload is value


@pytest.mark.parametrize(
    ("field", "spellings"),
    [
        ("event_id", ["id", "eventId", "event_id"]),
        ("entity_type", ["entityType", "entity_type", "type", "event_type"]),
        ("entity_id", ["entityId", "entity_id"]),
        ("state", ["state", "status"]),
    ],
)
def test_string_aliases(core: ModuleType, field: str, spellings: list[str]) -> None:
    for spelling in spellings:
        obj = {k: v for k, v in BASE.items() if k != field}
        obj[spelling] = "value-" + spelling
        event = decode_ok(core, enc(obj))
        assert getattr(event, field) == "value-" + spelling


@pytest.mark.parametrize(
    ("field", "spellings"),
    [("sequence", ["sequence", "seq"]), ("timestamp_ms", ["timestamp", "ts"])],
)
def test_int_aliases(core: ModuleType, field: str, spellings: list[str]) -> None:
    for number, spelling in enumerate(spellings, start=5):
        event = decode_ok(core, enc({**BASE, spelling: number}))
        assert getattr(event, field) == number


def test_canonical_spelling_wins(core: ModuleType) -> None:
    obj = {"type": "t", "entity_type": "canonical", "entityId": "b", "entity_id": "a"}
    obj |= {"status": "s", "state": "st", "seq": 1, "sequence": 2, "ts": 3, "timestamp": 4}
    obj |= {"id": "i", "eventId": "ei", "event_id": "e"}
    assert decode_ok(core, enc(obj)) == Event("e", "canonical", "a", 2, "st", 4, enc(obj))


def test_fallbacks(core: ModuleType) -> None:
    event = decode_ok(core, enc(BASE), offset=123, ts=456)
    assert (event.sequence, event.timestamp_ms) == (123, 456)
    assert event.event_id == "order:o-1:123"
    # An empty or null event id counts as missing; null fields in general do.
    obj = {**BASE, "event_id": "", "id": None, "sequence": 7, "status": None}
    assert decode_ok(core, enc(obj)).event_id == "order:o-1:7"
    assert decode_ok(core, enc({**BASE, "eventId": "", "id": "x"})).event_id == "x"


@pytest.mark.parametrize(
    ("obj", "sequence", "given"),
    [
        ({**BASE, "sequence": 4}, 4, True),
        ({**BASE, "sequence": 0}, 0, True),
        ({**BASE, "seq": 5}, 5, True),
        ({**BASE, "sequence": None, "seq": 6}, 6, True),
        ({**BASE, "seq": None}, 10, False),
        (BASE, 10, False),
        # The canonical fast path, and a canonical value it hands on for lacking a field.
        ({"event_id": "e", **BASE, "sequence": 3, "timestamp": 1}, 3, True),
        ({"event_id": "e", **BASE, "timestamp": 1}, 10, False),
        ({"event_id": "e", **BASE, "sequence": 3}, 3, True),
    ],
)
def test_decode_with_sequence(
    core: ModuleType, obj: dict[str, Any], sequence: int, given: bool
) -> None:
    value = enc(obj)
    event, own = core.decode_with_sequence(value, offset=10, timestamp_ms=99)
    assert (event.sequence, own) == (sequence, given)
    assert type(own) is bool
    assert event == core.decode_event(value, offset=10, timestamp_ms=99)
    limits = DecodeLimits(max_bytes=len(value))
    assert core.decode_with_sequence(value, offset=10, timestamp_ms=99, limits=limits) == (
        event,
        own,
    )


def test_decode_with_sequence_raises_as_decode_event(core: ModuleType) -> None:
    for value in (None, b"[]", enc({**BASE, "seq": -1}), enc({**BASE, "state": ""})):
        expected = reason(core, value)
        with pytest.raises(InvalidEvent, match="^" + re.escape(expected) + "$"):
            core.decode_with_sequence(value, offset=1, timestamp_ms=2)
    with pytest.raises(InvalidEvent, match="over the limit of 4"):
        core.decode_with_sequence(
            enc(BASE), offset=1, timestamp_ms=2, limits=DecodeLimits(max_bytes=4)
        )


def test_losing_spellings_are_ignored(core: ModuleType) -> None:
    obj = {**BASE, "event_id": "e", "sequence": 1, "timestamp": 2}
    obj |= {"type": 3, "status": ["x"], "seq": "no", "ts": -1, "id": {}, "entityId": 1.5}
    for value in (enc(obj), enc(dict(reversed(obj.items())))):
        assert decode_ok(core, value) == Event("e", "order", "o-1", 1, "paid", 2, value)
    # Also when the canonical fast path does not apply (no event id, no sequence).
    obj = {**BASE, "type": 3, "status": ["x"], "eventId": None}
    assert decode_ok(core, enc(obj), offset=4).event_id == "order:o-1:4"


def test_unicode_and_zero(core: ModuleType) -> None:
    obj = {"entityType": "ördër", "entityId": "日本", "status": "✓", "seq": 0, "ts": 0}
    event = decode_ok(core, enc(obj))
    assert (event.entity_type, event.entity_id, event.state, event.sequence) == (
        "ördër",
        "日本",
        "✓",
        0,
    )
    assert event.timestamp_ms == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "null"),
        (b"", "empty"),
        ("{}", "not bytes"),
        (bytearray(b"{}"), "not bytes"),
        (b"\xef\xbb\xbf" + enc(BASE), "byte order mark"),
        (enc(BASE)[:-1] + b',"x":"\xff"}', "UTF-8"),
        (enc(BASE)[:-1] + b',"x":"\xed\xa0\x80"}', "UTF-8"),  # encoded surrogate
        (enc(BASE)[:-1] + b',"x":"\xc0\xaf"}', "UTF-8"),  # overlong
        (b"not json", "not valid JSON"),
        (enc(BASE) + b" x", "not valid JSON"),
        (enc(BASE)[:-1] + b',"x":NaN}', "not valid JSON"),
        (enc(BASE)[:-1] + b',"x":Infinity}', "not valid JSON"),
        (enc(BASE)[:-1] + b',"x":-Infinity}', "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"order"', "not a JSON object"),
        (b"42", "not a JSON object"),
        (b"null", "not a JSON object"),
        (enc({"entity_id": "a", "state": "s"}), "missing entity_type"),
        (enc({"entity_type": "a", "state": "s"}), "missing entity_id"),
        (enc({"entity_type": "a", "entity_id": "b"}), "missing state"),
        (enc({**BASE, "entity_type": ""}), "entity_type is empty"),
        (enc({**BASE, "entity_id": ""}), "entity_id is empty"),
        (enc({**BASE, "state": ""}), "state is empty"),
        (enc({**BASE, "entity_type": 5}), "wrong field type"),
        (enc({**BASE, "entity_id": 5}), "$.entity_id"),
        (
            enc({"type": "a", "entityId": "b", "status": ["x"]}),
            "`status` must be a string, got an array",
        ),
        (
            enc({"entityType": 1.5, "entity_id": "b", "state": "s"}),
            "`entityType` must be a string, got a number",
        ),
        (
            enc({"type": True, "entity_id": "b", "state": "s"}),
            "`type` must be a string, got a boolean",
        ),
        (enc({"event_type": {}, "entity_id": "b", "state": "s"}), "`event_type` must be a string"),
        (enc({**BASE, "entityId": None, "entity_id": None}), "missing entity_id"),
        (
            enc({"entity_type": "a", "entityId": 7, "state": "s"}),
            "`entityId` must be a string, got the integer 7",
        ),
        (enc({**BASE, "sequence": "5"}), "$.sequence"),
        (enc({**BASE, "sequence": 5.0}), "$.sequence"),
        (enc({**BASE, "sequence": True}), "$.sequence"),
        (enc({**BASE, "seq": -1}), "`seq` must be an integer from 0 to"),
        (enc({**BASE, "seq": True}), "`seq` must be an integer"),
        (enc({**BASE, "seq": 2**63}), "`seq` must be an integer"),
        (enc({**BASE, "sequence": -1}), ">= 0"),
        (enc({**BASE, "sequence": 2**63}), "$.sequence"),
        (enc({**BASE, "timestamp": "2024-01-01"}), "$.timestamp"),
        (enc({**BASE, "ts": -5}), "`ts` must be an integer"),
        (enc({**BASE, "ts": 10**17}), "`ts` must be an integer"),
        (enc({**BASE, "ts": "now"}), "`ts` must be an integer"),
        (enc({**BASE, "timestamp": -5}), "$.timestamp"),
        (enc({**BASE, "id": 12}), "`id` must be a string"),
        (enc({**BASE, "event_id": 12}), "$.event_id"),
    ],
)
def test_invalid(core: ModuleType, value: object, expected: str) -> None:
    assert expected in reason(core, value)


def test_size_limit(core: ModuleType) -> None:
    value = enc({**BASE, "pad": "x" * 100})
    limits = DecodeLimits(max_bytes=len(value))
    assert decode_ok(core, value).payload == value
    assert core.decode_event(value, offset=0, timestamp_ms=0, limits=limits).payload == value
    too_big = DecodeLimits(max_bytes=len(value) - 1)
    assert f"{len(value)} bytes" in reason(core, value, too_big)


def test_depth_limit(core: ModuleType) -> None:
    def nested(depth: int) -> bytes:
        return enc({**BASE, "x": 0})[:-2] + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    limits = DecodeLimits(max_depth=5)
    assert core.decode_event(nested(5), offset=0, timestamp_ms=0, limits=limits)
    assert "deeper than the limit of 5" in reason(core, nested(6), limits)
    assert decode_ok(core, nested(64))
    assert "deeper" in reason(core, nested(65))
    # Brackets inside strings don't count, escaped quotes don't end a string.
    value = enc({**BASE, "s": '[[[[[[["\\[{{{{{{'})
    assert core.decode_event(value, offset=0, timestamp_ms=0, limits=limits).payload == value


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_very_deep_gives_invalid_event_not_recursion_error(core: ModuleType, depth: int) -> None:
    deep = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    assert "deeper" in reason(core, deep)
    big = DecodeLimits(max_depth=10**9, max_bytes=10**9)
    # Even past the recursion limit of msgspec itself, only InvalidEvent escapes.
    reason(core, deep, big)
    reason(core, b"[" * depth, big)


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        DecodeLimits(max_bytes=0)
    with pytest.raises(ConfigError):
        DecodeLimits(max_depth=0)


def test_decode_batch(core: ModuleType) -> None:
    values = [enc(BASE), None, b"[]", enc({**BASE, "sequence": 3})]
    events, invalid = core.decode_batch(values, [5, 6, 7, 8], [50, 60, 70, 80])
    assert events[0] == Event("order:o-1:5", "order", "o-1", 5, "paid", 50, values[0])
    assert events[1] is None and events[2] is None
    assert events[3] is not None and events[3].sequence == 3
    assert [i for i, _ in invalid] == [1, 2]
    assert "null" in invalid[0][1] and "object" in invalid[1][1]
    assert core.decode_batch([], [], []) == ([], [])
    limits = DecodeLimits(max_bytes=10)
    assert core.decode_batch(values[:1], [0], [0], limits)[1][0][0] == 0
    with pytest.raises(ValueError, match="same length"):
        core.decode_batch(values, [1], [1])


def test_public_module() -> None:
    value = enc(BASE)
    assert decode.decode_event(value, offset=1, timestamp_ms=2).sequence == 1
    assert decode.decode_batch([value], [1], [2])[0][0] == _core_py.decode_event(
        value, offset=1, timestamp_ms=2
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=10,
)
fields = st.sampled_from(
    [
        *("id", "eventId", "event_id", "entityType", "entity_type", "type", "event_type"),
        *("entityId", "entity_id", "state", "status", "sequence", "seq", "timestamp", "ts"),
        "other",
    ]
)
field_values = st.one_of(
    st.text(max_size=4), st.integers(min_value=-2, max_value=2**64), st.none(), json_values
)


@settings(max_examples=400)
@given(obj=st.dictionaries(fields, field_values), offset=st.integers(0, 2**40))
def test_compiled_equals_twin_on_objects(
    compiled: ModuleType, obj: dict[str, Any], offset: int
) -> None:
    _same(compiled, enc(obj), offset)


@settings(max_examples=400)
@given(value=st.binary(max_size=80) | st.text(max_size=40).map(str.encode))
def test_compiled_equals_twin_on_bytes(compiled: ModuleType, value: bytes) -> None:
    _same(compiled, value, 0)
    _same(compiled, b'{"entity_type":"a","entity_id":"b","state":"' + value + b'"}', 0)


def _same(compiled: ModuleType, value: bytes, offset: int) -> None:
    # decode_event and decode_with_sequence, of both cores, agree.
    limits = DecodeLimits(max_depth=3)
    results = []
    for core in (_core_py, compiled):
        for decode_one in (core.decode_event, core.decode_with_sequence):
            try:
                results.append(decode_one(value, offset=offset, timestamp_ms=7, limits=limits))
            except InvalidEvent as exc:
                results.append(exc.reason)
            except Exception as exc:  # pragma: no cover - the failure we're looking for
                pytest.fail(f"{core.__name__} raised {exc!r} for {value!r}")
    assert results[0] == results[2]
    assert results[1] == results[3]
    assert msgspec.json.encode(results[0]) == msgspec.json.encode(results[2])
    if isinstance(results[1], tuple):
        assert results[1][0] == results[0]
    else:
        assert results[1] == results[0]
