"""The command line's edges without servers: usage of the right sub-command, help that
shows defaults, one sentence for errors that escape a command, strict numbers in TOML,
Kafka settings checked before any connection, rates too short to time, the run summary.
The same edges against the real stack are in tests/integration/test_cli_contract.py."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException

from spr.bench import report
from spr.bench.harness import _summarise
from spr.cli import _sub_parsers, build_parser, main
from spr.cli.options import SprHelpFormatter, require_writable, resolve_bootstrap
from spr.cli.run import summary
from spr.config import load_engine_config
from spr.config.loading import check_dsn
from spr.engine.telemetry import EngineStats
from spr.errors import ConfigError
from spr.kafka.clients import check_settings

# ------------------------------------------------------------------- usage and help


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["run", "--topic", "t", "--bogus"], "usage: spr run "),
        (["produce", "--topic", "t", "--count", "1", "--bogus"], "usage: spr produce "),
        (["dlq", "list", "--topic", "t", "--bogus"], "usage: spr dlq list "),
        (["db", "init", "--bogus"], "usage: spr db init "),
        (["dev", "status", "--bogus"], "usage: spr dev "),
        (["lag", "--group", "g", "--bogus", "x"], "usage: spr lag "),
        (["bench", "--bogus"], "usage: spr bench "),
    ],
)
def test_an_unknown_flag_prints_the_usage_of_its_subcommand(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "usage: spr [-h]" not in err
    assert err.rstrip().splitlines()[-1].endswith("unrecognized arguments: " + argv[-1]) or (
        "unrecognized arguments: --bogus" in err
    )


def _required(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    if action.required or "required" in (action.help or ""):
        return True
    groups = parser._mutually_exclusive_groups
    return any(g.required and action in g._group_actions for g in groups)


def test_every_option_has_help_that_states_its_default() -> None:
    missing = []
    for sub in _sub_parsers(build_parser()):
        formatter = SprHelpFormatter(prog=sub.prog)
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if action.help == argparse.SUPPRESS:  # internal (a worker's index)
                continue
            text = formatter._get_help_string(action) or ""
            if not action.help or ("default" not in text and not _required(sub, action)):
                missing.append(f"{sub.prog} {action.option_strings[0]}")
    assert missing == []


def test_a_default_is_shown_once() -> None:
    help_text = {sub.prog: sub.format_help() for sub in _sub_parsers(build_parser())}
    assert "(default: 1000000)" in help_text["spr bench"]
    assert "(default: 200000)" in help_text["spr plan"]  # --measure-events
    assert "default 0.3) (default" not in help_text["spr plan"]
    assert "(default 40,000)" in help_text["spr run"]


# ------------------------------------------------------------ errors as one sentence


def _command_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    from spr.cli import route

    def broken(args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(route, "_route_command", broken)


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (
            psycopg.ProgrammingError('missing "=" after "not" in connection info string'),
            'spr route: the PostgreSQL DSN is not valid: missing "=" after "not" in '
            "connection info string",
        ),
        (
            psycopg.OperationalError(
                "connection to server failed: postgresql://u:hunter2@h/db refused"
            ),
            "spr route: PostgreSQL is not usable: connection to server failed: "
            "postgresql://u:***@h/db refused",
        ),
        (
            KafkaException(KafkaError(KafkaError._INVALID_ARG, "bad sasl.password=hunter2")),
            "spr route: Kafka refused: bad sasl.password=***",
        ),
    ],
)
def test_client_errors_that_escape_a_command_become_one_redacted_sentence(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    says: str,
) -> None:
    _command_raising(monkeypatch, exc)
    assert main(["route", "a:1"]) == 2
    err = capsys.readouterr().err
    assert err == says + "\n"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _command_raising(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["route", "a:1"])


def test_no_dlq_with_a_dlq_topic_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--topic", "t", "--group", "g", "--no-dlq", "--dlq-topic", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spr run: --no-dlq turns dead letters off") and "\n" not in err


def test_librdkafka_logs_are_quiet_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    main(["route", "a:1"])
    assert logging.getLogger("spr.kafka").getEffectiveLevel() > logging.CRITICAL
    capsys.readouterr()


# ------------------------------------------------------------- configuration values


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("workers = 1.7", "workers must be a whole number, got 1.7"),
        ("workers = true", "workers must be a whole number, got True"),
        ("workers = 'x'", "workers must be a number, got 'x'"),
        ("max_events = '2.5'", "max_events must be a whole number"),
        ("[batch]\nmax_rows = 1.5", "max_rows must be a whole number, got 1.5"),
        ("[backpressure]\nresume_ratio = 'half'", "resume_ratio must be a number"),
        ("auto_create_schema = 'maybe'", "auto_create_schema must be true or false"),
        ("dsn = 'not a dsn'", "the PostgreSQL DSN is not valid"),
    ],
)
def test_toml_numbers_are_strict(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "spr.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_engine_config(file=path, environ={}, flags={"group_id": "g", "topics": ("t",)})


def test_whole_numbers_in_any_form_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "spr.toml"
    path.write_text("workers = 2\nidle_exit_s = 3\n[batch]\nmax_rows = 500\n")
    config = load_engine_config(
        file=path, environ={"SPR_BATCH_MAX_AGE_MS": "50"}, flags={"group_id": "g", "topics": ("t",)}
    )
    assert (config.workers, config.idle_exit_s, config.batch.max_rows) == (2, 3.0, 500)
    assert config.batch.max_age_ms == 50


def test_a_dsn_is_parsed_and_its_password_never_shown() -> None:
    assert check_dsn("postgresql://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert check_dsn("host=h port=5432 dbname=d") == "host=h port=5432 dbname=d"
    with pytest.raises(ConfigError) as info:
        check_dsn("host=h password=hunter2 oops")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"bogus.key": "1"}, '"bogus.key"'),
        ({"session.timeout.ms": "abc"}, '"session.timeout.ms"'),
        ({"partition.assignment.strategy": "nope"}, "partition.assignment.strategy: nope"),
        ({"security.protocol": "carrier-pigeon"}, '"security.protocol"'),
    ],
)
def test_kafka_settings_are_checked_without_a_connection(
    settings: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_settings({"bootstrap.servers": "127.0.0.1:1", **settings})
    assert names in str(info.value)
    assert str(info.value).startswith("Kafka refused a client setting: ")


def test_good_kafka_settings_pass() -> None:
    check_settings({"bootstrap.servers": "127.0.0.1:1", "session.timeout.ms": "6000"})


def test_the_bootstrap_a_command_names_is_the_one_its_clients_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPR_BOOTSTRAP", "env:9092")
    assert resolve_bootstrap(None) == "env:9092"
    assert resolve_bootstrap("flag:9092") == "flag:9092"
    assert resolve_bootstrap(None, {"bootstrap.servers": "x:1"}) == "x:1"
    assert resolve_bootstrap("flag:9092", {"bootstrap.servers": "x:1"}) == "x:1"


def test_an_output_path_is_checked_before_any_work(tmp_path: Path) -> None:
    assert require_writable(tmp_path / "m.json") == tmp_path / "m.json"
    with pytest.raises(ConfigError, match=r"the directory .* does not exist"):
        require_writable(tmp_path / "missing" / "m.json")
    with pytest.raises(ConfigError, match="is a directory"):
        require_writable(tmp_path)
    assert not (tmp_path / "m.json").exists()


def test_produce_refuses_an_unwritable_manifest_before_sending() -> None:
    from spr.dev.loadgen import LoadSpec, produce

    with pytest.raises(ConfigError, match="cannot write the manifest"):
        # An unreachable broker would fail later; the manifest is checked first.
        produce(
            LoadSpec(count=10),
            topic="t",
            bootstrap="127.0.0.1:1",
            manifest_path=Path("/nonexistent/dir/m.json"),
        )


# ---------------------------------------------------------------------------- rates


def test_a_rate_over_too_short_a_span_is_not_a_number() -> None:
    assert report.measured_rate(2_000, 0.00002, 1) is None
    assert report.measured_rate(2_000, 0.4, 10) is None
    assert report.measured_rate(2_000, 2.0, 2) is None
    assert report.measured_rate(0, 2.0, 10) is None
    assert report.measured_rate(2_000, 2.0, 3) == 1_000.0
    assert report.measured_rate(2_000, 2.0) == 1_000.0


def test_a_tiny_bench_prints_too_short_instead_of_an_absurd_rate() -> None:
    # 2,000 events read in one fetch: 17 µs from first to last (the 113M/s).
    result: dict[str, Any] = {"first_s": 100.0, "timeline": [(100.0000176, 2_000)]}
    entry = _summarise(result, 2_000, None)
    assert entry["status"] == "ok" and entry["too_short"] is True
    document = {
        "workload": {"events": 2_000, "entities": 10, "partitions": 1},
        "contenders": {"raw_consume": entry, "spr": dict(entry)},
        "ratios": {"raw_consume": 1.0},
        "ok": True,
    }
    text = report.format_report(document)
    assert "too short" in text and "113" not in text
    assert "too short to measure: raw_consume, spr" in text
    long_run = {"first_s": 0.0, "timeline": [(0.5, 500), (1.0, 1_000), (2.0, 2_000)]}
    measured = _summarise(long_run, 2_000, None)
    assert "too_short" not in measured and measured["events_per_s"] == 1_000.0


def test_the_run_summary_separates_active_and_wall_time() -> None:
    stats = EngineStats(consumed=5_000, applied=4_000, flushes=7)
    line = summary(stats, wall_s=3.2, active_s=2.0, rate=2_500.0)
    assert line.startswith("consumed 5000 event(s) in 2.00 s from the first message to the last")
    assert "(2,500/s), 3.2 s in all: 4000 applied" in line
    short = summary(stats, wall_s=3.2, active_s=0.2, rate=None)
    assert "(too short to measure a rate), 3.2 s in all" in short
    idle = summary(EngineStats(), wall_s=3.0, active_s=None, rate=None)
    assert idle.startswith("consumed 0 event(s) in 3.0 s: 0 applied")
