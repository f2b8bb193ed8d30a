"""Configuration: validation on construction, layering, and the one Kafka merge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spr.config import (
    CONSUMER_DEFAULTS,
    DEFAULT_MAPPING,
    ORDERS_MAPPING,
    BackpressurePolicy,
    BatchPolicy,
    EngineConfig,
    TableMapping,
    load_engine_config,
    load_table_config,
    merge_kafka_config,
    uses_cooperative_rebalance,
)
from spr.config.defaults import DEFAULT_BOOTSTRAP, DEFAULT_DSN
from spr.errors import ConfigError
from spr.sink.postgres import redact_dsn


def test_user_kafka_keys_win_and_defaults_follow_design() -> None:
    merged = merge_kafka_config(CONSUMER_DEFAULTS, {"fetch.queue.backoff.ms": "1", "x.y": "z"})
    assert merged["fetch.queue.backoff.ms"] == "1"
    assert merged["x.y"] == "z"
    assert merged["enable.auto.commit"] == "false"
    assert merged["enable.auto.offset.store"] == "false"
    assert merged["partition.assignment.strategy"] == "cooperative-sticky"
    # Capped below the design's 10 MB / 1 MB for the RSS bound (issue 7 measurements).
    assert merged["fetch.max.bytes"] == "2097152"
    assert merged["max.partition.fetch.bytes"] == "524288"
    assert merged["queued.max.messages.kbytes"] == "4096"
    assert dict(CONSUMER_DEFAULTS)["fetch.queue.backoff.ms"] == "10"  # not mutated


def test_consumer_protocol_drops_classic_defaults_but_keeps_user_keys() -> None:
    merged = merge_kafka_config(CONSUMER_DEFAULTS, {"group.protocol": "consumer"})
    for key in ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"):
        assert key not in merged
    kept = merge_kafka_config(
        CONSUMER_DEFAULTS, {"group.protocol": "consumer", "session.timeout.ms": "7000"}
    )
    assert kept["session.timeout.ms"] == "7000"


@pytest.mark.parametrize(
    ("conf", "cooperative"),
    [
        ({"partition.assignment.strategy": "cooperative-sticky"}, True),
        ({"partition.assignment.strategy": "range"}, False),
        ({"partition.assignment.strategy": "range,cooperative-sticky"}, False),
        ({}, False),
        ({"group.protocol": "consumer"}, True),
    ],
)
def test_rebalance_kind(conf: dict[str, str], cooperative: bool) -> None:
    assert uses_cooperative_rebalance(conf) is cooperative


@pytest.mark.parametrize(
    "build",
    [
        lambda: BatchPolicy(max_rows=0),
        lambda: BatchPolicy(max_age_ms=-1),
        lambda: BackpressurePolicy(resume_ratio=1.0),
        lambda: BackpressurePolicy(cool_down_ms=100, max_cool_down_ms=50),
        lambda: EngineConfig(group_id="", topics=("t",)),
        lambda: EngineConfig(group_id="g", topics=()),
        lambda: EngineConfig(group_id="g", topics=("t", "t")),
        lambda: EngineConfig(group_id="g", topics=("t",), kafka={"enable.auto.commit": "true"}),
        lambda: EngineConfig(group_id="g", topics=("t",), on_offset_gap="skip"),
        lambda: EngineConfig(group_id="g", topics=("t",), synchronous_commit="sometimes"),
        lambda: EngineConfig(group_id="g", topics=("t",), synchronous_commit="OFF"),
        lambda: TableMapping(columns=(("entity_id", "entity_id"),), key=("entity_id",)),
        lambda: TableMapping(columns=(("id", "nope"), ("sequence", "sequence")), key=("id",)),
        lambda: TableMapping(table="a", offsets_table="a"),
        lambda: TableMapping(key=("missing",)),
    ],
)
def test_bad_values_fail_on_construction(build: object) -> None:
    with pytest.raises(ConfigError):
        build()  # type: ignore[operator]


def test_mappings() -> None:
    assert DEFAULT_MAPPING.key_is_entity
    assert not ORDERS_MAPPING.key_is_entity
    assert ORDERS_MAPPING.sequence_column == "sequence"
    assert ORDERS_MAPPING.column_type("payload") == "jsonb"
    mapping = TableMapping.from_mapping({"preset": "orders", "name": "my_orders"})
    assert mapping.table == "my_orders" and mapping.key == ("order_id",)
    with pytest.raises(ConfigError):
        TableMapping.from_mapping({"preset": "nope"})
    with pytest.raises(ConfigError):
        TableMapping.from_mapping({"colour": "blue"})


def test_revoke_budget_is_a_fifth_of_the_poll_interval() -> None:
    config = EngineConfig(group_id="g", topics=("t",), kafka={"max.poll.interval.ms": "30000"})
    assert config.effective_revoke_budget_ms == 6_000
    assert config.consumer_config()["group.id"] == "g"


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "spr.toml"
    path.write_text(
        'group = "from-file"\ntopics = ["a", "b"]\ndsn = "postgresql://file"\n'
        "idle_exit_s = 5\n[batch]\nmax_rows = 10\n[backpressure]\nslow_flush_ms = 80\n"
        '[kafka]\n"session.timeout.ms" = 7000\n"fetch.wait.max.ms" = 100\n'
        '[table]\npreset = "orders"\nname = "file_orders"\n'
    )
    environ = {
        "SPR_DSN": "postgresql://env",
        "SPR_BATCH_MAX_ROWS": "20",
        "SPR_KAFKA_FETCH_WAIT_MAX_MS": "200",
    }
    config = load_engine_config(
        file=path,
        environ=environ,
        flags={"group_id": "from-flag", "table": None, "batch_max_age_ms": 7},
        kafka_flags={"session.timeout.ms": "9000"},
    )
    assert config.group_id == "from-flag"
    assert config.topics == ("a", "b")
    assert config.dsn == "postgresql://env"
    assert config.idle_exit_s == 5
    assert config.batch == BatchPolicy(max_rows=20, max_age_ms=7)
    assert config.backpressure.slow_flush_ms == 80
    assert config.kafka["session.timeout.ms"] == "9000"
    assert config.kafka["fetch.wait.max.ms"] == "200"
    assert config.mapping.table == "file_orders" and config.mapping.key == ("order_id",)
    dsn, mapping, _ = load_table_config(file=path, environ={}, flags={"table": "flagged"})
    assert dsn == "postgresql://file" and mapping.table == "flagged"


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_engine_config(environ={}, flags={"group_id": "g", "topics": ("t",)})
    assert config.bootstrap == DEFAULT_BOOTSTRAP
    assert config.dsn == DEFAULT_DSN
    assert config.mapping == DEFAULT_MAPPING


def test_synchronous_commit_is_on_unless_asked_through_any_layer(tmp_path: Path) -> None:
    required = {"group_id": "g", "topics": ("t",)}
    assert load_engine_config(environ={}, flags=required).synchronous_commit == "on"
    path = tmp_path / "spr.toml"
    path.write_text('synchronous_commit = "off"\n')
    assert load_engine_config(file=path, environ={}, flags=required).synchronous_commit == "off"
    path.write_text("synchronous_commit = false\n")  # a TOML boolean, as postgresql.conf allows
    assert load_engine_config(file=path, environ={}, flags=required).synchronous_commit == "off"
    # The environment wins over the file, flags over both; the case does not matter.
    environ = {"SPR_SYNCHRONOUS_COMMIT": " Local "}
    config = load_engine_config(file=path, environ=environ, flags=required)
    assert config.synchronous_commit == "local"
    flags = {**required, "synchronous_commit": "remote_apply"}
    assert load_engine_config(file=path, environ=environ, flags=flags).synchronous_commit == (
        "remote_apply"
    )
    # Not given (None) means the layer below decides.
    flags = {**required, "synchronous_commit": None}
    assert load_engine_config(environ={}, flags=flags).synchronous_commit == "on"


def test_spr_run_passes_synchronous_commit_to_the_config_and_to_every_worker() -> None:
    from spr.cli import build_parser
    from spr.cli.run import _child_argv, _flags

    argv = ["run", "--topic", "t", "--group", "g", "--workers", "2"]
    args = build_parser().parse_args([*argv, "--synchronous-commit", "off"])
    config = load_engine_config(environ={}, flags=_flags(args))
    assert config.synchronous_commit == "off"
    child = _child_argv(args, 1)
    assert child[child.index("--synchronous-commit") + 1] == "off"
    plain = build_parser().parse_args(argv)
    assert "--synchronous-commit" not in _child_argv(plain, 1)  # the layers below decide
    assert load_engine_config(environ={}, flags=_flags(plain)).synchronous_commit == "on"


def test_flush_lanes_default_to_the_cores_and_read_every_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spr.cli import build_parser
    from spr.cli.run import _child_argv, _flags

    required = {"group_id": "g", "topics": ("t",)}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    one = load_engine_config(environ={}, flags=required)
    assert (one.flush_connections, one.flush_split_rows, one.flush_split_rows_per_event) == (
        1, 5_000, 0.5
    )  # fmt: skip
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert load_engine_config(environ={}, flags=required).flush_connections == 2
    path = tmp_path / "spr.toml"
    path.write_text("flush_connections = 3\nflush_split_rows = 1\nflush_split_rows_per_event = 0\n")
    config = load_engine_config(file=path, environ={}, flags=required)
    assert (config.lanes, config.flush_split_rows, config.flush_split_rows_per_event) == (3, 1, 0.0)
    environ = {"SPR_FLUSH_CONNECTIONS": "4"}
    assert load_engine_config(file=path, environ=environ, flags=required).lanes == 4
    args = build_parser().parse_args(["run", "--topic", "t", "--group", "g", "--workers", "2",
                                      "--flush-connections", "5"])  # fmt: skip
    assert load_engine_config(file=path, environ=environ, flags=_flags(args)).lanes == 5
    child = _child_argv(args, 1)
    assert child[child.index("--flush-connections") + 1] == "5"


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("flush_connections = 0", "flush_connections must be a positive number, got 0"),
     ("flush_connections = 65", "flush_connections must be at most 64, got 65"),
     ("flush_connections = 1.5", "flush_connections must be a whole number"),
     ("flush_split_rows = 0", "flush_split_rows must be a positive number, got 0"),
     ("flush_split_rows_per_event = 2", "flush_split_rows_per_event must be between 0 and 1")],
)  # fmt: skip
def test_a_bad_flush_lane_setting_is_one_sentence(
    tmp_path: Path, setting: str, needle: str
) -> None:
    path = tmp_path / "spr.toml"
    path.write_text(setting + "\n")
    with pytest.raises(ConfigError, match=needle):
        load_engine_config(file=path, environ={}, flags={"group_id": "g", "topics": ("t",)})


@pytest.mark.parametrize(
    ("environ", "flag"),
    [({"SPR_SYNCHRONOUS_COMMIT": "sometimes"}, None), ({}, "sometimes"), ({}, ""),
     ({"SPR_SYNCHRONOUS_COMMIT": "off"}, "of")],
)  # fmt: skip
def test_a_bad_synchronous_commit_is_one_sentence_naming_the_choices(
    environ: dict[str, str], flag: str | None
) -> None:
    flags = {"group_id": "g", "topics": ("t",), "synchronous_commit": flag}
    with pytest.raises(ConfigError) as caught:
        load_engine_config(environ=environ, flags=flags)
    message = str(caught.value)
    assert message.startswith("synchronous_commit must be one of on, off, local, ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [("not toml = = =", "not valid TOML"), ("colour = 1", "unknown key"),
     ("[batch]\nmax_rows = 'x'", "must be a number")],
)  # fmt: skip
def test_bad_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_engine_config(file=path, environ={}, flags={"group_id": "g", "topics": ("t",)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_engine_config(file=tmp_path / "missing.toml", environ={})


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://user:s3cret@host:5432/db",
        "host=h user=u password=s3cret dbname=d",
        "postgresql://user@host/db?password=s3cret&sslmode=require",
    ],
)
def test_redact_dsn(dsn: str) -> None:
    assert "s3cret" not in redact_dsn(dsn)
    assert "***" in redact_dsn(dsn)
