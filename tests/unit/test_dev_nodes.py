"""``spr dev up --brokers 3`` without servers: the nodes' ports and settings, the count the
state folder remembers, and the one-sentence refusals of the *-broker actions."""

from __future__ import annotations

from pathlib import Path

import pytest

from spr.cli import main
from spr.dev import stack as devstack
from spr.dev.brokers import kafka_properties
from spr.dev.stack import DevStack, kafka_nodes
from spr.errors import ConfigError


def test_node_one_keeps_the_single_node_ports_and_no_port_is_shared(tmp_path: Path) -> None:
    (single,) = kafka_nodes(tmp_path, 1)
    cluster = kafka_nodes(tmp_path, 3)
    assert (single.port, single.controller_port) == (devstack.KAFKA_PORT, devstack.CONTROLLER_PORT)
    assert (cluster[0].port, cluster[0].controller_port) == (single.port, single.controller_port)
    ports = [p for node in cluster for p in (node.port, node.controller_port)]
    assert len(set(ports)) == 6
    assert ports == list(range(devstack.KAFKA_PORT, devstack.KAFKA_PORT + 6))
    assert single.folder == tmp_path / "kafka"
    assert len({node.folder for node in cluster}) == 3


def test_cluster_properties_replicate_three_ways_with_a_static_quorum(tmp_path: Path) -> None:
    nodes = kafka_nodes(tmp_path, 3)
    text = kafka_properties(nodes[1], nodes)
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert settings["node.id"] == "2"
    assert settings["controller.quorum.voters"] == ",".join(
        f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes
    )
    assert settings["default.replication.factor"] == "3"
    assert settings["min.insync.replicas"] == "2"
    assert settings["offsets.topic.replication.factor"] == "3"
    assert settings["transaction.state.log.replication.factor"] == "3"
    assert settings["transaction.state.log.min.isr"] == "2"
    assert settings["unclean.leader.election.enable"] == "false"
    assert settings["log.dirs"] == str(nodes[1].data)


def test_single_node_properties_are_unchanged(tmp_path: Path) -> None:
    nodes = kafka_nodes(tmp_path, 1)
    settings = dict(line.split("=", 1) for line in kafka_properties(nodes[0], nodes).splitlines())
    assert settings["controller.quorum.voters"] == f"1@127.0.0.1:{devstack.CONTROLLER_PORT}"
    assert settings["offsets.topic.replication.factor"] == "1"
    assert "default.replication.factor" not in settings
    assert "min.insync.replicas" not in settings


def test_the_state_folder_remembers_the_broker_count(tmp_path: Path) -> None:
    assert DevStack(tmp_path).brokers == 1
    (tmp_path / "kafka.brokers").write_text("3\n")
    stack = DevStack(tmp_path)
    assert stack.brokers == 3
    assert stack.bootstrap.count(",") == 2
    assert DevStack(tmp_path, brokers=1).brokers == 1
    with pytest.raises(ConfigError, match="--brokers must be 1 or 3, got 2"):
        DevStack(tmp_path, brokers=2)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["kill-broker", "4"], "there is no Kafka node 4; the local stack has nodes 1 to 3"),
        (["kill-broker", "0"], "there is no Kafka node 0"),
        (["kill-broker", "2"], "Kafka node 2 is not running"),
        (["stop-broker", "3"], "Kafka node 3 is not running"),
        (["start-broker", "2"], "Kafka node 2 was never set up"),
    ],
)
def test_node_actions_on_a_stopped_cluster_refuse_in_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], says: str,
) -> None:  # fmt: skip
    (tmp_path / "kafka.brokers").write_text("3\n")
    monkeypatch.setenv("SPR_DEV_DIR", str(tmp_path))
    assert main(["dev", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spr dev: ") and says in err
    assert len(err.splitlines()) == 1
