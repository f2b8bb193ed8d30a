"""Producer configuration merge and event encoding, and the load generator's pure logic.

No servers: everything here is computed locally.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from spr.cli.options import parse_kafka_overrides
from spr.decode import Event, decode_event
from spr.dev.loadgen import (
    STATES,
    LoadSpec,
    Manifest,
    expected_state,
    generate,
)
from spr.errors import ConfigError, InvalidEvent
from spr.producer import (
    PRODUCER_DEFAULTS,
    _event_value,
    _mapping_value,
    idempotency_key,
    merge_producer_config,
)
from spr.routing import partition_key

# ------------------------------------------------------------------ config merge


def test_defaults_are_the_design_contract() -> None:
    config = merge_producer_config("127.0.0.1:9092")
    assert config == {
        "bootstrap.servers": "127.0.0.1:9092",
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": "lz4",
        "linger.ms": 5,
        "partitioner": "murmur2_random",
    }


def test_user_keys_win_over_defaults_and_bootstrap() -> None:
    overrides = {
        "linger.ms": 50,
        "compression.type": "zstd",
        "bootstrap.servers": "kafka:9093",
        "client.id": "billing",
    }
    config = merge_producer_config("127.0.0.1:9092", overrides)
    assert config["linger.ms"] == 50
    assert config["compression.type"] == "zstd"
    assert config["bootstrap.servers"] == "kafka:9093"
    assert config["client.id"] == "billing"
    # Keys the user did not touch keep spr's defaults.
    assert config["acks"] == "all"
    assert config["partitioner"] == "murmur2_random"


def test_merge_neither_mutates_its_inputs_nor_the_defaults() -> None:
    overrides = {"acks": "1"}
    before = dict(PRODUCER_DEFAULTS)
    config = merge_producer_config("b:1", overrides)
    config["linger.ms"] = 999
    assert overrides == {"acks": "1"}
    assert dict(PRODUCER_DEFAULTS) == before


@pytest.mark.parametrize("key", ["on_delivery", "error_cb", "logger"])
def test_reserved_callback_keys_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        merge_producer_config("b:1", {key: print})


def test_cli_overrides_parse_key_value() -> None:
    assert parse_kafka_overrides(["linger.ms=20", " acks = 1 "]) == {"linger.ms": "20", "acks": "1"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_kafka_overrides(["linger.ms"])


# ------------------------------------------------------------------ event encoding


def test_idempotency_key_includes_the_sequence() -> None:
    assert idempotency_key("order", "42", 7) == "order:42:7"


def test_event_with_payload_is_sent_verbatim() -> None:
    raw = b'{"id":"e1","type":"order","entityId":"42","seq":3,"status":"paid"}'
    event = decode_event(raw, offset=0, timestamp_ms=1)
    assert _event_value(event) == raw


def test_event_without_payload_gets_canonical_json_that_decodes_back() -> None:
    event = Event(
        event_id="e1",
        entity_type="order",
        entity_id="42",
        sequence=3,
        state="paid",
        timestamp_ms=1_700_000_000_000,
        payload=b"",
    )
    decoded = decode_event(_event_value(event), offset=99, timestamp_ms=5)
    assert (decoded.event_id, decoded.entity_type, decoded.entity_id) == ("e1", "order", "42")
    assert (decoded.sequence, decoded.state, decoded.timestamp_ms) == (3, "paid", 1_700_000_000_000)


def test_mapping_is_encoded_with_wire_timestamp_name() -> None:
    value = _mapping_value(
        {
            "entity_type": "order",
            "entity_id": "42",
            "sequence": 1,
            "state": "new",
            "timestamp_ms": 123,
            "payload": {"amount": 10},
        }
    )
    assert json.loads(value) == {
        "entity_type": "order",
        "entity_id": "42",
        "sequence": 1,
        "state": "new",
        "timestamp": 123,
        "payload": {"amount": 10},
    }
    assert decode_event(value, offset=0, timestamp_ms=0).timestamp_ms == 123


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"entity_id": "1", "sequence": 1, "state": "s"}, "entity_type"),
        ({"entity_type": "t", "sequence": 1, "state": "s"}, "entity_id"),
        ({"entity_type": "t", "entity_id": "1", "state": "s"}, "sequence"),
        ({"entity_type": "t", "entity_id": "1", "sequence": 1}, "state"),
        ({"entity_type": "t", "entity_id": "1", "sequence": 1, "state": ""}, "state"),
        (
            {"entity_type": "t", "entity_id": "1", "sequence": 1, "state": "s", "x": object()},
            "JSON",
        ),
    ],
)
def test_malformed_mappings_are_invalid_events(event: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        _mapping_value(event)


# ------------------------------------------------------------------ load spec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": -1},
        {"count": 1, "entities": 0},
        {"count": 1, "duplicates": 1.5},
        {"count": 1, "stale": -0.1},
        {"count": 1, "aliases": 2.0},
        {"count": 1, "duplicates": 0.5, "stale": 0.3},
        {"count": 1, "value_size": -1},
        {"count": 1, "entity_types": ()},
        {"count": 1, "entity_types": ("a:b",)},
        {"count": 11, "entities": 10, "one_per_entity": True},
        {"count": 5, "entities": 10, "duplicates": 0.1, "one_per_entity": True},
    ],
)
def test_load_spec_is_validated_on_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LoadSpec(**kwargs)  # type: ignore[arg-type]


def test_load_spec_is_frozen() -> None:
    spec = LoadSpec(count=1)
    with pytest.raises(AttributeError):
        spec.count = 2  # type: ignore[misc]


# ------------------------------------------------------------------ generator

MIXED = LoadSpec(count=20_000, entities=300, seed=11, duplicates=0.05, stale=0.05, aliases=0.3)


def test_same_seed_gives_the_same_events_in_the_same_order() -> None:
    assert list(generate(MIXED)) == list(generate(MIXED))


def test_another_seed_gives_other_events() -> None:
    other = LoadSpec(**{**MIXED.__dict__, "seed": 12})
    first = [e.value for e in itertools.islice(generate(MIXED), 200)]
    second = [e.value for e in itertools.islice(generate(other), 200)]
    assert first != second


@pytest.mark.parametrize("count", [0, 1, 2, 3, 1001])
def test_exactly_count_messages(count: int) -> None:
    spec = LoadSpec(count=count, entities=5, seed=1, duplicates=0.2, stale=0.3)
    assert sum(1 for _ in generate(spec)) == count


@pytest.mark.parametrize("entities", [1, 7, 1_000_003, 20_000])
def test_one_per_entity_gives_every_entity_one_new_event_in_a_scrambled_order(
    entities: int,
) -> None:
    count = min(entities, 20_000)
    events = list(generate(LoadSpec(count=count, entities=entities, one_per_entity=True)))
    assert len(events) == count and {e.kind for e in events} == {"new"}
    assert len({e.entity_id for e in events}) == count and {e.sequence for e in events} == {1}
    if count > 100:
        ids = [e.entity_id for e in events[:100]]
        assert ids != sorted(ids)


def test_fractions_are_roughly_what_was_asked() -> None:
    kinds = Counter(e.kind for e in generate(MIXED))
    assert sum(kinds.values()) == MIXED.count
    for kind, fraction in (("duplicate", MIXED.duplicates), ("stale", MIXED.stale)):
        assert abs(kinds[kind] / MIXED.count - fraction) < 0.01, kinds
    distinct = [e for e in generate(MIXED) if e.kind != "duplicate"]
    aliased = sum(1 for e in distinct if not e.value.startswith(b'{"event_id"'))
    assert abs(aliased / len(distinct) - MIXED.aliases) < 0.02


def test_no_mixing_means_only_new_events_in_sequence_order() -> None:
    spec = LoadSpec(count=5_000, entities=40, seed=3)
    last: dict[tuple[str, str], int] = {}
    for event in generate(spec):
        assert event.kind == "new"
        entity = (event.entity_type, event.entity_id)
        assert event.sequence == last.get(entity, 0) + 1
        last[entity] = event.sequence


def test_every_message_decodes_to_its_declared_identity() -> None:
    for event in generate(MIXED):
        decoded = decode_event(event.value, offset=0, timestamp_ms=0)
        assert decoded.entity_type == event.entity_type
        assert decoded.entity_id == event.entity_id
        assert decoded.sequence == event.sequence
        assert decoded.state == event.state
        assert decoded.event_id == event.event_id
        assert event.key == partition_key(f"{event.entity_type}:{event.entity_id}")


def test_all_alias_spellings_of_design_section_2_appear() -> None:
    spec = LoadSpec(count=2_000, entities=20, seed=5, aliases=1.0)
    names: set[str] = set()
    for event in generate(spec):
        names.update(json.loads(event.value))
    assert {"id", "eventId", "entityType", "type", "event_type"} <= names
    assert {"entityId", "status", "seq", "ts", "payload"} <= names
    assert not {"event_id", "entity_type", "entity_id", "state", "sequence"} & names


def test_duplicates_are_identical_republications_of_earlier_messages() -> None:
    seen: set[bytes] = set()
    duplicates = 0
    for event in generate(MIXED):
        if event.kind == "duplicate":
            assert event.value in seen
            duplicates += 1
        else:
            assert event.value not in seen
            seen.add(event.value)
    assert duplicates > 0


def test_stale_events_arrive_after_a_newer_sequence_of_their_entity() -> None:
    newest: dict[tuple[str, str], int] = {}
    stale = 0
    for event in generate(MIXED):
        entity = (event.entity_type, event.entity_id)
        if event.kind == "stale":
            assert event.sequence < newest[entity]
            stale += 1
        elif event.kind == "new":
            assert event.sequence > newest.get(entity, 0)
        newest[entity] = max(newest.get(entity, 0), event.sequence)
    assert stale > 0


def test_value_size_is_approximately_respected() -> None:
    for size in (200, 600):
        spec = LoadSpec(count=2_000, entities=100, seed=1, aliases=0.5, value_size=size)
        lengths = [len(e.value) for e in generate(spec)]
        assert size - 12 <= min(lengths) and max(lengths) <= size + 12


def test_states_follow_the_life_cycle() -> None:
    for event in itertools.islice(generate(MIXED), 2_000):
        assert event.state == STATES[(event.sequence - 1) % len(STATES)]


# ------------------------------------------------------------------ manifest


def test_manifest_holds_the_newest_sequence_per_entity(tmp_path: Path) -> None:
    manifest = Manifest()
    newest: dict[str, tuple[int, str, str]] = {}
    for event in generate(MIXED):
        manifest.add(event)
        routing_key = f"{event.entity_type}:{event.entity_id}"
        if event.sequence > newest.get(routing_key, (0, "", ""))[0]:
            newest[routing_key] = (event.sequence, event.state, event.event_id)
    entities = manifest.entities()
    assert len(manifest) == len(entities) == len(newest)
    assert {k: (v["sequence"], v["state"], v["event_id"]) for k, v in entities.items()} == newest
    assert entities == expected_state(MIXED)

    path = tmp_path / "manifest.json"
    manifest.write(path, topic="t", seed=MIXED.seed)
    document = json.loads(path.read_text())
    assert document["topic"] == "t"
    assert document["seed"] == MIXED.seed
    assert document["entities"] == entities


def test_manifest_ignores_arrival_order() -> None:
    events = list(generate(LoadSpec(count=3_000, entities=50, seed=9, stale=0.2)))
    forward, backward = Manifest(), Manifest()
    for event in events:
        forward.add(event)
    for event in reversed(events):
        backward.add(event)
    assert forward.entities() == backward.entities()
