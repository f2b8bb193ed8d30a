"""``spr run --synchronous-commit off`` survives a PostgreSQL crash exactly once (issue 15).

Each flush commits its rows and its offsets in one transaction, so a crash that loses
the last asynchronous commits loses both together, and the events are consumed again
from Kafka. The test proves both halves on a private PostgreSQL cluster of its own (its
own data directory and port, never the shared stack's server, which others measure):

* the trade is real: ``pg_ctl stop -m immediate`` (no clean shutdown, no final WAL
  flush) mid-stream loses commits that other sessions had already seen;
* it costs nothing in correctness: once the server is back, every entity is at its
  newest sequence and the stored offsets equal the topic's end offsets.

spr is not restarted: its flush connection reconnects, finds the stored offsets below
what it had committed, and consumes the lost events again by itself (``commits_lost``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import (
    assert_exact,
    expected_for,
    produce_in_background,
    spr_run_argv,
    start,
    stored_offsets,
    wait_for,
)

from spr.config import TableMapping
from spr.dev.loadgen import LoadSpec
from spr.dev.stack import _pg_bindir
from spr.errors import CommitsLost
from spr.sink import PostgresSink

Names = Callable[[str], str]

# Asynchronous commits reach the WAL files when the WAL writer next runs (every
# wal_writer_delay, 200 ms by default, or once wal_writer_flush_after bytes wait) or when
# anything else flushes the WAL. Production loses up to about three delays; here the
# delay is stretched to its maximum and the other flushers are turned off, so that the
# commits of the last moments before the crash are still only in shared memory, every
# time: that is what lets the test assert that commits were lost, not merely allow it.
_CRASH_PRONE = {
    "wal_writer_delay": "10s",
    "wal_writer_flush_after": "1GB",
    "autovacuum": "off",  # its synchronous commits would flush spr's WAL too
    "bgwriter_lru_maxpages": "0",  # writing a dirty page flushes the WAL up to it
    "checkpoint_timeout": "30min",
    "max_wal_size": "1GB",
    "shared_buffers": "64MB",
    "wal_buffers": "16MB",
    "max_connections": "20",
}
_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 and a port of its own, for a test
    that crashes the server. Everything it starts is stopped through its own data
    directory's postmaster.pid (``pg_ctl -D``), never by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()

    def dsn(self, port: int | None = None) -> str:
        return f"postgresql://spr@127.0.0.1:{port or self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> str:
        command = [str(_pg_bindir() / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        output = done.stdout + done.stderr
        assert not check or done.returncode == 0, f"{tool} failed: {output[-2000:]}"
        return output

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "spr", "--auth=trust",
                  "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.data}'",
            **{key: f"'{value}'" for key, value in _CRASH_PRONE.items()},
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# a private cluster of a crash test\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self, port: int | None = None) -> None:
        """Start the server (after a crash: recover first) on ``port`` (default its own);
        blocks until it accepts connections. ``-l``: it must not inherit our pipes."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(_START_TIMEOUT_S), "-o", f"-p {port or self.port}",
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``immediate`` is the crash: every server process quits at once, nothing is
        written or flushed on the way out (the next start runs crash recovery)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return "server is running" in self._run("pg_ctl", "-D", str(self.data), "status",
                                                check=False)  # fmt: skip


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not under pytest's tmp_path: as root the server runs as 'postgres', which must be
    # able to reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="spr-crash-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = PrivatePostgres(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            if server.running():
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def progress(dsn: str, group: str, topic: str) -> int:
    try:
        return sum(stored_offsets(dsn, group, [topic]).values())
    except psycopg.Error:  # the table does not exist yet, or the server is down
        return 0


def test_crash_loses_recent_commits_and_spr_consumes_them_again(
    bootstrap: str, make_topic: Callable[..., str], unique_name: Names, tmp_path: Path,
    private_postgres: PrivatePostgres,
) -> None:  # fmt: skip
    server = private_postgres
    dsn = server.dsn()
    topic = make_topic(partitions=3)
    # More entities than events: most have one event, so the events of a lost commit
    # are mostly their entity's last, and a lost commit that was not consumed again
    # would show as missing rows (with few entities, later events would hide it).
    spec = LoadSpec(count=6_000, entities=20_000, seed=151, duplicates=0.05, stale=0.05)
    table, group = unique_name("state"), unique_name("g")
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--synchronous-commit", "off", "--batch-max-rows", "200",
                               "--idle-exit", "3"])  # fmt: skip
    log = tmp_path / "run.log"
    producer, errors = produce_in_background(bootstrap, topic, spec, rate=1_500)
    proc = start(argv, log)
    try:
        wait_for(lambda: progress(dsn, group, topic) > 1_500, 30, "progress")
        # Mid-stream. spr is frozen for the moment of the crash only so that the test
        # knows which commits the server had acknowledged when it crashed: running, spr
        # would commit again between this read and the crash, and each commit lets the
        # WAL writer write out the full pages before it (see _CRASH_PRONE).
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            seen = stored_offsets(dsn, group, [topic])
            server.stop("immediate")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Recovered on a port spr does not know, so that what survived the crash is read
        # before spr can write again; then back on its own port.
        side = free_port()
        server.start(side)
        survived = stored_offsets(server.dsn(side), group, [topic])
        server.stop()
        server.start()
        producer.join(60)
        assert not errors
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "synchronous_commit is off" in text  # said once, at start
    assert text.count("synchronous_commit is off") == 1
    assert "retry" in text  # the outage was seen, and survived
    assert "commits_lost" in text  # the loss was noticed, and replayed in the same process
    # The trade: commits already visible to other sessions did not survive the crash.
    assert all(survived.get(key, 0) <= offset for key, offset in seen.items()), (seen, survived)
    assert sum(survived.values()) < sum(seen.values()), (seen, survived)
    # And exactly-once effects all the same: the lost events were consumed again.
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip


def test_a_new_flush_connection_refuses_offsets_the_database_no_longer_holds(
    unique_name: Names, private_postgres: PrivatePostgres,
) -> None:  # fmt: skip
    """The check behind the replay, on its own: with ``durable_offsets`` set, a new
    connection compares them with the stored offsets before anything is flushed."""
    dsn = private_postgres.dsn()
    mapping = TableMapping(table=unique_name("state"))
    with PostgresSink(dsn, group_id="g", mapping=mapping) as sink:
        sink.init_schema()
        sink.connect().execute(
            "INSERT INTO spr_offsets (group_id, topic, partition, next_offset) "
            "VALUES ('g', 't', 0, 5), ('g', 't', 2, 9)"
        )
    sink = PostgresSink(dsn, group_id="g", mapping=mapping, synchronous_commit="off")
    sink.durable_offsets = {("t", 0): 7, ("t", 1): 3, ("t", 2): 8}
    with pytest.raises(CommitsLost, match=r"t\[0\] is at 5 instead of 7") as caught:
        sink.connect()
    assert caught.value.stored == {("t", 0): 5, ("t", 1): None}
    assert caught.value.expected == {("t", 0): 7, ("t", 1): 3}
    assert sink.lost_commits is caught.value
    # Told what the database holds (or less), it connects, with the session's setting.
    sink.durable_offsets = {("t", 0): 5, ("t", 2): 8}
    with sink:
        row = sink.connect().execute("SHOW synchronous_commit").fetchone()
        assert row is not None and row[0] == "off"
