"""Exactly-once under broker failover, on a real 3-node KRaft cluster (issue 16).

Each test streams ``spr produce --rate`` into a fresh 6-partition topic (created by spr,
so it takes the cluster's replication factor 3 and ``min.insync.replicas=2``) while
``spr run --workers 2`` applies it to PostgreSQL, injects one kind of fault with
``spr dev kill-broker / stop-broker / start-broker``, and then checks:

- the table against the state the generator's spec must produce, computed here
  independently (:func:`spr.dev.loadgen.expected_state`): 0 lost, 0 wrong, 0 duplicated,
  0 regressed (:func:`spr.bench.verify.compare`);
- every row write, recorded by a trigger: no (entity, sequence) written twice and no
  write that lowered or repeated an entity's sequence;
- ``spr_offsets`` equal to the topic's end offsets; the producer reports 0 errors and
  both spr processes exit 0 on SIGTERM.

``spr run`` keeps spr's consumer defaults, as a user would deploy it
(``$SPR_FAILOVER_CONSUMER_X`` adds ``-X`` settings to compare against). Stall and
recovery times per fault (see :func:`failover_tools.analyse`) go to
``build/failover/results.json`` and ``failover.png``; they are measurements, not pass
marks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from failover_tools import (
    Cluster,
    OffsetSampler,
    analyse,
    audit_counts,
    drop_tables,
    env_flag,
    install_audit,
    rate_series,
)

from spr.bench.verify import compare, fetch_rows
from spr.dev.loadgen import LoadSpec, ensure_topic, expected_state

RATE = env_flag("SPR_FAILOVER_RATE", 2000)
ENTITIES = 5000
PARTITIONS = 6
WARMUP_S = 6.0
# spr's consumer defaults unless $SPR_FAILOVER_CONSUMER_X adds -X settings (KEY=VALUE,
# space-separated), e.g. a longer session.timeout.ms to compare against.
CONSUMER_SETTINGS = os.environ.get("SPR_FAILOVER_CONSUMER_X", "").split()

Results = list[dict[str, Any]]


def spr(*args: str) -> list[str]:
    return [sys.executable, "-m", "spr", *args]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Stream:
    """One topic, group and table with a producer and consumers running against them."""

    name: str
    cluster: Cluster
    topic: str
    group: str
    table: str
    audit: str
    spec: LoadSpec
    seconds: int
    tmp: Path
    sampler: OffsetSampler
    producer: subprocess.Popen[bytes] | None = None
    consumers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_consumer(self, workers: int) -> subprocess.Popen[bytes]:
        argv = spr("run", "--topic", self.topic, "--group", self.group, "--table", self.table,
                   "--dsn", self.cluster.dsn, "--bootstrap", self.cluster.bootstrap,
                   "--workers", str(workers), "-v")  # fmt: skip
        for item in CONSUMER_SETTINGS:
            argv += ["-X", item]
        with (self.tmp / f"run-{len(self.consumers)}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.consumers.append(proc)
        return proc

    def committed(self) -> dict[int, int]:
        return dict(self.sampler.samples[-1][1]) if self.sampler.samples else {}


_OPEN: list[Stream] = []


@pytest.fixture(autouse=True)
def _stop_leftovers() -> Iterator[None]:
    """A test that fails half-way leaves no spr process of its own running."""
    yield
    while _OPEN:
        stream = _OPEN.pop()
        stream.sampler.stop()
        for proc in [*stream.consumers, stream.producer]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def open_stream(cluster: Cluster, name: str, seconds: int, tmp: Path, seed: int) -> Stream:
    cluster.wait_healthy()
    tag = uuid.uuid4().hex[:8]
    topic, group = f"failover-{name}-{tag}", f"failover-{name}-{tag}"
    table = f"failover_{name.replace('-', '_')}_{tag}"
    assert ensure_topic(cluster.bootstrap, topic, PARTITIONS)  # spr's own topic creation
    _assert_replicated(cluster, topic)
    subprocess.run(spr("db", "init", "--table", table, "--dsn", cluster.dsn),
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    audit = install_audit(cluster.dsn, table)
    spec = LoadSpec(count=RATE * seconds, entities=ENTITIES, seed=seed, duplicates=0.05,
                    stale=0.05)  # fmt: skip
    stream = Stream(name, cluster, topic, group, table, audit, spec, seconds, tmp,
                    OffsetSampler(cluster.dsn, group, topic, cluster.bootstrap))  # fmt: skip
    _OPEN.append(stream)
    stream.sampler.start()
    stream.start_consumer(workers=2)
    with (tmp / "produce.out").open("wb") as out, (tmp / "produce.err").open("wb") as err:
        stream.producer = subprocess.Popen(
            spr("produce", "--topic", topic, "--count", str(spec.count), "--rate", str(RATE),
                "--entities", str(ENTITIES), "--seed", str(seed), "--duplicates", "0.05",
                "--stale", "0.05", "--bootstrap", cluster.bootstrap, "--json"),
            stdout=out, stderr=err,
        )  # fmt: skip
    wait_for(lambda: sum(stream.committed().values()) > 0, 60, "the first commits")
    # Past the start-up catch-up, so that the pre-fault rate is the steady one.
    time.sleep(WARMUP_S)
    return stream


def _assert_replicated(cluster: Cluster, topic: str) -> None:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = cluster.admin()

    def replicated() -> bool:
        # Another broker may answer before the new topic's metadata has reached it.
        partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
        return len(partitions) == PARTITIONS and all(
            len(p.replicas) == 3 and len(p.isrs) == 3 for p in partitions.values()
        )

    wait_for(replicated, 30, f"{topic} to have {PARTITIONS} partitions of 3 replicas")
    resource = ConfigResource(ResourceType.TOPIC, topic)
    config: dict = {}

    def described() -> bool:
        # The broker the admin client asks may be a different one again, and
        # answer UNKNOWN_TOPIC_OR_PART until the topic's metadata reaches it.
        try:
            config.update(admin.describe_configs([resource])[resource].result(timeout=10))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            return False
        return True

    wait_for(described, 30, f"every broker to describe {topic}")
    assert config["min.insync.replicas"].value == "2"
    assert config["unclean.leader.election.enable"].value == "false"


def close_stream(stream: Stream, results: Results) -> None:
    """Let the producer finish and the group catch up, stop spr, verify, record."""
    cluster, sampler = stream.cluster, stream.sampler
    assert stream.producer is not None
    produce_rc = stream.producer.wait(timeout=stream.seconds + 120)
    produced_at = sampler.now()
    out = (stream.tmp / "produce.out").read_text().strip().splitlines()
    report = json.loads(out[-1]) if out else {}
    ends = {p: n for p, n in cluster.end_offsets(stream.topic).items() if n > 0}
    wait_for(lambda: stream.committed() == ends, 120, "the group to commit the end offsets")
    time.sleep(1.0)
    sampler.stop()
    run_codes = []
    for proc in stream.consumers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            run_codes.append(proc.wait(60))
        except subprocess.TimeoutExpired:
            proc.kill()
            run_codes.append(proc.wait())
    verification = compare(expected_state(stream.spec), fetch_rows(cluster.dsn, stream.table))
    audit = audit_counts(cluster.dsn, stream.audit)
    faults = [(at, label) for at, label, fault in sampler.marks if fault]
    # The steady stream ends when the producer has sent its last message.
    window_end = produced_at - 0.5
    measured = []
    for index, (at, label) in enumerate(faults):
        end = faults[index + 1][0] if index + 1 < len(faults) else window_end
        measured.append({"fault": label, "at_s": round(at, 2),
                         **analyse(sampler, fault_at=at, end_at=end)})  # fmt: skip
    recoveries = [m["recovery_s"] for m in measured]
    verified = (
        verification.ok
        and audit["duplicated"] == 0
        and audit["regressed"] == 0
        and stream.committed() == ends
        and produce_rc == 0
        and report.get("errors") == 0
        and all(code == 0 for code in run_codes)
    )
    results.append({
        "name": stream.name,
        "topic_partitions": PARTITIONS,
        "events": stream.spec.count,
        "rate_events_per_s": RATE,
        "consumer_processes": sum(1 for _ in stream.consumers),
        "marks": [(round(at, 2), label, fault) for at, label, fault in sampler.marks],
        "faults": measured,
        "worst": {
            "stall_s": max(m["stall_s"] for m in measured),
            "partition_stall_s": max(m["partition_stall_s"] for m in measured),
            "recovery_s": None if None in recoveries else max(r or 0.0 for r in recoveries),
        },
        "verification": {**verification.as_dict(), "regressed": verification.older},
        "audit": audit,
        "offsets_match_end_offsets": stream.committed() == ends,
        "produce_exit": produce_rc,
        "produce_errors": report.get("errors"),
        "run_exits": run_codes,
        "verified": verified,
        "series": rate_series(sampler),
        "produced_series": rate_series(sampler, 1.0, produced=True),
    })  # fmt: skip
    drop_tables(cluster.dsn, stream.table, stream.group)
    cluster.wait_healthy()
    admin = cluster.admin()
    for future in admin.delete_topics([stream.topic], operation_timeout=30).values():
        future.result(timeout=30)
    assert produce_rc == 0 and report.get("errors") == 0, (produce_rc, report)
    assert all(code == 0 for code in run_codes), (run_codes, _tail(stream.tmp))
    assert verification.ok and verification.older == 0, verification.as_dict()
    assert audit["duplicated"] == 0 and audit["regressed"] == 0, audit
    # Stall and recovery are measurements, not pass marks: this machine is shared, and a
    # recovery that comes after the producer's last event (None) is still a recovery.
    assert measured, sampler.marks


def _tail(tmp: Path) -> str:
    return "\n".join(
        f"{log.name}: " + log.read_text(errors="replace")[-1500:] for log in tmp.glob("run-*.log")
    )


@pytest.mark.timeout(240)
def test_leader_of_busiest_partitions_killed_and_restarted(
    cluster: Cluster, results: Results, tmp_path: Path
) -> None:
    stream = open_stream(cluster, "leader-kill", 40, tmp_path, seed=161)
    ends = cluster.end_offsets(stream.topic)
    busiest = sorted(ends, key=lambda p: ends[p], reverse=True)[:2]
    leaders = cluster.leaders(stream.topic)
    node = Counter(leaders[p] for p in busiest).most_common(1)[0][0]
    stream.sampler.mark(f"kill -9 node {node} (leader of {sorted(busiest)})", fault=True)
    cluster.dev("kill-broker", str(node))
    wait_for(lambda: all(cluster.leaders(stream.topic)[p] not in (node, -1) for p in busiest),
             60, "new leaders")  # fmt: skip
    stream.sampler.mark(f"new leaders; start node {node}", fault=False)
    cluster.dev("start-broker", str(node))
    close_stream(stream, results)


@pytest.mark.timeout(240)
def test_active_controller_killed(cluster: Cluster, results: Results, tmp_path: Path) -> None:
    stream = open_stream(cluster, "controller-kill", 40, tmp_path, seed=162)
    node = cluster.active_controller()
    stream.sampler.mark(f"kill -9 node {node} (active controller)", fault=True)
    cluster.dev("kill-broker", str(node))
    wait_for(lambda: cluster.active_controller() != node, 60, "a new active controller")
    stream.sampler.mark(f"controller {cluster.active_controller()}; start node {node}",
                        fault=False)  # fmt: skip
    cluster.dev("start-broker", str(node))
    close_stream(stream, results)


@pytest.mark.timeout(300)
def test_rolling_restart(cluster: Cluster, results: Results, tmp_path: Path) -> None:
    stream = open_stream(cluster, "rolling-restart", 80, tmp_path, seed=163)
    for node in (1, 2, 3):
        stream.sampler.mark(f"restart node {node}", fault=True)
        cluster.dev("stop-broker", str(node))
        cluster.dev("start-broker", str(node))
        cluster.wait_healthy([stream.topic])
        stream.sampler.mark(f"node {node} in sync", fault=False)
    close_stream(stream, results)


@pytest.mark.timeout(240)
def test_coordinator_killed_during_rebalance(
    cluster: Cluster, results: Results, tmp_path: Path
) -> None:
    stream = open_stream(cluster, "coordinator-kill", 45, tmp_path, seed=164)
    coordinator, state = cluster.coordinator(stream.group)

    def stable() -> bool:
        # The two workers may still be settling (one joined after the other committed):
        # the rebalance the kill interrupts must be the third member's.
        nonlocal coordinator, state
        coordinator, state = cluster.coordinator(stream.group)
        return "STABLE" in state

    wait_for(stable, 60, "the two workers' group to be stable")
    stream.sampler.mark("a third member joins", fault=False)
    stream.start_consumer(workers=1)

    def rebalancing() -> bool:
        nonlocal state
        state = cluster.coordinator(stream.group)[1]
        return "REBALANC" in state

    wait_for(rebalancing, 30, "the group to rebalance")
    # The state the kill interrupted goes to results.json; the label stays short.
    stream.sampler.mark(f"kill -9 node {coordinator} (coordinator, mid-rebalance)", fault=True)
    interrupted = state
    cluster.dev("kill-broker", str(coordinator))

    # No admin requests while a broker is down (see Cluster.admin): the group is back
    # when every partition commits again.
    stuck = stream.committed()
    wait_for(lambda: all(stream.committed().get(p, 0) > n for p, n in stuck.items()), 90,
             "every partition to commit again")  # fmt: skip
    stream.sampler.mark(f"all partitions commit; start node {coordinator}", fault=False)
    cluster.dev("start-broker", str(coordinator))
    moved_to = cluster.coordinator(stream.group)[0]
    stream.sampler.mark(f"coordinator node {moved_to}; the third member leaves", fault=False)
    extra = stream.consumers[-1]
    extra.send_signal(signal.SIGTERM)
    assert extra.wait(60) == 0, _tail(tmp_path)
    close_stream(stream, results)
    results[-1]["group_state_at_kill"] = interrupted
    results[-1]["coordinator"] = {"killed": coordinator, "after": moved_to}
