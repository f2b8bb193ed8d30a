"""The command-line contract (design §8, issue 11): every bad input a user can give any
sub-command ends with exit code 2 and one plain sentence that names the problem, fast,
without a traceback, without printing a secret, and without writing anything.

Each row runs ``python -m spr ...`` as a subprocess against the real local stack. Rows
are grouped by sub-command; ``test_every_subcommand_has_rows`` fails when a command is
added to the parser (``spr transform``, say) without rows here, so a new command joins
the contract by adding its rows to ``ROWS``.

A row is either a runtime error (exactly one line on stderr, ``spr <command>: ...``) or,
with ``usage=True``, an argument argparse rejects (the sub-command's own usage, then one
``error:`` line). ``leaves`` lists what must not exist afterwards: ``topic`` (the row's
fresh ``{new_topic}``), ``table`` (its fresh ``{table}`` and ``{into}``), ``offsets``
(stored offsets of its ``{group}``, replay groups included) and ``workspace`` (a bench
workspace in the row's own temporary directory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from spr.cli import build_parser

SECRET = "hunter2"
BAD_DSN = f"postgresql://spr:{SECRET}@127.0.0.1:1/spr"
# A refused connection is known within milliseconds; this is start-up plus margin.
ROW_BUDGET_S = 5.0
_PARALLEL = 4


@dataclass(frozen=True)
class Row:
    argv: str
    says: str
    leaves: tuple[str, ...] = ()
    usage: bool = False

    @property
    def command(self) -> str:
        words = self.argv.split()
        return " ".join(words[:2]) if words[0] in ("dlq", "db") else words[0]


def row(argv: str, says: str, *leaves: str, usage: bool = False) -> Row:
    return Row(argv=argv, says=says, leaves=leaves, usage=usage)


UNREACHABLE = "not reachable at 127.0.0.1:1"
NO_DB = "cannot connect to PostgreSQL at postgresql://spr:***@127.0.0.1:1/spr"
BAD_DSN_SAYS = "the PostgreSQL DSN is not valid"
SASL = "-X security.protocol=SASL_PLAINTEXT -X sasl.mechanism=PLAIN -X sasl.username=u " + (
    f"-X sasl.password={SECRET}"
)
RUN = "run --topic {topic} --group {group} --table {table} --auto-create-schema"
RUN_LEAVES = ("table", "offsets")
REPLAY = "replay --group {group} --topic {topic} --to-offset 0"
MEASURE = "plan --target-throughput 1000 --measure --measure-events 1000"

TRANSFORM = "transform --topic {topic} --group {group} --output-topic {new_topic}"

ROWS: dict[str, list[Row]] = {
    "dev": [
        row("dev bogus", "invalid choice: 'bogus'", usage=True),
        row("dev up --brokers 2", "invalid choice: 2 (choose from 1, 3)", usage=True),
        row("dev up --brokers three", "invalid int value: 'three'", usage=True),
        row("dev up 2", "up takes no node number"),
        row("dev status --brokers 3", "--brokers only applies to up, not to status"),
        row("dev status extra", "invalid int value: 'extra'", usage=True),
        row("dev status 1 extra", "unrecognized arguments: extra", usage=True),
        row("dev kill-broker", "kill-broker needs a node number"),
        row("dev kill-broker two", "invalid int value: 'two'", usage=True),
        # Each row has a fresh state folder: a single-node stack, which has no node to pick.
        row("dev kill-broker 1", "the local stack has a single Kafka broker"),
        row("dev stop-broker 2", "the local stack has a single Kafka broker"),
        row("dev start-broker 3", "the local stack has a single Kafka broker"),
        row("dev pg-failover", "there is no PostgreSQL standby to promote"),
        row("dev pg-failover 2", "pg-failover takes no node number"),
        row("dev status --pg-standby", "--pg-standby only applies to up, not to status"),
    ],
    "route": [
        row("route --partitions 0 order:1", "--partitions must be between 1"),
        row("route --partitions -3 order:1", "--partitions must be between 1"),
        row("route --partitions many order:1", "invalid int value: 'many'", usage=True),
        row("route order-without-colon", "is not a routing key"),
        row("route order:", "is not a routing key"),
    ],
    "produce": [
        row("produce --topic {new_topic} --count 10 --bootstrap 127.0.0.1:1", UNREACHABLE,
            "topic"),
        row("produce --topic {new_topic} --count 10 -X bootstrap.servers=127.0.0.1:1",
            UNREACHABLE, "topic"),
        row("produce --topic {new_topic} --count 10 -X bogus.key=1", '"bogus.key"', "topic"),
        row("produce --topic {new_topic} --count 10 -X batch.num.messages=lots",
            '"batch.num.messages"', "topic"),
        row("produce --topic {new_topic} --count 10 -X novalue", "-X expects KEY=VALUE",
            "topic"),
        row("produce --topic {new_topic} --count -5", "count must be >= 0", "topic"),
        row("produce --topic {new_topic} --count 10 --partitions 0",
            "--partitions must be >= 1", "topic"),
        row("produce --topic {new_topic} --count 10 --entities 0", "entities must be >= 1",
            "topic"),
        row("produce --topic {new_topic} --count 10 --rate -1", "rate must be > 0", "topic"),
        row("produce --topic {new_topic} --count 10 --duplicates 2", "duplicates must be",
            "topic"),
        row("produce --topic {new_topic} --count ten", "invalid int value: 'ten'", "topic",
            usage=True),
        row("produce --topic 'bad name!' --count 10", "Topic name is invalid"),
        row("produce --topic {new_topic} --count 10 --manifest /nonexistent/dir/m.json",
            "the directory /nonexistent/dir does not exist", "topic"),
        row("produce --topic {new_topic} --count 10 --bogus", "unrecognized arguments: --bogus",
            "topic", usage=True),
        row("produce --topic {new_topic} --count 10 --otel --bootstrap 127.0.0.1:1",
            UNREACHABLE, "topic"),
        row("produce --topic {new_topic} --count 10 --otel-max-links 5",
            "unrecognized arguments: --otel-max-links", "topic", usage=True),
    ],
    "dlq list": [
        row("dlq list --topic {topic} --bootstrap 127.0.0.1:1", UNREACHABLE),
        row("dlq list --topic {topic} --samples -1", "--samples must be 0 or more"),
        row("dlq list --topic {topic} --samples few", "invalid int value: 'few'", usage=True),
        row("dlq list --topic ''", "--topic must not be empty"),
    ],
    "dlq redrive": [
        row("dlq redrive --topic {topic} --bootstrap 127.0.0.1:1", UNREACHABLE),
        row("dlq redrive --topic {topic} --error-class bogus", "invalid choice: 'bogus'",
            usage=True),
        row("dlq redrive --topic ''", "--topic must not be empty"),
    ],
    "run": [
        row(RUN + " --bootstrap 127.0.0.1:1", UNREACHABLE, *RUN_LEAVES),
        row(RUN + " -X bootstrap.servers=127.0.0.1:1", UNREACHABLE, *RUN_LEAVES),
        row(RUN + " --workers 2 --bootstrap 127.0.0.1:1", UNREACHABLE, *RUN_LEAVES),
        row(RUN + " --dsn " + BAD_DSN, NO_DB, *RUN_LEAVES),
        row(RUN + " --workers 2 --dsn " + BAD_DSN, NO_DB, *RUN_LEAVES),
        row("run --topic {topic} --group {group} --table {table} --workers 2", "spr db init",
            *RUN_LEAVES),
        row(RUN + " --dsn 'not a dsn'", BAD_DSN_SAYS, *RUN_LEAVES),
        row(RUN + " " + SASL, "refused to authenticate", *RUN_LEAVES),
        row(RUN + " -X bogus.key=1", '"bogus.key"', *RUN_LEAVES),
        row(RUN + " -X session.timeout.ms=abc", '"session.timeout.ms"', *RUN_LEAVES),
        row(RUN + " -X partition.assignment.strategy=nope", "partition.assignment.strategy",
            *RUN_LEAVES),
        row(RUN + " -X enable.auto.commit=true", "must stay false", *RUN_LEAVES),
        row(RUN + " --config {toml_unknown}", "unknown key(s) colour", *RUN_LEAVES),
        row(RUN + " --config {toml_kafka}", '"bogus.key"', *RUN_LEAVES),
        row(RUN + " --config {toml_workers}", "workers must be a whole number, got 1.7",
            *RUN_LEAVES),
        row(RUN + " --config {toml_batch}", "max_rows must be a whole number", *RUN_LEAVES),
        row(RUN + " --config {toml_broken}", "is not valid TOML", *RUN_LEAVES),
        row(RUN + " --config /nonexistent/spr.toml", "does not exist", *RUN_LEAVES),
        row(RUN + " --workers 0", "workers must be a positive number", *RUN_LEAVES),
        row(RUN + " --batch-max-rows -1", "max_rows must be a positive number", *RUN_LEAVES),
        row(RUN + " --idle-exit -1", "idle_exit_s must be a positive number", *RUN_LEAVES),
        row(RUN + " --max-events 0", "max_events must be a positive number", *RUN_LEAVES),
        row(RUN + " --workers two", "invalid int value: 'two'", *RUN_LEAVES, usage=True),
        row(RUN + " --no-dlq --dlq-topic {new_topic}", "--no-dlq", *RUN_LEAVES),
        row(RUN + " --metrics-window 0", "--metrics-window must be a positive", *RUN_LEAVES),
        row(RUN + " --on-misrouted sometimes", "invalid choice: 'sometimes'", *RUN_LEAVES,
            usage=True),
        row(RUN + " --dlq-topic {topic}", "itself", *RUN_LEAVES),
        row(RUN + " --stats /nonexistent/dir/stats.json",
            "the directory /nonexistent/dir does not exist", *RUN_LEAVES),
        row("run --topic {new_topic} --group {group} --table {table} --auto-create-schema",
            "does not exist on", *RUN_LEAVES),
        row("run --topic {topic} --group '' --table {table} --auto-create-schema",
            "a consumer group is required", "table"),
        row("run --topic {topic} --group {group} --table " + "t" * 70 + " --auto-create-schema",
            "too long", "offsets"),
        row(RUN + " --bogus", "unrecognized arguments: --bogus", *RUN_LEAVES, usage=True),
        row(RUN + " --otel --bootstrap 127.0.0.1:1", UNREACHABLE, *RUN_LEAVES),
        row(RUN + " --otel-max-links 5", "--otel-max-links only applies with --otel",
            *RUN_LEAVES),
        row(RUN + " --otel --otel-max-links -1", "--otel-max-links must be 0 or more",
            *RUN_LEAVES),
        row(RUN + " --otel --otel-max-links many", "invalid int value: 'many'", *RUN_LEAVES,
            usage=True),
        row(RUN + " --flush-connections 0", "flush_connections must be a positive number",
            *RUN_LEAVES),
        row(RUN + " --flush-connections 65", "flush_connections must be at most 64, got 65",
            *RUN_LEAVES),
        row(RUN + " --flush-connections two", "invalid int value: 'two'", *RUN_LEAVES,
            usage=True),
        row(RUN + " --flush-connections 2 --dsn " + BAD_DSN, NO_DB, *RUN_LEAVES),
        row(RUN + " --synchronous-commit sometimes",
            "synchronous_commit must be one of on, off, local, remote_write, remote_apply, "
            "got 'sometimes'", *RUN_LEAVES),
    ],
    "transform": [
        row(TRANSFORM + " --bootstrap 127.0.0.1:1", UNREACHABLE, "topic", "offsets"),
        row(TRANSFORM + " -X bootstrap.servers=127.0.0.1:1", UNREACHABLE, "topic"),
        row(TRANSFORM + " " + SASL, "refused to authenticate", "topic"),
        row(TRANSFORM + " -X bogus.key=1", '"bogus.key"', "topic"),
        row(TRANSFORM + " -X session.timeout.ms=abc", '"session.timeout.ms"', "topic"),
        row(TRANSFORM + " -X isolation.level=read_uncommitted", "set by spr transform", "topic"),
        row("transform --topic {topic} --group {group} --output-topic {topic}",
            "also a source topic"),
        row("transform --topic {new_topic} --group {group} --output-topic {topic}.out",
            "does not exist on", "topic"),
        row(TRANSFORM + " --output-partitions 0", "output_partitions must be a positive",
            "topic"),
        row(TRANSFORM + " --no-dlq --dlq-topic x", "--no-dlq", "topic"),
        row(TRANSFORM + " --dlq-topic {topic}", "which this transform reads", "topic"),
        row(TRANSFORM + " --workers 0", "workers must be a positive", "topic"),
        row(TRANSFORM + " --otel --bootstrap 127.0.0.1:1", UNREACHABLE, "topic"),
        row(TRANSFORM + " --otel-max-links 5", "unrecognized arguments: --otel-max-links",
            "topic", usage=True),
        row(TRANSFORM + " --max-age-ms -1", "max_age_ms must be a positive", "topic"),
        row(TRANSFORM + " --idle-exit -1", "idle_exit_s must be a positive", "topic"),
        row(TRANSFORM + " --stats /nonexistent/dir/s.json",
            "the directory /nonexistent/dir does not exist", "topic"),
        row(TRANSFORM + " --workers two", "invalid int value: 'two'", "topic", usage=True),
        row("transform --topic {topic} --group {group}", "--output-topic", usage=True),
        row(TRANSFORM + " --bogus", "unrecognized arguments: --bogus", "topic", usage=True),
    ],
    "db init": [
        row("db init --table {table} --dsn " + BAD_DSN, NO_DB, "table"),
        row("db init --table {table} --dsn 'not a dsn'", BAD_DSN_SAYS, "table"),
        row("db init --table {table} --config {toml_workers}", "workers must be a whole number",
            "table"),
        row("db init --table {table} --config {toml_unknown}", "unknown key(s) colour", "table"),
        row("db init --table {table} --config /nonexistent/spr.toml", "does not exist", "table"),
        row("db init --table " + "t" * 70, "too long"),
        row("db init --table {table} --mapping bogus", "invalid choice: 'bogus'", "table",
            usage=True),
    ],
    "lag": [
        row("lag --group {group} --bootstrap 127.0.0.1:1", UNREACHABLE),
        row("lag --group {group} -X bootstrap.servers=127.0.0.1:1", UNREACHABLE),
        row("lag --group {group} " + SASL, "refused to authenticate"),
        row("lag --group {group} -X bogus.key=1", '"bogus.key"'),
        row("lag --group {group} -X session.timeout.ms=abc", '"session.timeout.ms"'),
        row("lag --group {group} --max-lag -1", "--max-lag must be >= 0"),
        row("lag --group {group} --max-retention-fraction 0", "must be > 0"),
        row("lag --group {group} --max-retention-fraction most", "not a number: 'most'",
            usage=True),
        row("lag --group {group} --topic {new_topic}", "does not exist on", "topic"),
        row("lag --group ''", "a consumer group is required"),
    ],
    "replay": [
        row(REPLAY + " --bootstrap 127.0.0.1:1 --into {into}", UNREACHABLE, "table",
            "offsets"),
        row(REPLAY + " -X bootstrap.servers=127.0.0.1:1", UNREACHABLE, "offsets"),
        row(REPLAY + " --dsn " + BAD_DSN + " --into {into}", NO_DB, "table", "offsets"),
        row(REPLAY + " --dsn 'not a dsn'", BAD_DSN_SAYS, "offsets"),
        row(REPLAY + " -X bogus.key=1 --into {into}", '"bogus.key"', "table", "offsets"),
        row("replay --group {group} --topic {topic} --to-offset -1", "--to-offset must be >= 0",
            "offsets"),
        row("replay --group {group} --topic {topic} --to-timestamp yesterday",
            "--to-timestamp must be epoch milliseconds", "offsets"),
        row(REPLAY + " --partition -1", "--partition must be >= 0", "offsets"),
        row(REPLAY + " --run", "--run only applies to --into", "offsets"),
        row(REPLAY + " --into {into} --run --idle-exit 0", "--idle-exit must be a positive",
            "table", "offsets"),
        row("replay --group {group} --topic {new_topic} --to-offset 0 --into {into}",
            "does not exist on", "table", "offsets", "topic"),
        row(REPLAY + " --into spr_entity_state", "--into needs a new table name", "offsets"),
        row("replay --group {group} --topic {topic} --to-offset first",
            "invalid int value: 'first'", "offsets", usage=True),
    ],
    "plan": [
        row(MEASURE + " --bootstrap 127.0.0.1:1", UNREACHABLE),
        row(MEASURE + " -X bootstrap.servers=127.0.0.1:1", UNREACHABLE),
        row(MEASURE + " --dsn " + BAD_DSN, NO_DB),
        row(MEASURE + " --dsn 'not a dsn'", BAD_DSN_SAYS),
        row(MEASURE + " -X bogus.key=1", '"bogus.key"'),
        row("plan --target-throughput 1000 --measure --measure-events 10",
            "--measure-events must be at least 1,000"),
        row("plan --target-throughput -5 --partition-throughput 100",
            "target throughput must be a positive number"),
        row("plan --target-throughput 1000 --partition-throughput 0",
            "partition throughput must be a positive number"),
        row("plan --target-throughput 1000 --partition-throughput 100 --headroom 20",
            "headroom must be between 0 and 10"),
        row("plan --target-throughput lots --partition-throughput 100",
            "invalid float value: 'lots'", usage=True),
    ],
    "bench": [
        row("bench --events 1000 --bootstrap 127.0.0.1:1", UNREACHABLE, "workspace"),
        row("bench --events 1000 --dsn " + BAD_DSN, NO_DB, "workspace"),
        row("bench --events 1000 --dsn 'not a dsn'", BAD_DSN_SAYS, "workspace"),
        row("bench --events -5", "events must be a positive integer", "workspace"),
        row("bench --events 1000 --flush-connections 0",
            "flush_connections must be a positive integer", "workspace"),
        row("bench --events 1000 --partitions 0", "partitions must be a positive integer",
            "workspace"),
        row("bench --events 1000 --duplicates 2", "duplicates must be", "workspace"),
        row("bench --events 1000 --skip bogus", "cannot skip bogus", "workspace"),
        row("bench --events 1000 --json /nonexistent/dir/bench.json",
            "the directory /nonexistent/dir does not exist", "workspace"),
        row("bench --events many", "invalid int value: 'many'", "workspace", usage=True),
        row("bench --scenario bogus", "invalid choice: 'bogus'", "workspace", usage=True),
        row("bench --scenario transform --events 1000 --bootstrap 127.0.0.1:1", UNREACHABLE,
            "workspace"),
        row("bench --scenario transform --events 1000 --plot /tmp/spr-contract.png",
            "the transform scenario has no picture", "workspace"),
        row("bench --scenario live --events 1000 --plot /tmp/spr-contract.png",
            "the live scenario has no picture", "workspace"),
        row("bench --scenario soak --soak-minutes 0", "soak durations must be positive",
            "workspace"),
        row("bench --scenario soak --soak-minutes long", "invalid float value: 'long'",
            "workspace", usage=True),
    ],
}  # fmt: skip

CASES = [(key, index, r) for key, rows in ROWS.items() for index, r in enumerate(rows)]


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip()
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_commands(sub, f"{prefix} {name}")


def test_every_subcommand_has_rows() -> None:
    assert set(_leaf_commands(build_parser())) == set(ROWS)
    for key, rows in ROWS.items():
        assert rows, key
        assert all(r.command == key for r in rows), key


@dataclass
class Outcome:
    row: Row
    values: dict[str, str]
    tmp: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _write_configs(folder: Path) -> dict[str, str]:
    files = {
        "toml_unknown": "colour = 1\n",
        "toml_kafka": '[kafka]\n"bogus.key" = 1\n',
        "toml_workers": "workers = 1.7\n",
        "toml_batch": "[batch]\nmax_rows = 1.5\n",
        "toml_broken": "this is not toml\n",
    }
    paths = {}
    for name, text in files.items():
        path = folder / f"{name}.toml"
        path.write_text(text)
        paths[name] = str(path)
    return paths


def _run_row(key: str, index: int, r: Row, base: Path, shared: dict[str, str]) -> Outcome:
    tag = uuid.uuid4().hex[:10]
    values = {
        **shared,
        "new_topic": f"cli-contract-{tag}",
        "table": f"cli_contract_{tag}",
        "into": f"cli_contract_into_{tag}",
        "group": f"cli-contract-{tag}",
    }
    tmp = base / f"{key.replace(' ', '-')}-{index}"
    tmp.mkdir()
    argv = [word.format(**values) for word in shlex.split(r.argv)]
    # Everything the stack's own commands might use is isolated; spr dev never starts.
    env = {**os.environ, "TMPDIR": str(tmp), "SPR_DEV_DIR": str(tmp / "dev")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "spr", *argv], capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip
    return Outcome(r, values, tmp, done.returncode, done.stdout, done.stderr,
                   time.monotonic() - started)  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, admin: AdminClient, dsn: str
) -> Iterator[dict[tuple[str, int], Outcome]]:
    """Every row, run a few at a time (each is a short-lived process), once per module."""
    topic = f"cli-contract-{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30
    )
    base = tmp_path_factory.mktemp("cli-contract")
    shared = {"topic": topic, **_write_configs(base)}
    try:
        with ThreadPoolExecutor(_PARALLEL) as pool:
            futures = {
                (key, index): pool.submit(_run_row, key, index, r, base, shared)
                for key, index, r in CASES
            }
            yield {k: f.result() for k, f in futures.items()}
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    # Other suites restart the stack's PostgreSQL on purpose; wait for it, boundedly.
    for _ in range(60):
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            time.sleep(0.5)
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def _existing_topics(admin: AdminClient) -> set[str]:
    return set(admin.list_topics(timeout=10).topics)


def _left_behind(outcome: Outcome, admin: AdminClient, dsn: str) -> list[str]:
    found = []
    values = outcome.values
    leaves = outcome.row.leaves
    if "topic" in leaves and values["new_topic"] in _existing_topics(admin):
        found.append(f"topic {values['new_topic']}")
    with _connect(dsn) as conn:
        if "table" in leaves:
            for name in (values["table"], values["into"]):
                exists = conn.execute("SELECT to_regclass(%s)", (f'"{name}"',)).fetchone()
                if exists is not None and exists[0] is not None:
                    found.append(f"table {name}")
        if "offsets" in leaves:
            offsets = conn.execute("SELECT to_regclass('spr_offsets')").fetchone()
            if offsets is not None and offsets[0] is not None:
                count = conn.execute(
                    "SELECT count(*) FROM spr_offsets WHERE group_id LIKE %s",
                    (values["group"] + "%",),
                ).fetchone()
                if count is not None and count[0]:
                    found.append(f"{count[0]} offset row(s) of {values['group']}")
    if "workspace" in leaves:
        found += [f"bench workspace {p}" for p in outcome.tmp.glob("spr-bench-*")]
    return found


@pytest.mark.parametrize(
    ("key", "index"),
    [(key, index) for key, index, _ in CASES],
    ids=[f"{key.replace(' ', '-')}-{index}" for key, index, _ in CASES],
)
def test_bad_input_gives_one_sentence_and_exit_2(
    key: str, index: int, outcomes: dict[tuple[str, int], Outcome], admin: AdminClient,
    dsn: str,
) -> None:  # fmt: skip
    outcome = outcomes[(key, index)]
    r = outcome.row
    context: Any = (r.argv, outcome.returncode, outcome.stderr[-2000:])
    assert outcome.returncode == 2, context
    assert "Traceback" not in outcome.stderr, context
    assert SECRET not in outcome.stderr + outcome.stdout, context
    assert "%3|" not in outcome.stderr and "FAIL|" not in outcome.stderr, context
    lines = outcome.stderr.rstrip("\n").split("\n")
    if r.usage:
        # argparse: the usage of the sub-command the argument belongs to, one error line.
        assert lines[0].startswith(f"usage: spr {key}"), context
        assert lines[-1].startswith(f"spr {key}: error: "), context
        assert r.says in lines[-1], context
        assert all(line.startswith(" ") for line in lines[1:-1]), context
    else:
        assert len(lines) == 1, context
        assert lines[0].startswith(f"spr {key.split()[0]}: "), context
        assert r.says in lines[0], context
    assert outcome.seconds < ROW_BUDGET_S, (r.argv, f"took {outcome.seconds:.1f} s")
    assert _left_behind(outcome, admin, dsn) == [], context
