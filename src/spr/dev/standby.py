"""A streaming standby for the local PostgreSQL, and the failover between the two.

``spr dev up --pg-standby`` turns the dev stack's server into a primary that streams its
WAL (``wal_level = replica``, WAL senders, a ``replication`` line for 127.0.0.1 in
``pg_hba.conf``, ``wal_log_hints`` so that ``pg_rewind`` can later turn it back into a
standby) and clones it with ``pg_basebackup -R`` into a second cluster on the next port
(primary port + 1). The pair is remembered in ``<state dir>/postgres-standby.json``.

``spr dev pg-failover`` is the manual promotion a production failover manager
(pg_auto_failover, Patroni, a managed service) performs:

1. it *fences* the old primary first: stops it (``pg_ctl stop -m fast``) when it is
   alive and leaves a ``standby.signal`` in its data directory, so that starting it
   again brings it up read-only (in recovery), never as a second writer. A client whose
   DSN says ``target_session_attrs=read-write`` then skips it;
2. then it promotes the standby (``pg_ctl promote``) and waits until it accepts writes.

:func:`rejoin_as_standby` turns a fenced old primary into a standby of the new one
(``pg_rewind``, then streaming), which completes a planned switchover.

Every node's role is read from the server itself (``pg_is_in_recovery()``), never from
the file: ``primary``, ``standby`` or ``stopped``. As root the clusters run as the
``postgres`` user, like the stack's primary. Processes are stopped through their data
directory (``pg_ctl -D``) or by their recorded postmaster PID, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from spr.dev.stack import _pg_bindir, _pid_alive, _port_open, _read_pid
from spr.errors import ServerUnavailable, SprError

__all__ = [
    "PgNode",
    "StandbyPair",
    "configure_primary",
    "init_primary",
    "make_standby",
    "rejoin_as_standby",
]

_START_TIMEOUT_S = 60.0
_ROLE_TIMEOUT_S = 60.0
PRIMARY, STANDBY, STOPPED = "primary", "standby", "stopped"

#: What a primary needs to feed a streaming standby (and to be rewound later).
REPLICATION_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "wal_log_hints": "on",
    "wal_keep_size": "512MB",
}
_HBA_REPLICATION = "host replication all 127.0.0.1/32 trust\n"


def _run_pg(tool: str, *args: str, check: bool = True, timeout: float = 120.0) -> str:
    command = [str(_pg_bindir() / tool), *args]
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        command = ["runuser", "-u", "postgres", "--", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ServerUnavailable(
            f"PostgreSQL's {tool} did not finish within {timeout:.0f} s"
        ) from None
    output = (done.stdout + done.stderr).strip()
    if check and done.returncode != 0:
        raise ServerUnavailable(f"PostgreSQL's {tool} failed: {output[-1500:]}")
    return output


@dataclass(frozen=True)
class PgNode:
    """One PostgreSQL cluster on 127.0.0.1: its data directory and port."""

    data: Path
    port: int

    @property
    def log(self) -> Path:
        return self.data.parent / (self.data.name + ".log")

    def conninfo(self, dbname: str = "spr") -> str:
        return f"host=127.0.0.1 port={self.port} user=spr dbname={dbname}"

    def pid(self) -> int | None:
        """The postmaster's PID while it lives (from ``postmaster.pid``)."""
        pid = _read_pid(self.data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None and _port_open("127.0.0.1", self.port)

    def role(self) -> str:
        """``primary``, ``standby`` or ``stopped``, asked of the server. Never raises."""
        if not self.running():
            return STOPPED
        import psycopg

        try:
            with psycopg.connect(self.conninfo("postgres"), connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return STOPPED
        return STANDBY if row and row[0] else PRIMARY

    def wait_role(self, role: str, timeout: float = _ROLE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.role() != role:
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"PostgreSQL on 127.0.0.1:{self.port} did not become {role} within "
                    f"{timeout:.0f} s; see {self.log}"
                )
            time.sleep(0.1)

    def start(self) -> None:
        """Start the cluster (crash recovery first, after a kill); blocks until it
        accepts connections. ``-l``: the server must not inherit our pipes."""
        _run_pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                "-t", str(int(_START_TIMEOUT_S)), "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop it through its data directory (a no-op when it is not running); a
        postmaster that outlives ``pg_ctl`` is killed by its PID."""
        pid = self.pid()
        if pid is None:
            return
        _run_pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop", check=False)
        if _pid_alive(pid):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster: the crash of a primary, no shutdown at all."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def promote(self) -> None:
        """Promote this standby and wait until it accepts writes."""
        _run_pg("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")
        self.wait_role(PRIMARY)

    def fence(self) -> None:
        """Make sure this node never runs as a writer again by itself: stop it when it
        runs, and leave a ``standby.signal``, so that a later start is read-only."""
        self.stop("fast")
        signal_file = self.data / "standby.signal"
        if self.data.is_dir() and not signal_file.exists():
            signal_file.touch()
            if os.geteuid() == 0:
                shutil.chown(signal_file, "postgres", "postgres")


def _owned_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    path.chmod(0o700)


def _append_conf(node: PgNode, settings: dict[str, str], note: str) -> None:
    with (node.data / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# {note}\n")
        conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())


def _node_settings(node: PgNode) -> dict[str, str]:
    return {
        "listen_addresses": "127.0.0.1",
        "port": str(node.port),
        "unix_socket_directories": str(node.data),
    }


def _allow_replication(node: PgNode) -> None:
    hba = node.data / "pg_hba.conf"
    lines = hba.read_text().splitlines()
    if not any(
        line.split()[:4] == ["host", "replication", "all", "127.0.0.1/32"]
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ):
        with hba.open("a") as out:
            out.write(_HBA_REPLICATION)


def init_primary(node: PgNode, *, settings: dict[str, str] | None = None) -> None:
    """A new cluster in ``node.data`` (user ``spr``, trust on 127.0.0.1), ready to feed
    standbys, with ``settings`` on top (``synchronous_standby_names``, say). Not
    started. Raises ServerUnavailable when initdb fails."""
    _owned_dir(node.data)
    _run_pg("initdb", "-D", str(node.data), "-U", "spr", "--auth=trust",
            "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")  # fmt: skip
    _append_conf(node, {**_node_settings(node), **REPLICATION_SETTINGS, **(settings or {})},
                 "spr: a primary with streaming standbys")  # fmt: skip
    _allow_replication(node)


def configure_primary(node: PgNode) -> bool:
    """Give a running cluster what a streaming standby needs (``ALTER SYSTEM``, the
    ``pg_hba`` line); restarts it when ``wal_level`` had to change. Returns whether it
    restarted."""
    import psycopg

    _allow_replication(node)
    with psycopg.connect(node.conninfo("postgres"), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
        for key, value in REPLICATION_SETTINGS.items():
            conn.execute(
                psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    psycopg.sql.Identifier(key), psycopg.sql.Literal(value)
                )
            )
        conn.execute("SELECT pg_reload_conf()")
    # wal_level, max_wal_senders and wal_log_hints take effect only on a restart.
    restart = row is None or row[0] == "minimal"
    if restart:
        node.stop("fast")
        node.start()
    return restart


def make_standby(primary: PgNode, standby: PgNode, *, timeout: float = _ROLE_TIMEOUT_S) -> None:
    """Clone the running ``primary`` into ``standby.data`` (``pg_basebackup -R``: it
    writes ``standby.signal`` and ``primary_conninfo``), start it on its own port and
    wait until it streams. Raises ServerUnavailable when a step fails."""
    if standby.data.exists():
        shutil.rmtree(standby.data)
    _owned_dir(standby.data)
    _run_pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "spr",
            "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast",
            "--no-sync")  # fmt: skip
    # Once promoted it has no standby of its own: it must not wait for one.
    _append_conf(standby, {**_node_settings(standby), "synchronous_standby_names": ""},
                 "spr: the streaming standby")  # fmt: skip
    standby.start()
    standby.wait_role(STANDBY, timeout)
    wait_streaming(primary, timeout)


def wait_streaming(primary: PgNode, timeout: float = _ROLE_TIMEOUT_S) -> None:
    """Block until ``primary`` has a standby streaming from it."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(primary.conninfo("postgres"), connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
            if row and row[0]:
                return
        except psycopg.Error:
            pass
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"no standby streams from PostgreSQL on 127.0.0.1:{primary.port} after "
                f"{timeout:.0f} s"
            )
        time.sleep(0.1)


def rejoin_as_standby(old: PgNode, new_primary: PgNode) -> None:
    """Turn the fenced old primary into a streaming standby of ``new_primary``:
    ``pg_rewind`` takes back whatever it wrote that the new primary never had, then it
    follows the new timeline. Blocks until it streams."""
    old.stop("fast")
    if old.data.joinpath("standby.signal").exists():
        # pg_rewind wants a cluster that was shut down cleanly as a primary or standby;
        # the signal file is written again below.
        old.data.joinpath("standby.signal").unlink()
    _run_pg("pg_rewind", "-D", str(old.data), "--source-server",
            new_primary.conninfo("postgres"), "--no-sync")  # fmt: skip
    with (old.data / "postgresql.auto.conf").open("a") as conf:
        conf.write(
            f"primary_conninfo = 'host=127.0.0.1 port={new_primary.port} user=spr'\n"
            "recovery_target_timeline = 'latest'\n"
        )
    old.fence()  # the standby.signal
    old.start()
    old.wait_role(STANDBY)
    wait_streaming(new_primary)


# ---------------------------------------------------------------- the dev stack's pair


class StandbyPair:
    """The dev stack's two clusters, as remembered in ``postgres-standby.json``."""

    def __init__(self, state: Path, primary: PgNode) -> None:
        self.file = state / "postgres-standby.json"
        self.first = primary
        self.second = PgNode(
            data=primary.data.parent / (primary.data.name + "-standby"), port=primary.port + 1
        )

    @property
    def exists(self) -> bool:
        return self.file.exists()

    @property
    def nodes(self) -> tuple[PgNode, PgNode]:
        return (self.first, self.second)

    def dsn(self) -> str:
        """The multi-host DSN that reaches whichever node is primary."""
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.first.port},{self.second.port} "
            "user=spr dbname=spr target_session_attrs=read-write"
        )

    def up(self) -> None:
        """Make the running first cluster a primary and give it a streaming standby;
        idempotent (a standby that runs is left alone, one that is stopped is started)."""
        if self.exists and self.second.data.joinpath("PG_VERSION").exists():
            if not self.second.running():
                self.second.start()
            self._remember()
            return
        configure_primary(self.first)
        make_standby(self.first, self.second)
        self._remember()

    def _remember(self) -> None:
        self.file.write_text(
            json.dumps(
                {
                    "nodes": [
                        {"data": str(n.data), "port": n.port} for n in (self.first, self.second)
                    ],
                    "dsn": self.dsn(),
                }
            )
        )

    def status(self) -> list[dict[str, object]]:
        return [
            {"port": node.port, "data": str(node.data), "role": node.role()} for node in self.nodes
        ]

    def failover(self) -> tuple[PgNode, PgNode]:
        """Fence the primary (or the node that was), then promote the standby. Returns
        ``(old, new)``. Raises SprError when there is no standby to promote."""
        if not self.exists:
            raise SprError(
                "there is no PostgreSQL standby to promote; start the stack with "
                "'spr dev up --pg-standby' first"
            )
        roles = {node: node.role() for node in self.nodes}
        standbys = [node for node, role in roles.items() if role == STANDBY]
        if not standbys:
            raise SprError(
                "no PostgreSQL node is running as a standby, so there is nothing to promote "
                f"(roles: {', '.join(f'{n.port} {r}' for n, r in roles.items())})"
            )
        new = standbys[0]
        old = self.second if new is self.first else self.first
        old.fence()
        new.promote()
        return old, new

    def down(self) -> list[str]:
        """Stop the standby (the first cluster is the stack's, stopped by it)."""
        pid = self.second.pid()
        if pid is None:
            return []
        self.second.stop("fast")
        return [f"postgres standby (pid {pid})"]


def stack_pair(root: Path, primary_data: Path, primary_port: int) -> StandbyPair:
    """The standby pair of the dev stack whose state folder is ``root`` and whose
    PostgreSQL lives in ``primary_data`` on ``primary_port``."""
    return StandbyPair(root, PgNode(data=primary_data, port=primary_port))


def add_status(pair: StandbyPair, status: dict[str, dict[str, object]]) -> None:
    """With a standby: the ``postgres`` entry of ``spr dev status`` gets each server's
    role (``servers``), the DSN that follows the primary, and ``running`` true while a
    primary runs. Without one it is left as it is."""
    if not pair.exists:
        return
    servers = pair.status()
    entry = status.setdefault("postgres", {})
    entry["dsn"] = pair.dsn()
    entry["running"] = any(server["role"] == PRIMARY for server in servers)
    entry["servers"] = servers
