"""PostgreSQL primary failover under ``spr run`` with live traffic (issue 18).

spr writes each batch's rows and its next offsets in one transaction, and runs with a
multi-host DSN (``host=a,b ... target_session_attrs=read-write``), so after a lost
connection it reconnects to whichever server accepts writes. Each test checks the
final state on the new primary against a model computed independently from the load
generator's events, and the stored offsets against the topics' end offsets:

1. the primary's postmaster is killed (SIGKILL) and the standby promoted, with
   synchronous replication (nothing acknowledged is lost: spr never sees lost
   commits) and with asynchronous replication (the last commits may be lost; spr
   notices and consumes them again);
2. a planned switchover: the primary is stopped cleanly and fenced, the standby
   promoted, and the old primary rewound (``pg_rewind``) into a standby of the new one;
3. split brain: the killed primary comes back as a writer before it is fenced; spr,
   made to reconnect, refuses it (its timeline is older than the one spr wrote on) and
   never writes to it, and goes on with the new primary once the old one is fenced.

Each records the time from the failure to the first commit on the new primary and the
events consumed twice (consumed by spr minus the events in the topic).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import (
    assert_exact,
    end_offsets,
    expected_for,
    produce_in_background,
    spr_run_argv,
    start,
    wait_for,
)
from pg_pair import Pair

from spr.dev.loadgen import LoadSpec
from spr.dev.standby import PRIMARY, STANDBY, PgNode, rejoin_as_standby, wait_streaming

Record = Callable[[str, dict[str, Any]], None]

_RUN_TIMEOUT_S = 120


def offsets_total(dsn: str, group: str) -> int:
    """The sum of the group's stored offsets on one server; -1 when it cannot say."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(next_offset), 0) FROM spr_offsets WHERE group_id = %s",
                (group,),
            ).fetchone()
    except psycopg.Error:
        return -1
    return int(row[0]) if row else 0


def snapshot(dsn: str, table: str, group: str) -> tuple[int, int, str]:
    """What one server holds: the group's offsets, the table's rows, its newest write."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        offsets = conn.execute(
            "SELECT coalesce(sum(next_offset), 0), coalesce(max(updated_at)::text, '') "
            "FROM spr_offsets WHERE group_id = %s",
            (group,),
        ).fetchone()
        rows = conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(table))
        ).fetchone()
    assert offsets is not None and rows is not None
    return int(offsets[0]), int(rows[0]), str(offsets[1])


def first_commit_after(dsn: str, group: str, baseline: int, since: float, timeout: float) -> float:
    """Seconds from ``since`` (monotonic) until the group's offsets on ``dsn`` first
    move past ``baseline``: spr's first commit there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if offsets_total(dsn, group) > baseline:
            return round(time.monotonic() - since, 3)
        time.sleep(0.02)
    raise AssertionError(f"spr committed nothing on the new primary within {timeout} s")


def walsenders(node: PgNode) -> list[int]:
    with psycopg.connect(node.conninfo("postgres"), autocommit=True) as conn:
        return [int(pid) for (pid,) in conn.execute("SELECT pid FROM pg_stat_replication")]


def start_when_free(node: PgNode, timeout: float = 20.0) -> None:
    """Start a killed node again; its orphaned backends may hold the shared memory for a
    moment after the postmaster died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            node.start()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Traffic:
    """One test's topic, load, and ``spr run`` on the pair's multi-host DSN."""

    def __init__(self, pair: Pair, bootstrap: str, topic: str, tmp_path: Path, spec: LoadSpec):
        self.pair = pair
        self.bootstrap = bootstrap
        self.topic = topic
        self.spec = spec
        self.table = f"state_{uuid.uuid4().hex[:8]}"
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.log = tmp_path / "run.log"
        self.stats = tmp_path / "stats.json"
        self.producer, self.errors = produce_in_background(bootstrap, topic, spec, rate=2_000)
        argv = spr_run_argv(
            topics=[topic], group=self.group, dsn=pair.dsn(), bootstrap=bootstrap,
            table=self.table,
            extra=["--batch-max-rows", "200", "--idle-exit", "3", "--stats", str(self.stats)],
        )  # fmt: skip
        self.proc = start(argv, self.log)

    def progress(self, node: PgNode) -> int:
        return offsets_total(self.pair.direct(node), self.group)

    def finish(self, primary: PgNode) -> dict[str, Any]:
        """Wait for the load and for spr's idle exit; check the exact state on
        ``primary``; returns spr's counters."""
        try:
            self.producer.join(90)
            assert not self.errors, self.errors
            code = self.proc.wait(_RUN_TIMEOUT_S)
            assert code == 0, self.text()[-3000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert_exact(dsn=self.pair.direct(primary), bootstrap=self.bootstrap, table=self.table,
                     group=self.group, topics=[self.topic],
                     expected=expected_for(self.spec))  # fmt: skip
        stats: dict[str, Any] = json.loads(self.stats.read_text())
        return stats

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def consumed_twice(self, stats: dict[str, Any]) -> int:
        return int(stats["consumed"]) - sum(end_offsets(self.bootstrap, self.topic).values())


@pytest.mark.parametrize("replication", ["synchronous", "asynchronous"])
def test_killed_primary_then_promotion_keeps_effects_exactly_once(
    replication: str, pair_factory: Callable[..., Pair], bootstrap: str,
    make_topic: Callable[..., str], tmp_path: Path, record: Record,
) -> None:  # fmt: skip
    pair = pair_factory(synchronous=replication == "synchronous")
    spec = LoadSpec(count=8_000, entities=20_000, seed=181, duplicates=0.05, stale=0.05)
    traffic = Traffic(pair, bootstrap, make_topic(partitions=3), tmp_path, spec)
    try:
        wait_for(lambda: traffic.progress(pair.first) > 1_500, 60, "progress on the primary")
        frozen = []
        if replication == "asynchronous":
            # A standby that lags: its WAL sender is frozen while the primary goes on
            # acknowledging commits, which the promotion then loses (every time, not
            # only when the kill happens to beat the WAL sender).
            frozen = walsenders(pair.first)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            mark = traffic.progress(pair.first)
            wait_for(lambda: traffic.progress(pair.first) > mark + 600, 30, "unreplicated commits")
        killed = time.monotonic()
        pair.first.kill()
        for pid in frozen:  # orphaned by the kill: it would never notice, being stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pair.first.fence()  # its data folder: read-only should it ever start again
        pair.second.promote()
        baseline = traffic.progress(pair.second)
        promoted_s = round(time.monotonic() - killed, 3)
        first_s = first_commit_after(pair.direct(pair.second), traffic.group, baseline,
                                     killed, 60)  # fmt: skip
        stats = traffic.finish(pair.second)
    finally:
        traffic.stop()
    text = traffic.text()
    assert "retry" in text  # the outage was seen, and survived
    lost = text.count("commits_lost")
    if replication == "synchronous":
        # Every commit spr saw acknowledged had reached the standby first.
        assert lost == 0, text[-3000:]
    else:
        # Acknowledged commits were lost with the primary, noticed, and consumed again.
        assert lost >= 1, text[-3000:]
        assert traffic.consumed_twice(stats) > 0
    record(
        f"kill_primary_{replication}",
        {
            "kill_to_promoted_s": promoted_s,
            "kill_to_first_commit_on_new_primary_s": first_s,
            "events_consumed_twice": traffic.consumed_twice(stats),
            "commits_lost_replays": lost,
            "unknown_commits": text.count("whose commit was unknown"),
            "flush_retries": stats.get("flush_retries"),
            "events": spec.count,
        },
    )


def test_planned_switchover_demotes_the_old_primary_to_a_standby(
    pair_factory: Callable[..., Pair], bootstrap: str, make_topic: Callable[..., str],
    tmp_path: Path, record: Record,
) -> None:  # fmt: skip
    pair = pair_factory(synchronous=False)
    spec = LoadSpec(count=8_000, entities=20_000, seed=182, duplicates=0.05, stale=0.05)
    traffic = Traffic(pair, bootstrap, make_topic(partitions=3), tmp_path, spec)
    try:
        wait_for(lambda: traffic.progress(pair.first) > 1_500, 60, "progress on the primary")
        stopped = time.monotonic()
        # A clean stop sends the standby everything first: a switchover loses nothing.
        pair.first.fence()
        pair.second.promote()
        baseline = traffic.progress(pair.second)
        first_s = first_commit_after(pair.direct(pair.second), traffic.group, baseline,
                                     stopped, 60)  # fmt: skip
        rejoin_as_standby(pair.first, pair.second)
        rejoined_s = round(time.monotonic() - stopped, 3)
        stats = traffic.finish(pair.second)
    finally:
        traffic.stop()
    assert pair.first.role() == STANDBY and pair.second.role() == PRIMARY
    text = traffic.text()
    assert "commits_lost" not in text, text[-3000:]
    # The demoted node follows the new primary: once it has replayed everything, it
    # holds the same state.
    wait_streaming(pair.second)
    with psycopg.connect(pair.direct(pair.second), autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None

    def replayed() -> bool:
        with psycopg.connect(pair.direct(pair.first), autocommit=True) as conn:
            got = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)
            ).fetchone()
        return bool(got and got[0])

    wait_for(replayed, 30, "the demoted primary to replay the new primary's WAL")
    assert (
        snapshot(pair.direct(pair.first), traffic.table, traffic.group)[:2]
        == snapshot(pair.direct(pair.second), traffic.table, traffic.group)[:2]
    )
    record(
        "planned_switchover",
        {
            "stop_to_first_commit_on_new_primary_s": first_s,
            "stop_to_old_primary_streaming_again_s": rejoined_s,
            "events_consumed_twice": traffic.consumed_twice(stats),
            "unknown_commits": text.count("whose commit was unknown"),
            "flush_retries": stats.get("flush_retries"),
            "events": spec.count,
        },
    )


def test_an_unfenced_old_primary_is_never_written_to(
    pair_factory: Callable[..., Pair], bootstrap: str, make_topic: Callable[..., str],
    tmp_path: Path, record: Record,
) -> None:  # fmt: skip
    pair = pair_factory(synchronous=False)
    spec = LoadSpec(count=24_000, entities=20_000, seed=183, duplicates=0.05, stale=0.05)
    traffic = Traffic(pair, bootstrap, make_topic(partitions=3), tmp_path, spec)
    old, new = pair.first, pair.second
    try:
        wait_for(lambda: traffic.progress(old) > 1_500, 60, "progress on the primary")
        killed = time.monotonic()
        old.kill()
        new.promote()  # and no fencing: the old primary may come back as a writer
        baseline = traffic.progress(new)
        first_s = first_commit_after(pair.direct(new), traffic.group, baseline, killed, 60)
        start_when_free(old)
        assert old.role() == PRIMARY  # two writers now: split brain
        before = snapshot(pair.direct(old), traffic.table, traffic.group)
        # Make spr reconnect: libpq tries the old primary first (the DSN lists it first).
        with psycopg.connect(pair.direct(new), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'spr%' AND pid <> pg_backend_pid()"
            )
        wait_for(lambda: "old primary that came back" in traffic.text(), 30,
                 "spr to refuse the old primary")  # fmt: skip
        time.sleep(1.0)  # a few more refused attempts
        after = snapshot(pair.direct(old), traffic.table, traffic.group)
        refused_s = round(time.monotonic() - killed, 3)
        # What the operator does: fence the old primary. spr then goes on by itself.
        old.fence()
        stats = traffic.finish(new)
    finally:
        traffic.stop()
    assert before == after, (before, after)  # spr wrote nothing to the old primary
    # Started again, the fenced node is read-only, and still holds only what it had.
    old.start()
    with contextlib.suppress(AssertionError):
        old.wait_role(STANDBY, 30)
    assert old.role() == STANDBY
    assert snapshot(pair.direct(old), traffic.table, traffic.group) == before
    record(
        "split_brain",
        {
            "kill_to_first_commit_on_new_primary_s": first_s,
            "kill_to_fenced_s": refused_s,
            "events_consumed_twice": traffic.consumed_twice(stats),
            "old_primary_refusals": traffic.text().count("old primary that came back"),
            "unknown_commits": traffic.text().count("whose commit was unknown"),
            "flush_retries": stats.get("flush_retries"),
            "events": spec.count,
        },
    )
