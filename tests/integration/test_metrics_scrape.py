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

from helpers import spr_run_argv, start, wait_for
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
