"""Check the foreign producers against a real broker: they put each event where they say,
and where their client's default partitioner puts it.

For 6 and 12 partitions, it writes a fresh mixed topic with all three producers of
``foreign.py`` (sarama, librdkafka, kafkajs), reads it back with a confluent-kafka
consumer, and checks that: every reported (partition, offset) holds exactly the key,
value and headers the producer sent and nothing else is stored; each producer kept the
input order of each key; sarama's placement is ``abs(int32(fnv1a(key))) % n`` (and the
keys include negative hashes where that differs from Java's ``& 0x7fffffff``);
librdkafka's is ``crc32(key) % n``; kafkajs' is ``spr.routing.partition_for(key, n)``
with ``spr.routing.partition_key`` as the key. Negative controls: sarama and librdkafka
put most entities elsewhere than spr would. It also runs kafkajs keyed by the plain
routing key. Topics are deleted afterwards. Run from the repository root, with the stack
up (``spr dev up``)::

    .venv/bin/python tests/interop/check_foreign.py [--bootstrap 127.0.0.1:9092]

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import foreign
from confluent_kafka.admin import AdminClient, NewTopic

from spr.routing import partition_for, partition_key

EVENTS_PER_PRODUCER = 3_000
ENTITIES = 1_000


def _create(admin: AdminClient, partitions: int, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    new = NewTopic(name, num_partitions=partitions, replication_factor=1)
    admin.create_topics([new], operation_timeout=30)[name].result(timeout=30)
    for _ in range(100):
        topic = admin.list_topics(name, timeout=5).topics[name]
        if (
            topic.error is None
            and len(topic.partitions) == partitions
            and all(p.leader >= 0 for p in topic.partitions.values())
        ):
            return name
        time.sleep(0.1)
    raise RuntimeError(f"topic {name} has no leaders")


def _agree(
    name: str,
    records: Sequence[foreign.ForeignRecord],
    predict: Callable[[bytes], int],
) -> list[str]:
    bad = [(r.key, r.partition, predict(r.key)) for r in records if r.key is not None]
    bad = [b for b in bad if b[1] != b[2]]
    if bad:
        return [f"{name}: {len(bad)} of {len(records)} placements differ, e.g. {bad[:3]}"]
    return []


def check_mixed(bootstrap: str, admin: AdminClient, partitions: int) -> list[str]:
    topic = _create(admin, partitions, f"foreign-mixed-{partitions}")
    try:
        started = time.monotonic()
        records = foreign.produce_mixed(
            bootstrap, topic, count=EVENTS_PER_PRODUCER, entities=ENTITIES, seed=partitions
        )
        produced_s = time.monotonic() - started
        stored = foreign.read_topic(bootstrap, topic, len(records))
    finally:
        with contextlib.suppress(Exception):
            admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
    problems = foreign.placement_problems(records, stored)
    by = {p: [r for r in records if r.producer == p] for p in foreign.PRODUCERS}
    sarama, rdkafka, kafkajs = by["sarama"], by["librdkafka"], by["kafkajs"]

    problems += _agree(
        "sarama vs abs(int32(fnv1a)) % n",
        sarama,
        lambda k: foreign.sarama_partition(k, partitions),
    )
    problems += _agree(
        "librdkafka vs crc32 % n", rdkafka, lambda k: foreign.librdkafka_partition(k, partitions)
    )
    problems += _agree(
        "kafkajs vs spr.routing.partition_for", kafkajs, lambda k: partition_for(k, partitions)
    )

    # The sarama keys must include hashes whose sign matters, or the abs() rule is untested.
    def reference(key: bytes) -> int:
        return (foreign.fnv1a_32(key) & 0x7FFFFFFF) % partitions

    sarama_keys = {r.key for r in sarama if r.key is not None}
    negative = [k for k in sarama_keys if foreign.fnv1a_32(k) >= 0x80000000]
    sign_matters = [k for k in negative if foreign.sarama_partition(k, partitions) != reference(k)]
    if not sign_matters:
        problems.append(f"no sarama key tells abs() from & 0x7fffffff for {partitions} partitions")

    for r in kafkajs + rdkafka:
        event = r.event()
        entity_type = event.get("entityType") or event.get("entity_type") or event.get("type")
        entity_id = event.get("entityId") or event.get("entity_id")
        if r.key != partition_key(f"{entity_type}:{entity_id}").encode():
            problems.append(f"{r.producer} #{r.index}: key {r.key!r} is not spr's partition key")
            break
    for r in sarama:
        event = r.event()
        if "sequence" in event or r.key != f"{event['event_type']}:{event['entity_id']}".encode():
            problems.append(f"sarama #{r.index}: not the field report's shape: {r.value!r}")
            break

    def moved(records: Sequence[foreign.ForeignRecord]) -> float:
        placed = {r.key: r.partition for r in records if r.key is not None}
        if not placed:
            return 0.0
        return sum(p != partition_for(k, partitions) for k, p in placed.items()) / len(placed)

    for name, group in (("sarama", sarama), ("librdkafka", rdkafka)):
        if moved(group) < 0.5:
            problems.append(f"negative control: only {moved(group):.0%} of {name} keys misrouted")
    if moved(kafkajs) != 0.0:
        problems.append(f"kafkajs: {moved(kafkajs):.0%} of keys not on spr's partition")

    print(
        f"{partitions} partitions, topic {topic}: {len(records)} records produced in "
        f"{produced_s:.1f} s, {len(stored)} read back; per producer "
        + ", ".join(
            f"{p} {len(by[p])} msgs/{len({r.key for r in by[p]})} keys/"
            f"{len({r.partition for r in by[p]})} partitions used/"
            f"{moved(by[p]):.0%} off spr's partition"
            for p in foreign.PRODUCERS
        )
        + f"; sarama keys with negative int32 hash {len(negative)}, of which "
        f"{len(sign_matters)} differ from the & 0x7fffffff rule"
    )
    return problems


def check_kafkajs_routing_key(bootstrap: str, admin: AdminClient, partitions: int) -> list[str]:
    topic = _create(admin, partitions, "foreign-kafkajs-routing")
    try:
        events = foreign.kafkajs_events(500, entities=200, seed=99)
        records = foreign.run_kafkajs(bootstrap, topic, events, key="routing")
        stored = foreign.read_topic(bootstrap, topic, len(records))
    finally:
        with contextlib.suppress(Exception):
            admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
    problems = foreign.placement_problems(records, stored)
    problems += _agree(
        "kafkajs --key routing vs murmur2", records, lambda k: partition_for(k, partitions)
    )
    for r, e in zip(records, events, strict=True):
        if r.key != f"{e['entity_type']}:{e['entity_id']}".encode():
            problems.append(f"kafkajs --key routing #{r.index}: key {r.key!r}")
            break
    print(f"kafkajs --key routing, {partitions} partitions: {len(records)} records checked")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = parser.parse_args(argv)
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    started = time.monotonic()
    foreign.sarama_binary()
    foreign.kafkajs_ready()
    print(f"tools ready in {time.monotonic() - started:.1f} s: {foreign.sarama_binary()}")
    problems: list[str] = []
    for partitions in (6, 12):
        problems += check_mixed(args.bootstrap, admin, partitions)
    problems += check_kafkajs_routing_key(args.bootstrap, admin, 12)
    for problem in problems:
        print("FAIL:", problem)
    print("foreign producers:", "ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
