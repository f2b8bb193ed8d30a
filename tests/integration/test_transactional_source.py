"""Caught up on a topic written with transactions (issue 14's last bullet).

Every partition of such a topic ends with a control record (the commit marker of the
last transaction, or an abort marker) that no consumer is ever handed, so "the last
offset consumed + 1" stays below the high watermark. ``spr run`` and ``spr transform``
must still count such a partition as done: ``--idle-exit`` fires within a bound, the
stored offsets equal the high watermarks, and ``spr lag`` reports 0. The topic is
``spr transform``'s own output; two of its partitions get a trailing aborted transaction
of this test's own, whose records must never be applied.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from helpers import (
    end_offsets,
    expected_for,
    produce_load,
    read_records,
    spr_transform_argv,
)
from transform_checks import (
    Scratch,
    Sent,
    apply_with_spr_run,
    check_output,
    committed_offsets,
    tail,
)

from spr.dev.loadgen import LoadSpec
from spr.routing import partition_for, partition_key

PARTITIONS = 6
IDLE_EXIT_S = 2.0
# --idle-exit S plus start-up, the group join and a lag check: a run that never sees its
# partitions as done runs until the bound instead.
EXIT_BOUND_S = IDLE_EXIT_S + 20.0


@pytest.fixture
def scratch(bootstrap: str, dsn: str) -> Iterator[Scratch]:
    made = Scratch(bootstrap, dsn)
    try:
        yield made
    finally:
        made.cleanup()


def abort_a_transaction(bootstrap: str, topic: str, partitions: list[int]) -> None:
    """Write canonical events of entities that exist nowhere else to ``partitions`` in a
    transaction, and abort it: the partitions then end with an abort marker."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for partition in partitions:
        entity = next(f"ghost-{i}" for i in range(10_000)
                      if partition_for(partition_key(f"ghost:{i}"), PARTITIONS) == partition)  # fmt: skip
        key = partition_key(f"ghost:{entity}")
        value = {"event_id": f"g-{partition}", "entity_type": "ghost", "entity_id": entity,
                 "sequence": 1, "state": "haunting"}  # fmt: skip
        for _ in range(3):
            producer.produce(topic, json.dumps(value).encode(), key.encode(), partition=partition)
    producer.flush(30)
    producer.abort_transaction(30)


def lag_report(bootstrap: str, group: str, topic: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "spr", "lag", "--group", group, "--topic", topic,
         "--bootstrap", bootstrap, "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


def test_caught_up_on_a_transactional_topic(
    bootstrap: str, make_topic: Callable[..., str], scratch: Scratch, tmp_path: Path
) -> None:
    src = make_topic(partitions=3, prefix="ttsrc")
    spec = LoadSpec(count=1500, entities=200, seed=41, duplicates=0.05, stale=0.05, aliases=0.3)
    produce_load(bootstrap, src, spec)
    output = f"ttdst-{uuid.uuid4().hex[:10]}"  # created by spr transform
    group = f"g-tt-{src}"
    scratch.topics += [output, f"{src}.dlq"]
    scratch.groups.append(group)
    log = tmp_path / "transform.log"
    argv = spr_transform_argv(topics=[src], group=group, output=output, bootstrap=bootstrap,
                              extra=["--output-partitions", str(PARTITIONS),
                                     "--idle-exit", "1"])  # fmt: skip
    assert scratch.start(argv, log).wait(60) == 0, tail(log)
    abort_a_transaction(bootstrap, output, [0, 1])

    # Every partition ends with control records: past the last record a reader sees.
    ends = {p: o for (_, p), o in end_offsets(bootstrap, output).items()}
    visible = read_records(bootstrap, output)
    last = {r.partition: r.offset for r in visible}
    assert set(last) == set(range(PARTITIONS)), "every partition holds events"
    assert all(last[p] + 1 < ends[p] for p in last), (last, ends)
    assert all(last[p] + 3 + 1 < ends[p] for p in (0, 1))  # the aborted records and marker

    # spr run: exits by --idle-exit within the bound, with the state of the spec and the
    # offsets at the high watermarks (past the markers), and spr lag says 0.
    run_group = f"g-run-{output}"
    run_s = apply_with_spr_run(scratch, output=output, model=expected_for(spec),
                               log=tmp_path / "run.log", idle_exit_s=IDLE_EXIT_S,
                               bound_s=EXIT_BOUND_S, group=run_group)  # fmt: skip
    code, report = lag_report(bootstrap, run_group, output)
    assert code == 0 and report["total_lag"] == 0, report
    rows = report["partitions"]
    assert isinstance(rows, list)
    assert {(r["partition"], r["committed"], r["end"]) for r in rows} == {
        (p, ends[p], ends[p]) for p in range(PARTITIONS)
    }

    # spr transform reading that topic: the same, with Kafka's group offsets.
    again, again_group = f"{output}-again", f"g-tt2-{output}"
    scratch.topics += [again, f"{output}.dlq"]
    scratch.groups.append(again_group)
    log2 = tmp_path / "transform-again.log"
    started = time.monotonic()
    proc = scratch.start(
        spr_transform_argv(topics=[output], group=again_group, output=again, bootstrap=bootstrap,
                           extra=["--output-partitions", "3", "--idle-exit", str(IDLE_EXIT_S)]),
        log2,
    )  # fmt: skip
    try:
        code = proc.wait(EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"spr transform never saw {output} as done: {tail(log2)}") from None
    transform_s = time.monotonic() - started
    assert code == 0, tail(log2)
    assert committed_offsets(bootstrap, again_group) == {(output, p): ends[p] for p in ends}
    code, report = lag_report(bootstrap, again_group, output)
    assert code == 0 and report["total_lag"] == 0, report
    sent = [Sent(output, r.partition, r.offset, r.value or b"") for r in visible]
    outcome = check_output(bootstrap, sent, output=again, group=again_group, partitions=3)
    assert outcome.committed == len(visible) and outcome.dead_letters == 0
    print(f"spr run exited after {run_s:.1f} s, spr transform after {transform_s:.1f} s "
          f"(--idle-exit {IDLE_EXIT_S:g})")  # fmt: skip
