"""Apache Kafka for the local stack (``spr dev``): the jars, and the nodes it runs.

:func:`kafka_libs` resolves the official jars with Maven into a per-user cache.
:func:`kafka_nodes` lays out one node or a three-node cluster (ports, folders), and
:func:`kafka_properties` writes each node's ``server.properties``: a combined broker and
controller in KRaft mode, a static quorum of all the nodes, and with three nodes the
replication production uses (factor 3, ``min.insync.replicas=2``). Starting, stopping
and waiting are :class:`spr.dev.stack.DevStack`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from spr.config.defaults import DEV_KAFKA_HOST, DEV_KAFKA_PORT
from spr.errors import SprError, ToolMissing

__all__ = [
    "BROKER_COUNTS",
    "CONTROLLER_PORT",
    "KAFKA_HOST",
    "KAFKA_PORT",
    "KAFKA_VERSION",
    "LOG4J2_PROPERTIES",
    "KafkaNode",
    "active_controller",
    "cache_dir",
    "kafka_answers_metadata",
    "kafka_libs",
    "kafka_nodes",
    "kafka_properties",
    "log_tail",
    "require_tool",
]

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
KAFKA_HOST = DEV_KAFKA_HOST
KAFKA_PORT = DEV_KAFKA_PORT
CONTROLLER_PORT = KAFKA_PORT + 1


def cache_dir() -> Path:
    """Per-user cache for the Kafka jars (``$SPR_CACHE_DIR`` or ``~/.cache/spr``)."""
    env = os.environ.get("SPR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spr"


def require_tool(tool: str, package: str) -> str:
    """The path of ``tool``; :class:`ToolMissing` naming ``package`` when it is absent."""
    path = shutil.which(tool)
    if path is None:
        raise ToolMissing(f"'{tool}' is not installed; install {package} and try again")
    return path


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join(text[-lines:])


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

LOG4J2_PROPERTIES = """status = warn
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
    mvn = require_tool("mvn", "Maven (apt-get install -y maven)")
    require_tool("java", "Java 17 (apt-get install -y openjdk-17-jre-headless)")
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
            f"its log ends with:\n{log_tail(log)}"
        )
    marker.write_text(KAFKA_VERSION)
    return libs


BROKER_COUNTS = (1, 3)


@dataclass(frozen=True)
class KafkaNode:
    """One Kafka process of the stack: a combined broker + controller (KRaft).

    Node ``i`` (from 1) listens for clients on ``KAFKA_PORT + 2 * (i - 1)`` and for the
    controller quorum on the port after it, so node 1 of a cluster has the single node's
    ports. A single node keeps its files in ``kafka/``, node ``i`` of a cluster of
    ``n`` in ``kafka-n/node-i/``.
    """

    node_id: int
    port: int
    controller_port: int
    folder: Path

    @property
    def address(self) -> str:
        return f"{KAFKA_HOST}:{self.port}"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def config(self) -> Path:
        return self.folder / "server.properties"

    @property
    def log(self) -> Path:
        return self.folder / "kafka.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / "kafka.pid"


def kafka_nodes(root: Path, brokers: int) -> tuple[KafkaNode, ...]:
    """The nodes of a stack of ``brokers`` Kafka processes under ``root``."""
    if brokers == 1:
        return (KafkaNode(1, KAFKA_PORT, CONTROLLER_PORT, root / "kafka"),)
    return tuple(
        KafkaNode(i, KAFKA_PORT + 2 * (i - 1), KAFKA_PORT + 2 * (i - 1) + 1,
                  root / f"kafka-{brokers}" / f"node-{i}")
        for i in range(1, brokers + 1)
    )  # fmt: skip


def kafka_properties(node: KafkaNode, nodes: tuple[KafkaNode, ...]) -> str:
    voters = ",".join(f"{n.node_id}@{KAFKA_HOST}:{n.controller_port}" for n in nodes)
    # One node can only keep one copy; three keep three and acknowledge with two, so
    # that acks=all survives one broker down (and unclean elections stay off).
    replicas = 1 if len(nodes) == 1 else 3
    min_isr = 1 if len(nodes) == 1 else 2
    cluster = (
        ""
        if len(nodes) == 1
        else f"default.replication.factor={replicas}\nmin.insync.replicas={min_isr}\n"
        "unclean.leader.election.enable=false\n"
    )
    return f"""process.roles=broker,controller
node.id={node.node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{KAFKA_HOST}:{node.port},CONTROLLER://{KAFKA_HOST}:{node.controller_port}
advertised.listeners=PLAINTEXT://{KAFKA_HOST}:{node.port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={node.data}
num.partitions=1
auto.create.topics.enable=false
{cluster}offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
group.coordinator.rebalance.protocols=classic,consumer
message.max.bytes=10485760
replica.fetch.max.bytes=10485760
log.retention.check.interval.ms=5000
log.segment.delete.delay.ms=1000
num.network.threads=2
num.io.threads=4
"""


def active_controller(running: list[KafkaNode]) -> int | None:
    """The quorum leader as the ``running`` nodes last recorded it (KRaft's quorum-state
    file, rewritten at every election), or None when none has recorded one."""
    best: tuple[int, int] | None = None
    for node in running:
        try:
            state = json.loads((node.data / "__cluster_metadata-0" / "quorum-state").read_text())
            epoch, leader = int(state["leaderEpoch"]), int(state["leaderId"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if leader >= 0 and (best is None or epoch > best[0]):
            best = (epoch, leader)
    return None if best is None else best[1]


def kafka_answers_metadata(bootstrap: str, broker_ids: set[int] | None = None) -> bool:
    """True when ``bootstrap`` answers a metadata request (within 2 s) that lists every
    broker of ``broker_ids``."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception:
        return False
    return broker_ids is None or broker_ids <= set(metadata.brokers)
