"""The arithmetic of ``spr bench``: verification categories, percentiles, throughput,
latency attribution, ratios and the printed report. No servers."""

from __future__ import annotations

import math
from typing import Any

import pytest

from spr.bench import report
from spr.bench.harness import BenchOptions
from spr.bench.verify import compare
from spr.errors import ConfigError

EXPECTED = {
    "order:1": {"sequence": 3, "state": "authorized", "event_id": "e3"},
    "order:2": {"sequence": 1, "state": "created", "event_id": "e4"},
    "payment:1": {"sequence": 2, "state": "pending", "event_id": "e6"},
}
EXACT = [
    ("order", "1", 3, "authorized", "e3"),
    ("order", "2", 1, "created", "e4"),
    ("payment", "1", 2, "pending", "e6"),
]


def test_exact_table_verifies() -> None:
    result = compare(EXPECTED, EXACT)
    assert result.ok
    assert (result.lost, result.wrong, result.duplicated) == (0, 0, 0)
    assert result.rows == 3 and result.expected_entities == 3
    assert result.as_dict()["ok"] is True


def test_missing_and_older_rows_are_lost() -> None:
    rows = [EXACT[0], ("order", "2", 0, "created", "e0")]  # payment:1 missing, order:2 older
    result = compare(EXPECTED, rows)
    assert not result.ok
    assert (result.missing, result.older, result.lost) == (1, 1, 2)
    assert result.wrong == 0 and result.duplicated == 0
    assert any("payment:1: no row" in e for e in result.examples)


def test_same_sequence_other_content_is_wrong() -> None:
    rows = [EXACT[0], ("order", "2", 1, "pending", "e4"), ("payment", "1", 2, "pending", "eX")]
    result = compare(EXPECTED, rows)
    assert (result.lost, result.wrong, result.duplicated) == (0, 2, 0)
    assert result.mismatched == 2


def test_extra_unexpected_and_newer_rows_are_duplicated() -> None:
    rows = [
        *EXACT,
        ("order", "1", 1, "created", "e1"),  # a second row for order:1 (older)
        ("invoice", "9", 1, "created", "e9"),  # never produced
    ]
    result = compare(EXPECTED, rows)
    assert (result.extra_rows, result.unexpected, result.newer) == (1, 1, 0)
    assert result.duplicated == 2 and result.lost == 0 and result.wrong == 0

    newer = compare(EXPECTED, [EXACT[0], EXACT[1], ("payment", "1", 5, "closed", "e99")])
    assert (newer.newer, newer.duplicated, newer.lost) == (1, 1, 0)


def test_duplicate_rows_are_judged_by_the_newest() -> None:
    # Append-only tables hold history: the entity is right if its newest row is right,
    # and every additional row is still a duplicated effect.
    rows = [("order", "1", 2, "pending", "e2"), *EXACT]
    result = compare(EXPECTED, rows)
    assert (result.lost, result.wrong, result.extra_rows) == (0, 0, 1)


def test_null_sequence_counts_as_older() -> None:
    result = compare(EXPECTED, [("order", "1", None, None, None), *EXACT[1:]])
    assert result.older == 1 and result.lost == 1


def test_examples_are_bounded() -> None:
    expected = {f"t:{i}": {"sequence": 1, "state": "s", "event_id": f"e{i}"} for i in range(50)}
    result = compare(expected, [])
    assert result.missing == 50 and len(result.examples) == 5


def test_percentile_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 99) == 99.0
    assert report.percentile(values, 100) == 100.0
    assert report.percentile(values, 0) == 1.0
    assert report.percentile([7.0], 99.9) == 7.0
    assert math.isnan(report.percentile([], 50))
    with pytest.raises(ValueError):
        report.percentile(values, 101)


def test_throughput_from_first_message_to_total() -> None:
    timeline = [(10.5, 400), (11.0, 900), (12.0, 1000), (13.0, 1000)]
    assert report.done_time(timeline, 1000) == 12.0
    assert report.throughput(timeline, 1000, first_s=10.0) == pytest.approx(500.0)
    assert report.throughput(timeline, 2000, first_s=10.0) is None
    assert report.throughput(timeline, 1000, first_s=None) is None


def test_cumulative_from_flushes_merges_workers() -> None:
    start = {0: 100, 1: 0}
    records: list[report.FlushRecord] = [
        (2.0, {1: 30}),  # worker B
        (1.0, {0: 150}),  # worker A
        (3.0, {0: 140, 1: 50}),  # a zombie's older offset for partition 0 never counts
    ]
    timeline = report.cumulative_from_flushes(records, start)
    assert timeline == [(1.0, 50), (2.0, 80), (3.0, 100)]


def test_latency_is_charged_to_the_first_covering_commit() -> None:
    start = {0: 10, 1: 0}
    stamps = {0: [1000, 1001, 1002], 1: [1000, 1005]}
    records: list[report.FlushRecord] = [
        (1.010, {0: 12}),  # offsets 10, 11 of partition 0
        (1.020, {0: 13, 1: 2}),  # offset 12 of p0, 0 and 1 of p1
        (1.030, {0: 13, 1: 2}),  # nothing new
    ]
    values = report.latencies_ms(records, stamps, start)
    assert sorted(round(v, 6) for v in values) == [9.0, 10.0, 15.0, 18.0, 20.0]
    summary = report.latency_summary(values)
    assert summary["count"] == 5
    assert summary["p50_ms"] == 15.0 and summary["max_ms"] == 20.0
    assert report.latency_summary([])["count"] == 0


def test_rate_series_interpolates() -> None:
    centres, rates = report.rate_series([(1.0, 100), (2.0, 300)], origin_s=0.0, bin_s=0.5)
    assert centres == [0.25, 0.75, 1.25, 1.75]
    assert rates == pytest.approx([100.0, 100.0, 200.0, 200.0])
    assert report.rate_series([], 0.0) == ([], [])


def test_ratios() -> None:
    rates = {"spr": 200_000.0, "quix": 40_000.0, "raw_consume": 400_000.0, "arroyo": None}
    assert report.ratios(rates) == {"quix": 5.0, "raw_consume": 0.5, "arroyo": None}
    assert report.ratios({"spr": None, "quix": 1.0}) == {"quix": None}


def test_format_report_shows_each_contender_and_verdict() -> None:
    document = {
        "workload": {"events": 1000, "entities": 10, "partitions": 3},
        "contenders": {
            "spr": {
                "status": "ok",
                "events": 1000,
                "events_per_s": 5000.0,
                "peak_rss_mb": 70.0,
                "verification": compare(EXPECTED, EXACT).as_dict(),
                "stats": {"flushes": 3, "pauses": 1, "duplicate": 7},
            },
            "quix": {
                "status": "incorrect",
                "events": 1000,
                "events_per_s": 1000.0,
                "reason": "2 lost",
                "verification": compare(EXPECTED, EXACT[:1]).as_dict(),
            },
            "arroyo": {"status": "skipped", "reason": "--skip"},
        },
        "ratios": {"quix": 5.0, "arroyo": None},
        "ok": True,
    }
    text = report.format_report(document)
    assert "spr" in text and "5,000" in text and "5.00" in text
    assert "lost 2 wrong 0 duplicated 0" in text
    assert "3 flushes, 1 pauses, 7 dedup hits" in text
    assert "--skip" in text
    assert text.rstrip().endswith("PASSED")


def test_format_report_shows_the_live_section_and_the_collapse() -> None:
    def spr(rate: float, consumed: int, applied: int, stale: int) -> dict[str, Any]:
        stats = {"flushes": 2, "consumed": consumed, "applied": applied, "stale": stale}
        return {"status": "ok", "events": consumed, "events_per_s": rate, "stats": stats}

    document = {
        "workload": {"events": 1000, "entities": 100, "partitions": 3},
        "contenders": {"spr": spr(9000.0, 1000, 230, 20)},
        "live": {
            "workload": {"events": 1000, "entities": 1000, "partitions": 3},
            "contenders": {
                "spr": spr(4000.0, 1000, 1000, 0),
                "copy_merge": {"status": "ok", "events": 1000, "events_per_s": 2000.0},
            },
            "ratios": {"copy_merge": 2.0},
        },
        "ok": True,
    }
    text = report.format_report(document)
    backlog, live = text.split("live (one event per entity, nothing to collapse): ")
    assert "rows merged per event consumed: 0.25" in backlog
    assert "1,000 events, 1,000 entities" in live
    assert "rows merged per event consumed: 1.00" in live
    assert "copy_merge" in live and "2.00" in live


def test_bench_options_are_validated() -> None:
    BenchOptions(bootstrap="b", dsn="d", events=10, skip=frozenset({"quix", "ceilings"}))
    with pytest.raises(ConfigError, match="skip"):
        BenchOptions(bootstrap="b", dsn="d", skip=frozenset({"kafka"}))
    with pytest.raises(ConfigError, match="events"):
        BenchOptions(bootstrap="b", dsn="d", events=0)
    options = BenchOptions(bootstrap="b", dsn="d", skip=frozenset({"ceilings"}))
    assert options.skips("raw_consume") and options.skips("copy_merge")
    assert options.skips("plain_merge")
    assert not options.skips("spr")
    assert BenchOptions(bootstrap="b", dsn="d", batch_max_rows=7).batch == {"max_rows": 7}


# -- the transform scenario -------------------------------------------------------------


def test_visible_at_is_the_first_sample_with_every_partition_at_its_end() -> None:
    samples = [
        (1.0, {0: 0, 1: 0}),
        (1.1, {0: 5, 1: 2}),
        (1.2, {0: 9, 1: 3}),  # partition 1 at its end, partition 0 not yet
        (1.3, {0: 10, 1: 3}),
        (1.4, {0: 10, 1: 3}),
    ]
    assert report.visible_at(samples, {0: 10, 1: 3}) == 1.3
    assert report.visible_at(samples, {0: 11, 1: 3}) is None
    # A partition missing from a sample (a failed poll) is not at its end.
    assert report.visible_at([(2.0, {0: 10})], {0: 10, 1: 3}) is None


def test_visibility_latency_is_seen_time_minus_append_time() -> None:
    append_ms = [1000, 1002, -1, 1010]
    values = report.visibility_latencies_ms(
        [0, 1, 2, 3, 7], [1.05, 1.05, 1.05, 1.2, 1.3], append_ms
    )
    # ref 2 has no append time and ref 7 is unknown: both left out.
    assert [round(v, 6) for v in values] == [50.0, 48.0, 190.0]


def test_transform_ratios_and_targets() -> None:
    ratios = report.transform_ratios({"spr": 120_000.0, "consume_produce": 200_000.0, "quix": None})
    assert ratios == {"spr_vs_consume_produce": 0.6, "spr_vs_quix": None}
    targets = report.transform_targets(ratios, {"peak_rss_mb": 230.0})
    assert [(t["value"], t["met"]) for t in targets] == [(0.6, True), (None, None), (230.0, False)]
    assert [t["target"] for t in targets] == [">= 0.5", ">= 3", "<= 200"]


def test_format_report_shows_the_transform_section() -> None:
    verified = {"ok": True}
    document = {
        "transform": {
            "workload": {"events": 1000, "entities": 10, "partitions": 3,
                         "shapes": {"order": "no sequence"}, "source_key": "entity id"},
            "latency": {"rate": 500.0, "seconds": 2.0, "measured": "append -> visible"},
            "contenders": {
                "consume_produce": {"status": "ok", "events_per_s": 400_000.0,
                                    "peak_rss_mb": 60.0, "verification": verified,
                                    "latency": {"status": "ok", "p50_ms": 8.0, "p99_ms": 30.0,
                                                "max_ms": 41.0}},
                "spr": {"status": "failed", "events_per_s": 150_000.0, "peak_rss_mb": 120.0,
                        "reason": "1 missing", "verification": {"ok": False}},
                "quix": {"status": "skipped", "reason": "--skip"},
            },
            "ratios": {"spr_vs_consume_produce": 0.375, "spr_vs_quix": None},
            "targets": report.transform_targets(
                {"spr_vs_consume_produce": 0.375, "spr_vs_quix": None}, {"peak_rss_mb": 120.0}
            ),
            "ok": False,
        },
        "ok": False,
    }  # fmt: skip
    text = report.format_report(document)
    lines = text.splitlines()
    assert lines[0].startswith("spr bench transform: 1,000 foreign-shaped events")
    row = next(line for line in lines if line.startswith("consume_produce"))
    assert row.split()[1:7] == ["ok", "400,000", "8", "30", "41", "60"]
    spr = next(line for line in lines if line.split()[:2] == ["spr", "failed"])
    assert spr.endswith("FAILED") and "└ 1 missing" in text
    assert "spr / consume_produce events/s: 0.38 (target >= 0.5: MISSED)" in text
    assert "spr / quix events/s: - (target >= 3: not measured)" in text
    assert "spr peak RSS MB: 120.00 (target <= 200: met)" in text
    assert text.rstrip().endswith("FAILED")


def test_bench_options_scenarios() -> None:
    options = BenchOptions(bootstrap="b", dsn="d", scenario="transform",
                           skip=frozenset({"ceilings"}))  # fmt: skip
    assert options.runs_transform and not options.runs_state
    assert options.skips("consume_produce") and not options.skips("quix")
    both = BenchOptions(bootstrap="b", dsn="d", scenario="all")
    assert both.runs_state and both.runs_transform
    assert both.runs_backlog and both.runs_live and both.runs_latency
    default = BenchOptions(bootstrap="b", dsn="d")
    assert default.scenario == "state"
    assert default.runs_backlog and default.runs_latency and not default.runs_live
    live = BenchOptions(bootstrap="b", dsn="d", scenario="live")
    assert live.runs_live and live.runs_state
    assert not (live.runs_backlog or live.runs_latency or live.runs_transform)
    latency = BenchOptions(bootstrap="b", dsn="d", scenario="latency")
    assert latency.runs_latency and not (latency.runs_backlog or latency.runs_live)
    backlog = BenchOptions(bootstrap="b", dsn="d", scenario="backlog")
    assert backlog.runs_backlog and not (backlog.runs_latency or backlog.runs_live)
    rate_only = BenchOptions(bootstrap="b", dsn="d", latency_only=True)
    assert rate_only.runs_latency and not (rate_only.runs_backlog or rate_only.runs_live)
    with pytest.raises(ConfigError, match="scenario"):
        BenchOptions(bootstrap="b", dsn="d", scenario="routing")


def test_foreign_events_decode_to_the_canonical_event_of_their_entity() -> None:
    from spr.bench.foreign import SHAPES, ForeignSpec, generate, ref_of
    from spr.decode import decode_event

    spec = ForeignSpec(count=400, entities=20, seed=3)
    events = list(generate(spec))
    assert events == list(generate(spec))  # deterministic
    sequences: dict[int, int] = {}
    for ref, (entity, key, value) in enumerate(events):
        assert key == f"{entity:08d}".encode()  # not spr's partition key
        assert ref_of(value) == ref and 150 <= len(value) <= 260
        event = decode_event(value, offset=10_000 + ref, timestamp_ms=0)
        entity_type, _, sequenced = SHAPES[entity % len(SHAPES)]
        assert (event.entity_type, event.entity_id) == (entity_type, f"{entity:08d}")
        if sequenced:
            # Each entity's own sequence counts up from 1 in the order it was produced.
            sequences[entity] = sequences.get(entity, 0) + 1
            assert event.sequence == sequences[entity]
        else:
            assert event.sequence == 10_000 + ref  # no sequence: the source offset
            assert event.event_id == f"{entity_type}:{entity:08d}:{10_000 + ref}"
    shapes = {value[:12] for _, _, value in events}
    assert len(shapes) == len(SHAPES)


def test_rss_growth_compares_the_minute_after_warm_up_with_the_last_minute() -> None:
    mb = 2**20
    # 10 minutes, one sample a second: from 50 to 60 MB over the first 4 minutes, then
    # flat at 60 MB with one 70 MB spike, and +1 MB over the last minute.
    series = [(float(t), (50 + min(t, 240) // 24) * mb) for t in range(0, 540)]
    series += [(float(t), 61 * mb) for t in range(540, 601)]
    series[400] = (400.0, 70 * mb)
    rss = report.rss_growth(series, warmup_s=300.0)
    assert rss["samples"] == 601 and rss["start_mb"] == 50.0 and rss["peak_mb"] == 70.0
    assert rss["at_warmup_mb"] == 60.0 and rss["end_mb"] == 61.0
    assert rss["growth_after_warmup_mb"] == 1.0 and rss["peak_after_warmup_mb"] == 10.0
    assert report.rss_growth([], warmup_s=300.0) == {"samples": 0}


def test_format_report_shows_the_soak() -> None:
    rss = {"start_mb": 50.0, "at_warmup_mb": 60.0, "end_mb": 61.0, "warmup_s": 300.0,
           "growth_after_warmup_mb": 1.0, "peak_mb": 70.0}  # fmt: skip
    document = {"soak": {"rate": 20000.0, "seconds": 600.0, "events": 12_000_000,
                         "status": "ok", "rss": rss}, "ok": True}  # fmt: skip
    text = report.format_report(document)
    assert "soak at 20,000 events/s for 10 min" in text
    assert "growth after warm-up 1.0 MB" in text and text.rstrip().endswith("PASSED")


def test_the_soak_is_its_own_scenario() -> None:
    soak = BenchOptions(bootstrap="b", dsn="d", scenario="soak", soak_seconds=60.0)
    assert soak.runs_soak and soak.runs_state
    assert not (soak.runs_backlog or soak.runs_live or soak.runs_latency)
    assert not BenchOptions(bootstrap="b", dsn="d", scenario="all").runs_soak
    with pytest.raises(ConfigError, match="soak"):
        BenchOptions(bootstrap="b", dsn="d", scenario="soak", soak_seconds=0)
