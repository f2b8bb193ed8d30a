from __future__ import annotations

import hashlib
from types import ModuleType

import confluent_kafka
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spr import _core_py, routing
from spr.classify import ErrorClass, classify
from spr.cli import main
from spr.decode import decode_event
from spr.errors import InvalidEvent
from spr.routing import check_key, partition_key

# Kafka's own test vectors for Utils.murmur2 (clients/src/test/.../UtilsTest.java).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

_chars = st.characters(exclude_categories=("Cs",))  # no lone surrogates: not UTF-8
keys = st.one_of(
    st.text(_chars, max_size=4),
    st.text(_chars, max_size=40),
    st.text(_chars, min_size=200, max_size=600),
)
partition_counts = st.integers(min_value=1, max_value=2**31 - 1) | st.sampled_from([1, 12, 18])


@pytest.mark.parametrize(("data", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_java(core: ModuleType, data: bytes, expected: int) -> None:
    assert core.murmur2(data) == expected


def test_partition_key_is_sha256_prefix(core: ModuleType) -> None:
    assert core.partition_key("order:1") == hashlib.sha256(b"order:1").hexdigest()[:16]
    assert core.partition_key("") == hashlib.sha256(b"").hexdigest()[:16]


@settings(max_examples=300)
@given(routing_key=keys, num_partitions=partition_counts)
def test_routing_against_references(routing_key: str, num_partitions: int) -> None:
    from spr._impl import core as live

    data = routing_key.encode("utf-8")
    expected_key = hashlib.sha256(data).hexdigest()[:16]
    expected_partition = confluent_kafka.murmur2(expected_key.encode(), num_partitions)
    for core in {_core_py, live}:
        assert core.partition_key(routing_key) == expected_key
        assert core.partition_for(expected_key, num_partitions) == expected_partition
        assert core.partition_for(data, num_partitions) == confluent_kafka.murmur2(
            data, num_partitions
        )
        assert core.route_many([routing_key], num_partitions) == (
            [expected_key],
            [expected_partition],
        )


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_murmur2_compiled_equals_twin(compiled: ModuleType, data: bytes) -> None:
    assert compiled.murmur2(data) == _core_py.murmur2(data)
    assert compiled.partition_for(data, 7) == confluent_kafka.murmur2(data, 7)


def test_route_many_aligned(core: ModuleType) -> None:
    routing_keys = [f"order:{i}" for i in range(50)]
    keys, partitions = core.route_many(routing_keys, 12)
    assert keys == [core.partition_key(k) for k in routing_keys]
    assert partitions == [core.partition_for(k, 12) for k in keys]
    assert core.route_many([], 12) == ([], [])


@pytest.mark.parametrize("bad", [0, -1, 2**31])
def test_partition_count_must_be_positive_int32(core: ModuleType, bad: int) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        core.partition_for(b"x", bad)
    with pytest.raises(ValueError, match="num_partitions"):
        core.route_many(["a:b"], bad)


def test_partition_for_accepts_str_and_bytes(core: ModuleType) -> None:
    assert core.partition_for("hello", 12) == core.partition_for(b"hello", 12)
    assert core.partition_for(bytearray(b"hello"), 12) == core.partition_for(b"hello", 12)


def test_public_module_wraps_live_core() -> None:
    assert routing.partition_key("a:b") == _core_py.partition_key("a:b")
    assert routing.murmur2(b"21") == -973932308
    assert routing.partition_for("x", 3) == _core_py.partition_for("x", 3)
    assert routing.route_many(["a:b"], 5) == _core_py.route_many(["a:b"], 5)


def test_route_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--partitions", "18", "order:1", "user:ü"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, routing_key in zip(lines, ["order:1", "user:ü"], strict=True):
        key, partition = line.split("\t")[1:]
        assert line.split("\t")[0] == routing_key
        assert key == hashlib.sha256(routing_key.encode()).hexdigest()[:16]
        assert int(partition) == confluent_kafka.murmur2(key.encode(), 18)


def test_route_command_default_partitions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "order:1"]) == 0
    key, partition = capsys.readouterr().out.strip().split("\t")[1:]
    assert int(partition) == confluent_kafka.murmur2(key.encode(), 12)


@pytest.mark.parametrize("bad", ["order", ":1", "order:"])
def test_route_command_rejects_bad_key(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", bad]) == 2
    assert "ENTITY_TYPE:ENTITY_ID" in capsys.readouterr().err


def test_route_command_rejects_bad_partitions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--partitions", "0", "a:b"]) == 2
    assert "--partitions" in capsys.readouterr().err


# -- the key check (design §3), one rule in each implementation ---------------------------


def _event(entity_id: str = "o-1") -> bytes:
    return b'{"entity_type":"order","entity_id":"%s","state":"paid"}' % entity_id.encode()


def test_check_key_accepts_the_partition_key(core: ModuleType) -> None:
    event = decode_event(_event(), offset=3, timestamp_ms=0)
    key = partition_key("order:o-1")
    core.check_key(key.encode(), event)
    core.check_key(key, event)
    check_key(key, event)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (partition_key("order:o-2").encode(), "does not match entity order:o-1"),
        (b"order:o-1", "does not match entity order:o-1"),
        (partition_key("order:o-1").upper().encode(), "does not match"),
        (b"\xff\xfe", "does not match"),
        (None, "has no key"),
    ],
)
def test_check_key_rejects_other_keys(core: ModuleType, key: bytes | None, fragment: str) -> None:
    event = decode_event(_event(), offset=3, timestamp_ms=0)
    with pytest.raises(InvalidEvent) as caught:
        core.check_key(key, event)
    assert fragment in caught.value.reason
    assert partition_key("order:o-1") in caught.value.reason
    assert classify(caught.value) is ErrorClass.INVALID
