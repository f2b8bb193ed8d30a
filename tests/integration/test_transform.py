"""``spr transform`` end to end on the real broker, fed by foreign producers (issue 14).

Two source topics are written by the field report's three clients, each the way it does
by default (``tests/interop/foreign.py``): sarama (Go, FNV-1a partitioner, no sequence,
``event_type``, plain ``type:id`` key), confluent-kafka with librdkafka's CRC32
partitioner (canonical and alias names, with a sequence) and kafkajs 2 (alias names, a
sequence), plus invalid events, resent duplicates, and entities whose sequence-less
events come from two source partitions or topics (unorderable). One transform worker
re-keys both topics into a 12-partition output topic; the output, its dead-letter topics
and the state ``spr run`` builds from the output are checked against expectations
computed from what the producers reported (``transform_checks.check_output``). It runs
once with the compiled core and once with the pure-Python twin.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import spr_transform_argv, wait_for
from transform_checks import (
    INVALID_VALUES,
    Scratch,
    Sent,
    apply_with_spr_run,
    check_output,
    committed_offsets,
    foreign,
    from_foreign,
    sarama_shaped,
    send,
    tail,
)

OUTPUT_PARTITIONS = 12


@pytest.fixture
def scratch(bootstrap: str, dsn: str) -> Iterator[Scratch]:
    made = Scratch(bootstrap, dsn)
    try:
        yield made
    finally:
        made.cleanup()


def summary(log: Path) -> dict[str, int]:
    """The counters of ``spr transform``'s closing line."""
    text = log.read_text()
    line = next(x for x in reversed(text.splitlines()) if x.startswith("spr transform: took"))
    counts = {
        name: int(n)
        for n, name in re.findall(r"(\d+) (duplicate|invalid|unorderable|aborted)", line)
    }
    counts["taken"] = int(re.search(r"took (\d+) event", line).group(1))  # type: ignore[union-attr]
    return counts


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_foreign_producers_transformed_exactly_once(
    bootstrap: str, make_topic: Callable[..., str], scratch: Scratch, tmp_path: Path, impl: str
) -> None:
    env = {"SPR_NO_EXTENSIONS": "1" if impl == "python" else "0"}
    src, src2 = make_topic(partitions=6, prefix="tsrc"), make_topic(partitions=3, prefix="tsrc2")
    output = make_topic(partitions=OUTPUT_PARTITIONS, prefix="tdst")
    group = f"g-transform-{src}"
    scratch.topics += [f"{src}.dlq", f"{src2}.dlq"]
    scratch.groups.append(group)
    f = foreign()

    # The foreign producers; every entity type on one topic only.
    mixed = f.produce_mixed(bootstrap, src, count=300, entities=25, seed=3)
    mixed2 = [
        *f.run_sarama(bootstrap, src2, f.sarama_events(120, entities=12, seed=4,
                                                       entity_type="invoice")),
        *f.run_librdkafka(bootstrap, src2, f.librdkafka_events(120, entities=12, seed=4,
                                                               entity_type="refund")),
        *f.run_kafkajs(bootstrap, src2, f.kafkajs_events(120, entities=12, seed=4,
                                                         entity_type="parcel")),
    ]  # fmt: skip
    sent = from_foreign([*mixed, *mixed2])
    assert {s.producer for s in sent} == {"sarama", "librdkafka", "kafkajs"}
    # Invalid events, and exact resends of three kafkajs events (ring duplicates).
    sent += send(bootstrap, src, [(i, f"bad-{i}".encode(), v)
                                  for i, v in enumerate(INVALID_VALUES)], "invalid")  # fmt: skip
    sent += send(bootstrap, src2, [(1, b"bad-x", INVALID_VALUES[0])], "invalid")
    resent = [r for r in mixed if r.producer == "kafkajs"][10:13]
    sent += send(bootstrap, src, [(r.partition, r.key, r.value) for r in resent], "duplicate")
    # Unorderable pairs, first halves: sequence-less events of four entities.
    firsts = [(src, 0), (src, 1), (src2, 0), (src, 2)]
    seconds = [(src2, 1), (src, 3), (src, 4), (src2, 2)]
    for i, (topic, partition) in enumerate(firsts):
        value = sarama_shaped("order", f"unord-{i}", "created", 1_700_000_100_000 + i)
        sent += send(bootstrap, topic, [(partition, f"order:unord-{i}".encode(), value)], "valid")

    log = tmp_path / "transform.log"
    argv = spr_transform_argv(topics=[src, src2], group=group, output=output, bootstrap=bootstrap,
                              extra=["--output-partitions", str(OUTPUT_PARTITIONS),
                                     "--idle-exit", "5"])  # fmt: skip
    started = time.monotonic()
    proc = scratch.start(argv, log, env=env)
    # One stable worker: once it committed the first halves, it has seen where those
    # entities' sequence-less events come from.
    first_halves = [s for s in sent if s.value.startswith(b'{"event_type": "order"')]

    def _firsts_committed() -> bool:
        done = committed_offsets(bootstrap, group)
        return all(done.get((s.topic, s.partition), -1) > s.offset for s in first_halves)

    wait_for(_firsts_committed, 60, "the first halves to be transformed")
    assert proc.poll() is None, tail(log)
    for i, (topic, partition) in enumerate(seconds):
        value = sarama_shaped("order", f"unord-{i}", "paid", 1_700_000_200_000 + i)
        sent += send(bootstrap, topic, [(partition, f"order:unord-{i}".encode(), value)],
                     "unorderable")  # fmt: skip
    # ... while a later event of unord-0 from its first source stays orderable.
    value = sarama_shaped("order", "unord-0", "shipped", 1_700_000_300_000)
    sent += send(bootstrap, firsts[0][0], [(firsts[0][1], b"order:unord-0", value)], "valid")

    assert proc.wait(120) == 0, tail(log)
    transform_s = time.monotonic() - started
    counts = summary(log)
    kinds = [s.kind for s in sent]
    assert counts == {
        "taken": len(sent),
        "duplicate": kinds.count("duplicate"),
        "invalid": kinds.count("invalid"),
        "unorderable": kinds.count("unorderable"),
        "aborted": 0,
    }, log.read_text()[-2000:]

    outcome = check_output(bootstrap, sent, output=output, group=group,
                           partitions=OUTPUT_PARTITIONS)  # fmt: skip
    assert outcome.committed == kinds.count("valid")
    assert outcome.aborted == 0
    assert outcome.dead_letters == kinds.count("invalid") + kinds.count("unorderable")
    assert outcome.model["order:unord-0"]["state"] == "shipped"
    run_s = apply_with_spr_run(scratch, output=output, model=outcome.model,
                               log=tmp_path / "run.log", env=env)  # fmt: skip
    print(f"transform {transform_s:.1f} s, spr run {run_s:.1f} s, {len(sent)} source events")


def test_sent_expectations_follow_design_aliases() -> None:
    """The checker's own decoding (design §2), on the shapes the producers send."""
    sarama = Sent("t", 2, 41, b'{"event_type":"order","entity_id":"7","state":"new"}')
    assert sarama.expected() == {
        "event_id": "order:7:41", "entity_type": "order", "entity_id": "7", "sequence": 41,
        "state": "new", "timestamp": None, "routing_key": "order:7",
    }  # fmt: skip
    kafkajs = Sent("t", 0, 3, b'{"eventId":"e","entityType":"s","entityId":"1","seq":4,'
                   b'"status":"x","ts":5}')  # fmt: skip
    assert kafkajs.expected()["sequence"] == 4 and kafkajs.expected()["event_id"] == "e"
