"""A group member frozen past its session timeout, then resumed (issue 12), black box.

Two ``spr run`` members share a group on a 12-partition topic. One of them is frozen
with SIGSTOP (what a VM pause, a long GC or a stuck host looks like to the group), held
past the session timeout and resumed with SIGCONT, at one of three moments:

* ``mid-flush``: its flush transaction is open and has already merged rows into the
  state table, so it holds their row locks (pg_locks shows its backend holding the
  table's RowExclusiveLock inside a transaction; checked again once it is stopped);
* ``backpressure``: its partitions are paused by backpressure
  (``spr_paused_partitions`` > 0 on its /metrics). To get there for certain, a burst
  of 60,000 events fills the members' batches while the test holds a SHARE lock on the
  state table: the flushes in flight wait, the flow-control wait (1 s) runs out with
  the next batch full, and the members pause. The lock is released once the member is
  frozen (its flush then completes its merge and waits, open, for the frozen client);
* ``idle``: the group has applied everything and nothing is arriving.

under each group protocol: the classic protocol with cooperative-sticky or eager range
assignment (session timeout 6 s, frozen 12 s), and KIP-848 ``group.protocol=consumer``
(the broker's ``group.consumer.session.timeout.ms``: 45 s by default, which is also its
minimum; frozen 7 s longer, so that the other member has taken over by the resume).

Load: a steady feed of fresh entities (2,000 events/s through spr's producer and load
generator) from before the members start until a few seconds after the resume (stopped
while waiting for the idle moment, started again at the freeze). Every merge statement
takes at least 0.1 s (a statement trigger on the test's table), so while events arrive
the group always has some lag and a member without partitions cannot leave by
``--idle-exit`` before the group has settled.

The member frozen is the one that owns ``VICTIM_PARTITION``: after the rejoin the
assignors hand the returning member that half of the partitions (cooperative-sticky
gives a member that owns nothing the low half, KIP-848's uniform assignor the high
half), so it gets back partitions it held when it froze, as in the issue's report.

Asserted for every case:

* the surviving member takes over every partition while the other is frozen (the
  broker's description of the group shows one member owning all 12), so the freeze did
  outlast the session;
* both processes exit 0 by ``--idle-exit`` within ``EXIT_BOUND_S`` of the feed's end;
* once the session timeout has passed after the freeze, no partition with lag goes
  longer than ``PROGRESS_BOUND_S`` without its stored offset moving (offsets sampled
  once a second): the surviving member keeps committing while the other is frozen,
  and nothing stalls after the resume;
* no flush connection of the group waits on a lock for longer than ``PROGRESS_BOUND_S``;
* the final table equals the state computed independently from the load generator's
  specs, and the stored offsets equal the end offsets.

The three moments of one protocol run at the same time, each with its own topic, group,
table and two members: the first test of a protocol runs them all (pytest's durations
show the whole batch on it) and the other two read their outcome. A KIP-848 case spends
most of its ~75 s waiting for the broker's session timeout; one after the other, the
file took over 7 minutes on a 2-core machine, about 3 this way (4 to 5 while cases fail
and run into EXIT_BOUND_S).

``test_frozen_flush_transaction_does_not_block_the_survivor`` (run alone) freezes a
member inside its flush transaction for longer than the session timeout plus the
progress bound: the survivor replays the frozen member's partitions and must not be
held by the frozen transaction's row locks beyond the bound.

The moments are found from outside only: pg_stat_activity and pg_locks (the frozen
member's backend is recognised by the client port of its socket, read from /proc), the
members' /metrics and the offsets table. Only processes this test started are
signalled, by PID, and a frozen member is always resumed before it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, OffsetSpec, ResourceType
from helpers import (
    FAST_GROUP,
    assert_exact,
    drop_state,
    expected_for,
    produce_load,
    spr_run_argv,
)
from psycopg import sql
from test_metrics_scrape import free_port, scrape

from spr.dev.loadgen import LoadSpec, generate
from spr.producer import Producer

Names = Callable[[str], str]

PARTITIONS = 12
BATCH_MAX_ROWS = 5_000
IDLE_EXIT_S = 4
FEED_RATE = 2_000  # events/s
SLOW_MERGE_S = 0.1  # the least time any merge statement takes (see the module docstring)
BURST = LoadSpec(count=60_000, entities=20_000, seed=12)
CLASSIC_FREEZE_S = 12.0
PROGRESS_BOUND_S = 20.0
# Events keep arriving this long after the resume: long enough for the resumed member to
# rejoin and get partitions again (KIP-848 hands them out on heartbeats, every 5 s).
FEED_AFTER_RESUME_S = {"cooperative-sticky": 3.0, "range": 3.0, "consumer": 7.0}
EXIT_BOUND_S = 30.0
MOMENT_TIMEOUT_S = 60.0

PROTOCOLS: dict[str, tuple[str, ...]] = {
    "cooperative-sticky": ("partition.assignment.strategy=cooperative-sticky", *FAST_GROUP),
    "range": ("partition.assignment.strategy=range", *FAST_GROUP),
    "consumer": ("group.protocol=consumer",),
}
MOMENTS = ("mid-flush", "backpressure", "idle")
VICTIM_PARTITION = {"cooperative-sticky": 0, "range": 0, "consumer": PARTITIONS - 1}


def session_timeout_s(protocol: str, admin: AdminClient) -> float:
    """How long the group waits for a silent member before moving its partitions."""
    if protocol != "consumer":
        setting = next(s for s in FAST_GROUP if s.startswith("session.timeout.ms="))
        return int(setting.split("=", 1)[1]) / 1000.0
    # KIP-848: the broker owns the session timeout.
    brokers = admin.list_topics(timeout=10).brokers
    resource = ConfigResource(ResourceType.BROKER, str(min(brokers)))
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    return int(configs["group.consumer.session.timeout.ms"].value) / 1000.0


def freeze_for(protocol: str, session_s: float) -> float:
    """Past the session timeout, with time for the survivor to take over: KIP-848 hands
    out partitions on heartbeats (every 5 s), and the session runs from the last one."""
    return CLASSIC_FREEZE_S if protocol != "consumer" else session_s + 7.0


# ------------------------------------------------------------------------------ load


class Feed:
    """Fresh entities at a steady rate through one producer, in 20 ms chunks. Each chunk
    is a load-generator spec with its own entity type, so no two chunks share an entity
    and the expected state does not depend on their order."""

    def __init__(self, bootstrap: str, topic: str, rate: int = FEED_RATE) -> None:
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.specs: list[LoadSpec] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the feed did not stop"
            self._thread = None

    def _run(self) -> None:
        chunk_s = 0.02
        size = int(self.rate * chunk_s)
        try:
            producer = Producer(bootstrap=self.bootstrap, topic=self.topic)
            next_at = time.monotonic()
            while not self._stop.is_set():
                k = len(self.specs)
                spec = LoadSpec(count=size, entities=size, seed=1_000 + k,
                                entity_types=(f"feed{k}",))  # fmt: skip
                for event in generate(spec):
                    producer.send_raw(event.value, entity_type=event.entity_type,
                                      entity_id=event.entity_id, sequence=event.sequence)  # fmt: skip
                self.specs.append(spec)
                next_at += chunk_s
                while not self._stop.is_set() and time.monotonic() < next_at:
                    producer.poll(min(0.01, max(0.0, next_at - time.monotonic())))
            producer.close(30)
            assert producer.errors == 0, f"{producer.errors} feed event(s) not delivered"
        except BaseException as exc:
            self.errors.append(exc)


# --------------------------------------------------------------------------- members


@dataclass
class Member:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    frozen: bool = False

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.frozen = False

    def metrics(self) -> dict[str, float]:
        try:
            return scrape(self.port)
        except OSError:
            return {}

    def owned(self) -> set[int]:
        """The partitions with a lag series on its /metrics: the ones it owns."""
        return {
            int(k.split('partition="', 1)[1].split('"', 1)[0])
            for k in self.metrics()
            if k.startswith("spr_consumer_lag{")
        }

    def pg_client_ports(self, pg_port: int) -> list[int]:
        """Local ports of this process's TCP connections to PostgreSQL (from /proc)."""
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        ports = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as handle:
                for line in list(handle)[1:]:
                    cells = line.split()
                    if cells[9] in inodes and int(cells[2].rsplit(":", 1)[1], 16) == pg_port:
                        ports.append(int(cells[1].rsplit(":", 1)[1], 16))
        return ports

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


# ---------------------------------------------------------------------------- a case


@dataclass
class Sample:
    t: float
    stored: dict[int, int]
    ends: dict[int, int]
    activity: list[tuple[Any, ...]]


@dataclass
class Outcome:
    problems: list[str]
    summary: str
    report: str


@dataclass
class Case:
    """One frozen-member run: its names, members, feed and what was observed."""

    bootstrap: str
    dsn: str
    topic: str
    table: str
    group: str
    protocol: str
    tmp: Path
    members: list[Member] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.feed = Feed(self.bootstrap, self.topic)
        self.pg_port = int(psycopg.conninfo.conninfo_to_dict(self.dsn).get("port") or 5432)
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, name: str) -> None:
        self.marks[name] = self.now()

    # -- set-up and tear-down -----------------------------------------------------------

    def create_table(self) -> None:
        """The state table (``spr db init``), with a statement trigger that makes every
        merge take at least SLOW_MERGE_S."""
        subprocess.run([sys.executable, "-m", "spr", "db", "init", "--dsn", self.dsn,
                        "--table", self.table], check=True, capture_output=True, timeout=60)  # fmt: skip
        function = sql.Identifier(f"{self.table}_slow")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_sleep({}); RETURN NULL; END $$"
                ).format(function, sql.Literal(SLOW_MERGE_S))
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER slow_merge AFTER INSERT ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {}()"
                ).format(sql.Identifier(self.table), function)
            )

    def start_members(self) -> None:
        argv = spr_run_argv(topics=[self.topic], group=self.group, dsn=self.dsn,
                            bootstrap=self.bootstrap, table=self.table,
                            kafka=PROTOCOLS[self.protocol],
                            extra=["--batch-max-rows", str(BATCH_MAX_ROWS), "--idle-exit",
                                   str(IDLE_EXIT_S), "--no-dlq", "-v"])  # fmt: skip
        for i in range(2):
            port = free_port()
            log = self.tmp / f"member{i}.log"
            with log.open("ab") as handle:
                proc = subprocess.Popen([*argv, "--metrics-port", str(port)], stdout=handle,
                                        stderr=subprocess.STDOUT)  # fmt: skip
            self.members.append(Member(proc, port, log))
        self.mark("started")

    def wait_balanced(self) -> None:
        """Until each member owns half of the partitions (seen twice in a row)."""
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        streak = 0
        while time.monotonic() < deadline:
            owned = [m.owned() for m in self.members]
            if all(len(o) == PARTITIONS // 2 for o in owned) and len(owned[0] | owned[1]) == 12:
                streak += 1
                if streak == 2:
                    self.mark("balanced")
                    return
            else:
                streak = 0
            assert all(m.proc.poll() is None for m in self.members), (
                "a member exited before the group was balanced\n" + self.report()
            )
            time.sleep(0.25)
        raise AssertionError("the two members never split the partitions\n" + self.report())

    def one_member_owns_all(self) -> bool:
        """Whether the broker's view of the group is one member owning every partition
        (the frozen member's session has expired and the other took over)."""
        try:
            group = self.admin.describe_consumer_groups([self.group])[self.group].result(5)
        except Exception:
            return False
        owned = [{tp.partition for tp in m.assignment.topic_partitions} for m in group.members]
        return len(owned) == 1 and len(owned[0]) == PARTITIONS

    def member_owning(self, partition: int) -> Member:
        return next(m for m in self.members if partition in m.owned())

    def cleanup(self) -> None:
        for member in self.members:
            with contextlib.suppress(ProcessLookupError):
                member.thaw()
        with contextlib.suppress(Exception):
            self.feed.stop()
        for member in self.members:
            if member.proc.poll() is None:
                member.proc.kill()
                member.proc.wait()
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join(10)
        # Cleanup must not hide the case's own outcome.
        with contextlib.suppress(Exception):
            drop_state(self.dsn, self.table, [self.group])
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                function = sql.Identifier(f"{self.table}_slow")
                conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(function))

    # -- sampling -----------------------------------------------------------------------

    def start_sampling(self) -> None:
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        ends: dict[int, int] = {}
        while not self._sampling.is_set():
            t = self.now()
            try:
                futures = self.admin.list_offsets(
                    {tp: OffsetSpec.latest() for tp in tps}, request_timeout=2
                )
                ends = {tp.partition: f.result(timeout=2).offset for tp, f in futures.items()}
            except Exception:  # keep the last end offsets: they only grow
                pass
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    stored = dict(
                        conn.execute(
                            "SELECT partition, next_offset FROM spr_offsets "
                            "WHERE group_id = %s AND topic = %s",
                            (self.group, self.topic),
                        ).fetchall()
                    )
                    activity = conn.execute(
                        "SELECT pid, client_port, state, wait_event_type, wait_event, "
                        "round(extract(epoch FROM now() - xact_start)::numeric, 1), "
                        "round(extract(epoch FROM now() - query_start)::numeric, 1), "
                        "left(query, 30) FROM pg_stat_activity WHERE application_name = %s",
                        (f"spr:{self.group}",),
                    ).fetchall()
                self.samples.append(Sample(t, stored, ends, activity))
            except Exception:  # a missed sample only makes a stretch look longer
                pass
            self._sampling.wait(max(0.0, 1.0 - (self.now() - t)))

    def caught_up(self) -> bool:
        if not self.samples:
            return False
        last = self.samples[-1]
        return all(last.stored.get(p, 0) == end for p, end in last.ends.items())

    # -- freeze moments -------------------------------------------------------------------

    def _frozen(self, victim: Member) -> None:
        assert victim.proc.poll() is None, "the member exited before it could be frozen"
        self.mark("frozen")

    def freeze_mid_flush(self, victim: Member) -> None:
        """Freeze ``victim`` while its flush transaction has merged rows (it holds their
        row locks); checked again once it is stopped (else resumed and tried again)."""
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        query = (
            "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.client_port = ANY(%s) AND a.xact_start IS NOT NULL AND l.granted "
            "AND l.mode = 'RowExclusiveLock' AND l.relation = to_regclass(quote_ident(%s))"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                ports = victim.pg_client_ports(self.pg_port)
                if ports and conn.execute(query, (ports, self.table)).fetchall():
                    victim.freeze()
                    time.sleep(0.2)
                    if conn.execute(query, (ports, self.table)).fetchall():
                        self._frozen(victim)
                        return
                    victim.thaw()  # its transaction ended just before the stop
                time.sleep(0.005)
        raise AssertionError("never saw the member inside a flush transaction\n" + self.report())

    def freeze_paused(self, victim: Member) -> None:
        """Freeze ``victim`` while backpressure holds its partitions paused (see the
        module docstring: a burst plus a SHARE lock on the table held by the test)."""
        burst = threading.Thread(
            target=produce_load, args=(self.bootstrap, self.topic, BURST), daemon=True
        )
        burst.start()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            time.sleep(0.5)  # let the burst start filling the members' batches
            with conn.transaction():
                conn.execute(
                    sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(self.table))
                )
                deadline = time.monotonic() + 20.0
                while time.monotonic() < deadline:
                    if victim.metrics().get("spr_paused_partitions", 0.0) > 0:
                        victim.freeze()
                        self._frozen(victim)
                        break
                    time.sleep(0.05)
        burst.join(60)
        assert not burst.is_alive(), "the burst was not produced within 60 s"
        if "frozen" not in self.marks:
            raise AssertionError("never saw the member paused by backpressure\n" + self.report())

    def freeze_idle(self, victim: Member) -> None:
        """Stop the feed, freeze ``victim`` once every offset is at the end (before the
        members' idle exit), and start the feed again."""
        self.feed.stop()
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        seen = len(self.samples)
        while time.monotonic() < deadline:
            # A sample taken after the feed stopped shows every offset at its end.
            if len(self.samples) > seen + 1 and self.caught_up():
                victim.freeze()
                self._frozen(victim)
                self.feed.start()  # events arrive while it is frozen, and after
                return
            time.sleep(0.1)
        raise AssertionError("the group never caught up\n" + self.report())

    # -- analysis ---------------------------------------------------------------------------

    def stretches(self, since: float) -> dict[int, tuple[float, float]]:
        """Per partition, the longest time after ``since`` during which it had lag and
        its stored offset did not move: ``(seconds, started_at)``."""
        worst: dict[int, tuple[float, float]] = {}
        for p in range(PARTITIONS):
            last_move, previous = since, None
            for sample in self.samples:
                stored = sample.stored.get(p, 0)
                if stored != previous or sample.ends.get(p, 0) <= stored:
                    last_move, previous = max(sample.t, since), stored
                    continue
                if sample.t > since:
                    stretch = sample.t - last_move
                    if stretch > worst.get(p, (0.0, 0.0))[0]:
                        worst[p] = (stretch, last_move)
        return worst

    def longest_lock_wait(self) -> float:
        """The longest a statement of the group's connections was seen waiting on a lock."""
        return max(
            (
                float(row[6])
                for s in self.samples
                for row in s.activity
                if row[3] == "Lock" and row[6] is not None
            ),
            default=0.0,
        )

    def report(self) -> str:
        lines = [f"timeline (s): {', '.join(f'{k} {v:.1f}' for k, v in self.marks.items())}"]
        for name, at in self.marks.items():
            sample = min(self.samples, key=lambda s: abs(s.t - at), default=None)
            if sample is not None:
                lines.append(
                    f"stored/end offsets at {name} ({sample.t:.1f} s): "
                    + ", ".join(
                        f"{p}:{sample.stored.get(p)}/{sample.ends.get(p)}"
                        for p in range(PARTITIONS)
                    )
                )
        frozen, resumed = self.marks.get("frozen"), self.marks.get("resumed")
        if frozen is not None:
            seen = set()
            for s in self.samples:
                if s.t >= frozen and (resumed is None or s.t <= resumed + 2):
                    for row in s.activity:
                        if row[2] != "idle":
                            seen.add(f"{row[2]}/{row[3]}:{row[4]} {row[7]!r}")
            lines.append("backends of the group while frozen: " + "; ".join(sorted(seen)))
        for i, member in enumerate(self.members):
            lines.append(f"--- member {i} (pid {member.proc.pid}, exit {member.proc.poll()}):")
            lines.append(member.log_tail())
        return "\n".join(lines)


def run_case(case: Case, moment: str, session_s: float, freeze_s: float) -> Outcome:
    """Start the feed and two members, freeze one at ``moment`` for ``freeze_s``,
    resume it, stop the feed, wait for both to exit; then check everything."""
    try:
        case.create_table()
        case.start_sampling()
        case.feed.start()
        case.start_members()
        case.wait_balanced()
        victim = case.member_owning(VICTIM_PARTITION[case.protocol])
        survivor = next(m for m in case.members if m is not victim)
        if moment == "mid-flush":
            case.freeze_mid_flush(victim)
        elif moment == "backpressure":
            case.freeze_paused(victim)
        else:
            case.freeze_idle(victim)
        while case.now() - case.marks["frozen"] < freeze_s:
            assert survivor.proc.poll() is None, "the surviving member exited\n" + case.report()
            if "taken over" not in case.marks and case.one_member_owns_all():
                case.mark("taken over")
            time.sleep(0.5)
        victim.thaw()
        case.mark("resumed")
        time.sleep(FEED_AFTER_RESUME_S[case.protocol])
        case.feed.stop()
        case.mark("feed stopped")
        deadline = time.monotonic() + EXIT_BOUND_S
        while time.monotonic() < deadline and any(m.proc.poll() is None for m in case.members):
            time.sleep(0.2)
        done = all(m.proc.poll() is not None for m in case.members)
        case.mark("exited" if done else "gave up")
        return case_outcome(
            case, moment, session_s, freeze_s, [BURST] if moment == "backpressure" else []
        )
    finally:
        case.cleanup()


def case_outcome(
    case: Case, moment: str, session_s: float, freeze_s: float, extra: list[LoadSpec]
) -> Outcome:
    assert not case.feed.errors, case.feed.errors
    marks = case.marks
    summary = (
        f"{case.protocol} {moment}: frozen {freeze_s:.0f} s; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items())
        + (
            f"; the group finished {marks['exited'] - marks['resumed']:.1f} s after the resume"
            if "exited" in marks
            else "; the group did not finish"
        )
    )
    problems = []
    if "taken over" not in marks:
        problems.append(
            "the surviving member never owned every partition while the other was frozen "
            "(the freeze did not outlast the session timeout?)"
        )
    codes = [m.proc.poll() for m in case.members]
    if codes != [0, 0]:
        problems.append(
            f"exit codes {codes} {EXIT_BOUND_S:.0f} s after the feed stopped (None: still "
            f"running; resumed at {marks['resumed']:.1f} s)"
        )
    since = marks["frozen"] + session_s
    stalls = {p: s for p, s in case.stretches(since).items() if s[0] > PROGRESS_BOUND_S}
    if stalls:
        problems.append(
            f"partitions with lag and no progress for more than {PROGRESS_BOUND_S:.0f} s "
            f"once the session timeout had passed (at {since:.1f} s): "
            + ", ".join(f"{p}: {s:.0f} s from {t:.1f} s" for p, (s, t) in sorted(stalls.items()))
        )
    lock_wait = case.longest_lock_wait()
    if lock_wait > PROGRESS_BOUND_S:
        problems.append(f"a statement of the group waited {lock_wait:.0f} s on a lock")
    try:
        assert_exact(dsn=case.dsn, bootstrap=case.bootstrap, table=case.table, group=case.group,
                     topics=[case.topic], expected=expected_for(*extra, *case.feed.specs))  # fmt: skip
    except AssertionError as exc:
        problems.append(f"final state or offsets wrong: {str(exc)[:600]}")
    return Outcome(problems, summary, case.report())


def check(outcome: Outcome) -> None:
    print(outcome.summary)
    assert not outcome.problems, (
        "\n".join(outcome.problems) + "\n" + outcome.summary + "\n" + outcome.report
    )


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str], Outcome | BaseException]:
    """Outcomes of the cases run so far, by (protocol, moment)."""
    return {}


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_frozen_member_resumes_and_the_group_finishes(
    protocol: str, moment: str, request: pytest.FixtureRequest, bootstrap: str, dsn: str,
    admin: AdminClient, make_topic: Callable[..., str], unique_name: Names,
    outcomes: dict[tuple[str, str], Outcome | BaseException], tmp_path: Path,
) -> None:  # fmt: skip
    if (protocol, moment) not in outcomes:
        # Run every selected moment of this protocol at once (see the module docstring).
        selected = [
            item.callspec.params["moment"]
            for item in request.session.items
            if getattr(item, "originalname", None) == request.node.originalname
            and item.callspec.params["protocol"] == protocol
        ]
        session_s = session_timeout_s(protocol, admin)
        cases = {}
        for m in selected:
            cases[m] = Case(bootstrap=bootstrap, dsn=dsn, protocol=protocol, tmp=tmp_path / m,
                            topic=make_topic(partitions=PARTITIONS, prefix="frozen"),
                            table=unique_name("frozen"), group=unique_name("frozen"))  # fmt: skip
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            futures = {
                m: pool.submit(run_case, case, m, session_s, freeze_for(protocol, session_s))
                for m, case in cases.items()
            }
            for m, future in futures.items():
                try:
                    outcomes[(protocol, m)] = future.result(timeout=600)
                except BaseException as exc:
                    outcomes[(protocol, m)] = exc
    outcome = outcomes[(protocol, moment)]
    if isinstance(outcome, BaseException):
        raise outcome
    check(outcome)


def test_frozen_flush_transaction_does_not_block_the_survivor(
    bootstrap: str, dsn: str, admin: AdminClient, make_topic: Callable[..., str],
    unique_name: Names, tmp_path: Path,
) -> None:  # fmt: skip
    protocol = "cooperative-sticky"
    session_s = session_timeout_s(protocol, admin)
    case = Case(bootstrap=bootstrap, dsn=dsn, protocol=protocol, tmp=tmp_path,
                topic=make_topic(partitions=PARTITIONS, prefix="frozen"),
                table=unique_name("frozen"), group=unique_name("frozen"))  # fmt: skip
    # Held long enough that the survivor, once it replays the frozen member's
    # partitions, would wait on the frozen transaction's row locks for longer than the
    # progress bound.
    check(run_case(case, "mid-flush", session_s, session_s + PROGRESS_BOUND_S + 7.0))
