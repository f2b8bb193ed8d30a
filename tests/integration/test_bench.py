"""``spr bench`` end to end on the real broker and database: a short run must verify,
and its JSON must carry every figure the issue asks for. Correctness, not speed."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spr.bench.harness import BenchOptions, run_bench

CONTENDERS = {"raw_consume", "spr", "copy_merge", "arroyo", "quix", "antipattern"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.timeout(180)
def test_short_bench_verifies_and_reports(tmp_path: Path, bootstrap: str, dsn: str) -> None:
    out = tmp_path / "bench.json"
    picture = tmp_path / "bench.png"
    argv = [sys.executable, "-m", "spr", "bench", "--events", "20000", "--entities", "4000",
            "--skip-quix", "--antipattern-events", "300", "--latency-rate", "5000",
            "--latency-seconds", "2", "--bootstrap", bootstrap, "--dsn", dsn,
            "--json", str(out), "--plot", str(picture)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASSED" in done.stdout and "events/s" in done.stdout

    document = json.loads(out.read_text())
    assert document["ok"] is True
    assert document["workload"]["events"] == 20_000
    assert document["workload"]["duplicates_sent"] > 0 and document["workload"]["stale_sent"] > 0
    contenders = document["contenders"]
    assert set(contenders) == CONTENDERS
    assert contenders["quix"] == {"status": "skipped", "reason": "--skip"}

    spr = contenders["spr"]
    assert spr["status"] == "ok", spr
    check = spr["verification"]
    assert (check["lost"], check["wrong"], check["duplicated"]) == (0, 0, 0)
    assert check["rows"] == check["expected_entities"] > 0
    assert spr["offsets_committed"] is True
    assert _number(spr["events_per_s"]) and spr["events_per_s"] > 0
    assert spr["peak_rss_mb"] > 10
    stats = spr["stats"]
    assert stats["consumed"] == 20_000
    assert stats["flushes"] >= 1 and _number(stats["pauses"])
    # Every republished duplicate within the ring's window is a dedup hit.
    assert spr["dedup_hits"] == stats["duplicate"] > 0

    for name in ("raw_consume", "copy_merge", "arroyo"):
        entry = contenders[name]
        assert entry["status"] == "ok", (name, entry)
        assert entry["events_per_s"] > 0 and entry["peak_rss_mb"] > 10
    for name in ("copy_merge", "arroyo"):
        assert contenders[name]["verification"]["ok"], name
    # The anti-pattern consumed exactly its prefix, and was verified against that prefix.
    anti = contenders["antipattern"]
    assert anti["events"] == 300 and anti["status"] in ("ok", "incorrect")
    assert anti["verification"]["duplicated"] == 0 and anti["verification"]["wrong"] == 0

    ratios = document["ratios"]
    assert set(ratios) == CONTENDERS - {"spr"}
    assert ratios["quix"] is None
    assert ratios["arroyo"] == pytest.approx(
        spr["events_per_s"] / contenders["arroyo"]["events_per_s"], rel=1e-2
    )

    latency = document["latency"]
    assert latency["status"] == "ok", latency
    assert latency["count"] == latency["events"] == 10_000
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert latency["verification"]["ok"]

    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing is left behind.
    assert document["workload"]["topic"] not in _topics(bootstrap)


@pytest.mark.timeout(180)
def test_live_scenario_writes_a_row_per_event_beside_the_other_scenarios(
    tmp_path: Path, bootstrap: str, dsn: str
) -> None:
    # Every scenario in one workspace (as --scenario all runs them), so that each must
    # keep to its own groups, tables and offsets.
    out = tmp_path / "live.json"
    argv = [sys.executable, "-m", "spr", "bench", "--scenario", "all", "--events", "20000",
            "--entities", "4000", "--skip", "quix,arroyo,antipattern,latency",
            "--bootstrap", bootstrap, "--dsn", dsn, "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "live (one event per entity, nothing to collapse)" in done.stdout

    document = json.loads(out.read_text())
    assert document["ok"] is True and "latency" not in document and document["transform"]["ok"]
    backlog = document["contenders"]["spr"]
    assert backlog["status"] == "ok" and backlog["offsets_committed"] is True
    assert backlog["stats"]["applied"] < 20_000  # the backlog collapses
    live = document["live"]
    workload = live["workload"]
    assert workload["events"] == workload["entities"] == workload["distinct_entities_touched"]
    assert workload["duplicates_sent"] == workload["stale_sent"] == 0
    assert set(live["contenders"]) == {"raw_consume", "spr", "copy_merge", "plain_merge"}
    spr = live["contenders"]["spr"]
    assert spr["status"] == "ok" and spr["verification"]["ok"], spr
    assert spr["offsets_committed"] is True
    # Nothing collapses: every event consumed is a row merged.
    assert spr["stats"]["consumed"] == spr["stats"]["applied"] == 20_000
    assert live["contenders"]["copy_merge"]["verification"]["ok"]
    # The textbook merge is a ceiling of its own, verified like the others: every event
    # copied (nothing collapsed in the client), the guard keeping each entity's newest.
    plain = live["contenders"]["plain_merge"]
    assert plain["status"] == "ok" and plain["verification"]["ok"], plain
    assert plain["flushes"] >= 1 and _number(plain["events_per_s"])
    assert set(live["ratios"]) == {"raw_consume", "copy_merge", "plain_merge"}
    assert workload["topic"] not in _topics(bootstrap)


@pytest.mark.timeout(180)
def test_soak_samples_rss_over_time_and_verifies(tmp_path: Path, bootstrap: str, dsn: str) -> None:
    out, picture = tmp_path / "soak.json", tmp_path / "soak.png"
    argv = [sys.executable, "-m", "spr", "bench", "--scenario", "soak", "--soak-minutes", "0.25",
            "--latency-rate", "2000", "--entities", "3000", "--bootstrap", bootstrap,
            "--dsn", dsn, "--json", str(out), "--plot", str(picture)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "soak at 2,000 events/s for 0.25 min" in done.stdout

    document = json.loads(out.read_text())
    soak = document["soak"]
    assert document["ok"] is True and soak["status"] == "ok", soak
    assert soak["events"] == 30_000 and soak["verification"]["ok"]
    # One sample a second from spr's start to its exit, in MB, all of a live process.
    series = soak["rss_series_mb"]
    assert len(series) >= 15 and all(1 < mb < 1000 for _, mb in series)
    assert all(b[0] > a[0] for a, b in itertools.pairwise(series))
    rss = soak["rss"]
    assert rss["samples"] == len(series) and rss["warmup_s"] == 2.5
    assert rss["peak_mb"] == pytest.approx(max(mb for _, mb in series), abs=0.05)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latency" not in document and "contenders" not in document


@pytest.mark.timeout(700)
def test_quix_contender(bootstrap: str, dsn: str) -> None:
    """Quix Streams runs from its own venv (built on first use, then cached); its sink
    must apply every event it was given. Without a sequence guard it may only ever
    err towards older states, never invent rows."""
    options = BenchOptions(
        bootstrap=bootstrap,
        dsn=dsn,
        events=3_000,
        entities=500,
        skip=frozenset({"ceilings", "arroyo", "antipattern", "latency"}),
        quix_build_timeout_s=600,
    )
    document = run_bench(options)
    quix = document["contenders"]["quix"]
    assert quix["status"] in ("ok", "incorrect"), quix
    assert quix["events"] == 3_000 and quix["events_per_s"] > 0
    assert quix["peak_rss_mb"] > 10
    assert "quixstreams 3." in quix["note"]
    check = quix["verification"]
    assert check["missing"] == 0 and check["duplicated"] == 0 and check["wrong"] == 0
    assert document["contenders"]["spr"]["status"] == "ok"
    assert document["ratios"]["quix"] > 0


@pytest.mark.timeout(300)
def test_transform_scenario_verifies_and_reports(tmp_path: Path, bootstrap: str) -> None:
    """The transform scenario end to end, without Quix: the ceiling and spr transform each
    move every foreign event, spr's output verifies, and the report has every figure."""
    out = tmp_path / "transform.json"
    argv = [sys.executable, "-m", "spr", "bench", "--scenario", "transform", "--events",
            "20000", "--entities", "3000", "--skip-quix", "--latency-rate", "2000",
            "--latency-seconds", "2", "--bootstrap", bootstrap, "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASSED" in done.stdout and "spr / consume_produce events/s" in done.stdout

    document = json.loads(out.read_text())
    assert document["ok"] is True and document["options"]["scenario"] == "transform"
    assert "contenders" not in document  # the state scenario did not run
    section = document["transform"]
    assert section["ok"] is True
    assert section["workload"]["events"] == 20_000
    assert set(section["workload"]["shapes"]) == {"order", "payment", "shipment", "invoice"}
    contenders = section["contenders"]
    assert list(contenders) == ["consume_produce", "spr", "quix"]
    assert contenders["quix"] == {"status": "skipped", "reason": "--skip"}
    for name in ("consume_produce", "spr"):
        entry = contenders[name]
        assert entry["status"] == "ok", (name, entry)
        assert _number(entry["events_per_s"]) and entry["events_per_s"] > 0
        assert 10 < entry["peak_rss_mb"] < 1000
        check = entry["verification"]
        assert check["ok"] and check["records"] == check["expected"] == 20_000, check
        latency = entry["latency"]
        assert latency["status"] == "ok" and latency["count"] == 4_000, (name, latency)
        assert latency["verification"]["ok"], (name, latency["verification"])
        assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    spr = contenders["spr"]
    # Every event exactly once, re-keyed to spr's partition key, on partition_for(key, n).
    check = spr["verification"]
    assert (check["missing"], check["duplicated"], check["wrong_key"]) == (0, 0, 0)
    assert (check["wrong_partition"], check["out_of_order"]) == (0, 0)
    assert spr["stats"]["produced"] == spr["stats"]["consumed"] == 20_000
    assert spr["stats"]["transactions"] >= 1 and spr["stats"]["aborts"] == 0
    ratios = section["ratios"]
    assert ratios["spr_vs_quix"] is None
    ceiling = contenders["consume_produce"]
    if spr.get("too_short") or ceiling.get("too_short"):  # under 0.5 s: no ratio
        assert ratios["spr_vs_consume_produce"] is None
    else:
        assert ratios["spr_vs_consume_produce"] == pytest.approx(
            spr["events_per_s"] / ceiling["events_per_s"], rel=1e-2
        )
    assert [t["name"] for t in section["targets"]] == [
        "spr / consume_produce events/s", "spr / quix events/s", "spr peak RSS MB"
    ]  # fmt: skip
    assert section["targets"][2]["value"] == spr["peak_rss_mb"]
    assert section["workload"]["topic"] not in _topics(bootstrap)


@pytest.mark.timeout(700)
def test_transform_scenario_quix_contender(bootstrap: str, dsn: str) -> None:
    """Quix Streams' exactly-once mode does the same normalisation from its own venv: its
    output is read back like spr's and must hold every event once, on spr's partition."""
    options = BenchOptions(
        bootstrap=bootstrap,
        dsn=dsn,
        events=4_000,
        entities=600,
        scenario="transform",
        skip=frozenset({"ceilings", "latency"}),
        quix_build_timeout_s=600,
    )
    document = run_bench(options)
    section = document["transform"]
    quix = section["contenders"]["quix"]
    assert quix["status"] == "ok", quix
    assert quix["events_per_s"] > 0 and quix["peak_rss_mb"] > 10
    assert "quixstreams 3." in quix["note"] and "exactly-once" in quix["note"]
    assert quix["verification"]["ok"], quix["verification"]
    assert section["contenders"]["spr"]["status"] == "ok"
    assert section["contenders"]["consume_produce"]["status"] == "skipped"
    spr = section["contenders"]["spr"]
    if spr.get("too_short") or quix.get("too_short"):  # under 0.5 s: no ratio
        assert section["ratios"]["spr_vs_quix"] is None
    else:
        assert section["ratios"]["spr_vs_quix"] > 0
    assert document["ok"] is True


def test_output_check_finds_every_kind_of_violation(
    bootstrap: str, make_topic: Callable[..., str]
) -> None:
    """verify_output is what fails spr's run: a hand-made output with one event missing,
    one twice, one keyed wrong, one on the wrong partition and one out of order."""
    from confluent_kafka import Producer

    from spr.bench.foreign import ForeignSpec, produce_foreign, verify_output

    source, output = make_topic(4), make_topic(4)
    produced = produce_foreign(ForeignSpec(count=300, entities=5, seed=9), topic=source,
                               bootstrap=bootstrap, partitions=4)  # fmt: skip
    expected = produced.expected
    keys, placement = expected.spr_routing()
    entity_of = expected.entity_of
    values = [v for _, _, v in _generate(300, 5, 9)]
    records = [(ref, keys[entity_of[ref]], placement[entity_of[ref]]) for ref in range(300)]
    records.remove(records[10])  # missing
    records.append(records[20])  # duplicated
    records[30] = (records[30][0], b"0000000000000000", records[30][2])  # wrong key
    records[40] = (records[40][0], records[40][1], (records[40][2] + 1) % 4)  # wrong partition
    later = next(r for r in records[51:] if entity_of[r[0]] == entity_of[records[50][0]])
    records.remove(later)
    records.insert(50, later)  # one of the entity's events ahead of an earlier one
    producer = Producer({"bootstrap.servers": bootstrap})
    for ref, key, partition in records:
        producer.produce(output, values[ref], key, partition=partition)
    assert producer.flush(30) == 0
    check = verify_output(bootstrap=bootstrap, topic=output, partitions=4, expected=expected,
                          keys=keys, placement=placement, timeout_s=60)  # fmt: skip
    assert check["ok"] is False
    assert (check["missing"], check["duplicated"], check["wrong_key"]) == (1, 1, 1)
    assert check["wrong_partition"] == 1 and check["out_of_order"] >= 1
    assert check["records"] == 300 and check["unread_partitions"] == []


def _generate(count: int, entities: int, seed: int) -> list[tuple[int, bytes, bytes]]:
    from spr.bench.foreign import ForeignSpec, generate

    return list(generate(ForeignSpec(count=count, entities=entities, seed=seed)))


def _topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)
