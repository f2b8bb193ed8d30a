"""`spr run --metrics-port` serves counters that match what happened (issue 8).

N events, K of them re-sent duplicates and I invalid, are consumed by a running
`spr run`; /metrics is scraped while it still runs (before its idle exit) and must say
N events in all, K duplicates, K ring hits, N - I ring lookups, I dead letters, one
flush-histogram observation per flush, and a lag gauge per partition.
"""

from __future__ import annotations

import json
import random
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import spr_run_argv, start, wait_for
from psycopg import sql
from test_failures import produce, valid

Names = Callable[[str], str]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def events_total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("spr_events_total{"))


def test_scraped_counters_match_what_happened(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names, tmp_path: Path
) -> None:
    topic, dlq = make_topic(partitions=3), make_topic(partitions=1, prefix="dlq")
    rng = random.Random(8)
    unique = [valid(f"m-{e}", seq, f"s{seq}") for seq in (1, 2, 3) for e in range(300)]
    duplicates = [unique[i] for i in rng.sample(range(len(unique)), 60)]
    invalid = [(b"k", b"{not json"), (b"k", b"[]"), (b"k", b"")]
    messages = unique + duplicates + invalid
    n, k, i = len(messages), len(duplicates), len(invalid)
    positions = produce(bootstrap, topic, messages)
    assert len({p for p, _ in positions}) == 3

    port = free_port()
    table, group = unique_name("state"), unique_name("g")
    log, stats = tmp_path / "run.log", tmp_path / "stats.json"
    argv = spr_run_argv(topics=[topic], group=group, dsn=dsn, bootstrap=bootstrap, table=table,
                        extra=["--idle-exit", "5", "--batch-max-rows", "250",
                               "--metrics-port", str(port), "--dlq-topic", dlq,
                               "--stats", str(stats)])  # fmt: skip
    proc = start(argv, log)
    try:
        seen: dict[str, float] = {}

        def all_counted() -> bool:
            nonlocal seen
            try:
                seen = scrape(port)
            except OSError:
                return False
            return events_total(seen) == n

        wait_for(all_counted, 60, f"{n} events on /metrics")
        assert proc.poll() is None  # scraped from the running process
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    final = json.loads(stats.read_text())
    assert seen['spr_events_total{outcome="duplicate"}'] == k
    assert seen['spr_events_total{outcome="dead_lettered"}'] == i
    applied = (
        seen['spr_events_total{outcome="applied"}'] + seen['spr_events_total{outcome="stale"}']
    )
    assert applied == n - k - i
    assert seen["spr_idempotency_hits_total"] == k
    assert seen["spr_idempotency_lookups_total"] == n - i
    for partition in range(3):
        assert seen[f'spr_consumer_lag{{partition="{partition}",topic="{topic}"}}'] >= 0
    assert seen["spr_flush_seconds_count"] == final["flushes"] > 0
    assert seen["spr_processor_latency_seconds_count"] > 0
    assert seen["spr_circuit_state"] == 0 and seen["spr_rebalances_total"] >= 1
    assert final["duplicate"] == k and final["invalid"] == i and final["consumed"] == n


def _names_used_by_deploy() -> set[str]:
    """The series the dashboard's panels and the alert rules query (histogram series by
    their base name)."""
    import re

    import yaml  # type: ignore[import-untyped]

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    exprs = [
        target["expr"]
        for panel in json.loads((deploy / "grafana" / "spr-dashboard.json").read_text())["panels"]
        for target in panel["targets"]
    ]
    rules = yaml.safe_load((deploy / "prometheus" / "spr-alerts.yml").read_text())
    exprs += [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]
    names = set(re.findall(r"\bspr_[a-z_]+\b", "\n".join(exprs)))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def _series_names(samples: dict[str, float]) -> set[str]:
    import re

    return {re.sub(r"_(bucket|count|sum|created)$", "", k.split("{")[0]) for k in samples}


def test_every_deployed_metric_is_live_and_lag_seconds_follows_the_backlog(
    bootstrap: str, dsn: str, pg: Any, make_topic: Callable[..., str], unique_name: Names,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A live `spr run` exposes every series the dashboard and the alert rules use, once
    the skew window has passed; spr_consumer_lag_seconds is above 0 while a backlog
    waits, and 0 once the partitions are caught up."""
    import subprocess
    import sys
    import time

    from helpers import produce_load

    from spr.dev.loadgen import LoadSpec

    topic = make_topic(partitions=3)
    spec = LoadSpec(count=20_000, entities=20_000, seed=21)
    produce_load(bootstrap, topic, spec)
    table, group = unique_name("state"), unique_name("g")
    init = subprocess.run([sys.executable, "-m", "spr", "db", "init", "--dsn", dsn,
                           "--table", table], capture_output=True, text=True)  # fmt: skip
    assert init.returncode == 0, init.stderr
    # A slow database: every merge takes a second, so the backlog waits for a while.
    pg.execute(
        "CREATE OR REPLACE FUNCTION spr_test_slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(1.0); RETURN NULL; END $$"
    )
    pg.execute(
        sql.SQL("CREATE TRIGGER slow AFTER INSERT ON {} FOR EACH STATEMENT "
                "EXECUTE FUNCTION spr_test_slow()").format(sql.Identifier(table))
    )  # fmt: skip
    time.sleep(1.5)  # the backlog's oldest events are at least this old
    port = free_port()
    argv = [sys.executable, "-m", "spr", "run", "--topic", topic, "--group", group,
            "--dsn", dsn, "--bootstrap", bootstrap, "--table", table, "--idle-exit", "6",
            "--batch-max-rows", "200", "--metrics-port", str(port), "--metrics-window", "2"]  # fmt: skip
    log = tmp_path / "run.log"
    proc = start(argv, log)
    lag_series = {f'spr_consumer_lag_seconds{{partition="{p}",topic="{topic}"}}' for p in range(3)}
    seen: set[str] = set()
    ages_while_lagging: list[float] = []
    caught_up: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                samples = scrape(port)
            except OSError:
                time.sleep(0.2)
                continue
            seen |= _series_names(samples)
            lags = {k: v for k, v in samples.items() if k.startswith("spr_consumer_lag{")}
            if any(v > 0 for v in lags.values()):
                ages_while_lagging += [samples[k] for k in lag_series if k in samples]
            elif lags and all(v == 0 for v in lags.values()) and events_total(samples) >= 20_000:
                caught_up = {k: samples[k] for k in lag_series if k in samples}
            time.sleep(0.3)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    missing = _names_used_by_deploy() - seen
    assert not missing, sorted(missing)
    assert max(ages_while_lagging, default=0) > 1.0, ages_while_lagging
    assert caught_up == dict.fromkeys(lag_series, 0.0)
