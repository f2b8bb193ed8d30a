"""The failover suite's instruments: the 3-node cluster as ``spr dev`` drives it, a
sampler of the group's committed offsets, the stall and recovery arithmetic, the
effects audit (a trigger on the state table), and the picture.

Nothing here fakes a server: the cluster is ``spr dev up --brokers 3`` in its own state
folder and ports, run through the command line exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg import sql

# A throughput at or above this share of the pre-fault rate counts as recovered.
RECOVERED_SHARE = 0.8
_SAMPLE_PERIOD_S = 0.2
_RATE_WINDOW_S = 3.0


# ---------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Cluster:
    """The suite's own 3-node stack, driven through ``spr dev`` in its environment."""

    env: Mapping[str, str]
    bootstrap: str
    dsn: str

    def dev(self, *args: str, timeout: float = 240.0) -> str:
        """Run ``spr dev ARGS`` against this stack; AssertionError unless it exits 0."""
        done = subprocess.run(
            [sys.executable, "-m", "spr", "dev", *args], env=dict(self.env),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr[-3000:])
        return done.stdout

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "spr", "dev", "status", "--json"], env=dict(self.env),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    def active_controller(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.status()["kafka"]["nodes"]:
                if node["active_controller"] and node["running"]:
                    return int(node["node"])
            time.sleep(0.5)
        raise AssertionError(f"no active controller after {timeout_s} s")

    def admin(self) -> AdminClient:
        """An admin client, for healthy moments only: librdkafka 2.16's admin requests
        can abort the process when they time out against a dead broker."""
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def metadata_client(self) -> Consumer:
        """A group-less consumer handle for metadata and watermarks, safe during faults."""
        return Consumer({"bootstrap.servers": self.bootstrap, "group.id": "failover-probe",
                         "log_level": 0})  # fmt: skip

    def wait_healthy(self, topics: Sequence[str] = (), timeout_s: float = 90.0) -> None:
        """Wait until all three nodes run and every partition of ``topics`` and of the
        internal offsets topic has all three replicas in sync."""
        client = self.metadata_client()
        deadline = time.monotonic() + timeout_s
        last = "nothing checked yet"
        while time.monotonic() < deadline:
            try:
                metadata = client.list_topics(timeout=5)
                wanted = ["__consumer_offsets", *topics]
                lagging = [
                    f"{name}[{p.id}] isr={p.isrs}"
                    for name in wanted
                    if name in metadata.topics
                    for p in metadata.topics[name].partitions.values()
                    if len(p.isrs) < 3 or p.leader < 0
                ]
                if len(metadata.brokers) == 3 and not lagging:
                    client.close()
                    return
                last = f"{len(metadata.brokers)} brokers; {lagging[:3]}"
            except Exception as exc:  # a broker in the middle of starting
                last = str(exc)
            time.sleep(0.5)
        raise AssertionError(f"the cluster did not heal within {timeout_s} s: {last}")

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> leader node id (-1: none), as the cluster's metadata says."""
        client = self.metadata_client()
        try:
            partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
            return {p: md.leader for p, md in partitions.items()}
        finally:
            client.close()

    def end_offsets(self, topic: str) -> dict[int, int]:
        client = self.metadata_client()
        try:
            partitions = client.list_topics(topic, timeout=10).topics[topic].partitions
            return {
                p: int(client.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1])
                for p in sorted(partitions)
            }
        finally:
            client.close()

    def coordinator(self, group: str) -> tuple[int, str]:
        """The group's coordinator node id and the group's state (healthy cluster only)."""
        admin = self.admin()  # referenced until the answer: a collected client drops it
        result = admin.describe_consumer_groups([group], request_timeout=10)[group].result(
            timeout=15
        )
        return int(result.coordinator.id), str(result.state.name)


# ---------------------------------------------------------------------- sampling


@dataclass
class OffsetSampler:
    """Reads the group's committed offsets (``spr_offsets``) every 0.2 s on a thread:
    every advance of a partition is a commit spr made to PostgreSQL."""

    dsn: str
    group: str
    topic: str
    bootstrap: str
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    produced: list[tuple[float, int]] = field(default_factory=list)
    marks: list[tuple[float, str, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def mark(self, label: str, *, fault: bool) -> float:
        """Record an event at the current time; ``fault`` ones are measured."""
        at = self.now()
        self.marks.append((at, label, fault))
        return at

    def start(self) -> None:
        for target in (self._run, self._run_produced):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run_produced(self) -> None:
        """The topic's end offsets (what the brokers acknowledged), every 0.5 s; a
        request that fails during a fault is skipped."""
        client = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "failover-probe",
                           "log_level": 0})  # fmt: skip
        partitions: list[int] = []
        while not self._stop.is_set():
            try:
                if not partitions:
                    metadata = client.list_topics(self.topic, timeout=2).topics[self.topic]
                    partitions = sorted(metadata.partitions)
                at = self.now()
                total = sum(
                    int(client.get_watermark_offsets(TopicPartition(self.topic, p), timeout=1)[1])
                    for p in partitions
                )
                self.produced.append((at, total))
            except Exception:  # a leader moving; the next round asks again
                pass
            self._stop.wait(0.5)
        client.close()

    def _run(self) -> None:
        query = "SELECT partition, next_offset FROM spr_offsets WHERE group_id = %s AND topic = %s"
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
                rows = conn.execute(query, (self.group, self.topic)).fetchall()
                self.samples.append((self.now(), {int(p): int(n) for p, n in rows}))
            except psycopg.Error:
                conn = None  # spr_offsets may not exist yet; try again
            self._stop.wait(_SAMPLE_PERIOD_S)
        if conn is not None:
            conn.close()

    def totals(self) -> list[tuple[float, int]]:
        return [(t, sum(offsets.values())) for t, offsets in self.samples]


def _total_at(totals: Sequence[tuple[float, int]], at: float) -> int:
    """The committed total at time ``at`` (the last sample not after it)."""
    value = 0
    for t, total in totals:
        if t > at:
            break
        value = total
    return value


def _longest_gap(points: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """The longest time in [start, end] between two advances of the value."""
    last_advance = start
    longest = 0.0
    previous: int | None = None
    for t, value in points:
        if t < start:
            previous = value
            continue
        if t > end:
            break
        if previous is not None and value > previous:
            longest = max(longest, t - last_advance)
            last_advance = t
        previous = value
    return max(longest, end - last_advance)


def analyse(sampler: OffsetSampler, *, fault_at: float, end_at: float) -> dict[str, Any]:
    """Stall and recovery of one fault, over [fault_at, end_at] (end_at: the next fault,
    or the end of the steady stream).

    ``stall_s`` is the longest time without any commit of the group;
    ``partition_stall_s`` the longest a single partition went without one.
    ``pre_fault_events_per_s`` is the committed rate over the 5 s before the fault;
    ``recovery_s`` the time from the fault until the committed rate over the trailing
    3 s, having dropped below 80 % of it, is back at or above (0 when it never dropped;
    None when it had not recovered by ``end_at``).
    """
    totals = sampler.totals()
    before = max(0.0, fault_at - 5.0)
    pre = (_total_at(totals, fault_at) - _total_at(totals, before)) / max(fault_at - before, 1e-9)
    stall = _longest_gap(totals, fault_at, end_at)
    partitions = sorted({p for _, offsets in sampler.samples for p in offsets})
    partition_stall = max(
        (
            _longest_gap([(t, o.get(p, 0)) for t, o in sampler.samples], fault_at, end_at)
            for p in partitions
        ),
        default=0.0,
    )
    # A dip is the trailing-window rate below the threshold; recovered is the first
    # time after the first dip that it is back at or above it.
    threshold = RECOVERED_SHARE * pre
    dipped_at: float | None = None
    recovered_at: float | None = None
    for t, total in totals:
        if t < fault_at + _RATE_WINDOW_S:
            continue
        if t > end_at:
            break
        rate = (total - _total_at(totals, t - _RATE_WINDOW_S)) / _RATE_WINDOW_S
        if dipped_at is None and rate < threshold:
            dipped_at = t
        elif dipped_at is not None and rate >= threshold:
            recovered_at = t
            break
    recovery: float | None = 0.0
    if dipped_at is not None:
        recovery = None if recovered_at is None else recovered_at - fault_at
    return {
        "pre_fault_events_per_s": round(pre, 1),
        "stall_s": round(stall, 2),
        "partition_stall_s": round(partition_stall, 2),
        "recovery_s": None if recovery is None else round(recovery, 2),
    }


def rate_series(
    sampler: OffsetSampler, bin_s: float = 0.5, *, produced: bool = False
) -> list[tuple[float, float]]:
    """Committed (or, with ``produced``, acknowledged) events/s in bins of ``bin_s``."""
    totals = sampler.produced if produced else sampler.totals()
    if not totals:
        return []
    series = []
    t = bin_s
    end = totals[-1][0]
    while t <= end:
        rate = (_total_at(totals, t) - _total_at(totals, t - bin_s)) / bin_s
        series.append((round(t, 2), round(rate, 1)))
        t += bin_s
    return series


# ---------------------------------------------------------------------- the audit


def install_audit(dsn: str, table: str) -> str:
    """Record every row write to ``table`` (entity, new and old sequence) in an audit
    table, by a trigger; returns the audit table's name. A write that repeats an
    (entity, sequence) already written is a duplicated effect; one that does not raise
    the sequence is a regression."""
    audit = f"{table}_audit"
    function = f"{table}_audit_fn"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, entity_type text NOT NULL, "
                "entity_id text NOT NULL, sequence bigint, old_sequence bigint)"
            ).format(sql.Identifier(audit))
        )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "INSERT INTO {a} (entity_type, entity_id, sequence, old_sequence) VALUES "
                "(NEW.entity_type, NEW.entity_id, NEW.sequence, "
                "CASE WHEN TG_OP = 'UPDATE' THEN OLD.sequence END); RETURN NULL; END $$"
            ).format(f=sql.Identifier(function), a=sql.Identifier(audit))
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {t} AFTER INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION {f}()"
            ).format(
                t=sql.Identifier(f"{table}_audit_trg"),
                table=sql.Identifier(table),
                f=sql.Identifier(function),
            )
        )
    return audit


def audit_counts(dsn: str, audit: str) -> dict[str, int]:
    """``writes``, ``duplicated`` (repeated entity+sequence writes) and ``regressed``
    (writes that did not raise the entity's sequence)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        writes = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(audit)))
        duplicated = conn.execute(
            sql.SQL(
                "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {} "
                "GROUP BY entity_type, entity_id, sequence HAVING count(*) > 1) d"
            ).format(sql.Identifier(audit))
        )
        regressed = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE old_sequence IS NOT NULL "
                "AND (sequence IS NULL OR sequence <= old_sequence)"
            ).format(sql.Identifier(audit))
        )
        return {
            "writes": int(writes.fetchone()[0]),  # type: ignore[index]
            "duplicated": int(duplicated.fetchone()[0]),  # type: ignore[index]
            "regressed": int(regressed.fetchone()[0]),  # type: ignore[index]
        }


def drop_tables(dsn: str, table: str, group: str) -> None:
    """Cleanup: the state table, its audit and function, and the group's offsets."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"{table}_audit")))
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(f"{table}_audit_fn"))
        )
        if conn.execute("SELECT to_regclass('spr_offsets')").fetchone() != (None,):
            conn.execute("DELETE FROM spr_offsets WHERE group_id = %s", (group,))


# ---------------------------------------------------------------------- the picture


def draw(runs: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One panel per fault: committed events/s over time, the fault times marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.8 * len(runs)), squeeze=False)
    for ax, run in zip((row[0] for row in axes), runs, strict=True):
        series = run["series"]
        acked = run["produced_series"]
        ax.plot([t for t, _ in acked], [r for _, r in acked], color="#7f7f7f", lw=0.8,
                label="produced (acknowledged) events/s")  # fmt: skip
        ax.plot([t for t, _ in series], [r for _, r in series], color="#d62728", lw=1.2,
                label="committed to PostgreSQL, events/s")  # fmt: skip
        for at, label, fault in run["marks"]:
            # Faults are labelled from the top, other events from the bottom, so that two
            # at the same moment stay readable.
            ax.axvline(at, color="black" if fault else "#7f7f7f",
                       ls="-" if fault else "--", lw=1)  # fmt: skip
            ax.annotate(label, (at, 0.98 if fault else 0.02),
                        xycoords=("data", "axes fraction"), rotation=90,
                        va="top" if fault else "bottom", ha="right", fontsize=7)  # fmt: skip
        worst = run["worst"]
        ax.set_title(
            f"{run['name']}: stall {worst['stall_s']} s (one partition "
            f"{worst['partition_stall_s']} s), recovery {worst['recovery_s']} s, "
            f"{'verified' if run['verified'] else 'NOT verified'}",
            fontsize=9,
        )
        ax.set_ylabel("events/s")
        # The catch-up bursts after a stall reach 10-20x the steady rate; the figure
        # is about the stalls, so the axis stops at 3x and the peak is named instead.
        peak = max((r for _, r in series), default=0.0)
        steady = float(run["rate_events_per_s"])
        if peak > 3 * steady:
            ax.set_ylim(0, 3 * steady)
            ax.text(0.01, 0.97, f"catch-up peak {peak:,.0f}/s (clipped)", fontsize=7,
                    transform=ax.transAxes, va="top")  # fmt: skip
        ax.legend(loc="upper right", fontsize=7)
        ax.set_xlim(left=0)
        if peak <= 3 * steady:
            ax.set_ylim(bottom=0)
    axes[-1][0].set_xlabel("seconds since the stream started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(runs: Sequence[Mapping[str, Any]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "cluster": "3 KRaft nodes (broker+controller), RF 3, min.insync.replicas 2",
        "recovered_share": RECOVERED_SHARE,
        "faults": [
            {k: v for k, v in run.items() if k not in ("series", "produced_series")} for run in runs
        ],
        "series": {run["name"]: run["series"] for run in runs},
        "produced_series": {run["name"]: run["produced_series"] for run in runs},
    }
    (folder / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    if runs:
        draw(runs, folder / "failover.png")


def env_flag(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default
