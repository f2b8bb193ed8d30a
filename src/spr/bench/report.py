"""The arithmetic of ``spr bench``: throughput from progress timelines, latency from flush
records, percentiles, ratios, and the printed table. Pure functions; nothing blocks.

A *timeline* is a list of ``(wall_time_s, cumulative_events_done)`` points, written by a
contender whenever a unit of work became durable (a committed flush, a committed batch,
a consumed batch for the raw ceiling). Throughput is measured from the contender's first
received message to the moment its timeline reaches the expected total, so start-up and
the consumer-group join are excluded for every contender alike.

A rate timed over less than :data:`MIN_RATE_SPAN_S` or over fewer than
:data:`MIN_RATE_FLUSHES` durable units is start-up noise, not a throughput (2,000 events
read in one fetch would "run" at a hundred million events/s): :func:`measured_rate` says
None then, and the table prints "too short to measure" instead of a number.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spr.engine.telemetry import MIN_RATE_FLUSHES, MIN_RATE_SPAN_S, TOO_SHORT, measured_rate

__all__ = [
    "MIN_RATE_FLUSHES",
    "MIN_RATE_SPAN_S",
    "TOO_SHORT",
    "FlushRecord",
    "cumulative_from_flushes",
    "done_time",
    "format_report",
    "latencies_ms",
    "latency_summary",
    "measured_rate",
    "percentile",
    "rate_series",
    "ratios",
    "throughput",
    "transform_ratios",
    "transform_targets",
    "units_within",
    "visibility_latencies_ms",
    "visible_at",
]

# (commit wall time in s, {partition: next offset}) as written by the spr worker.
FlushRecord = tuple[float, Mapping[int, int]]


def units_within(timeline: Sequence[tuple[float, int]], first_s: float | None, total: int) -> int:
    """How many timeline points (durable units) fall between ``first_s`` and the point
    at which the timeline reached ``total``."""
    end = done_time(timeline, total)
    if end is None or first_s is None:
        return 0
    return sum(1 for t, _ in timeline if first_s <= t <= end)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, nearest-rank method
    (the smallest value with at least q% of the values at or below it). NaN when empty."""
    if not sorted_values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def done_time(timeline: Sequence[tuple[float, int]], total: int) -> float | None:
    """The first time at which the timeline reached ``total`` events, or None."""
    for t, done in timeline:
        if done >= total:
            return t
    return None


def throughput(
    timeline: Sequence[tuple[float, int]], total: int, first_s: float | None
) -> float | None:
    """Events per second from ``first_s`` (first message received) to the moment the
    timeline reached ``total``. None when it never did, or nothing was received."""
    end = done_time(timeline, total)
    if end is None or first_s is None or total <= 0:
        return None
    return total / max(end - first_s, 1e-6)


def cumulative_from_flushes(
    records: Iterable[FlushRecord], start_offsets: Mapping[int, int]
) -> list[tuple[float, int]]:
    """Merge flush records (of one or several workers) into a timeline: after each
    commit, the events done are the sum over partitions of the highest committed next
    offset minus the partition's start offset."""
    best: dict[int, int] = dict(start_offsets)
    base = sum(start_offsets.values())
    total = base
    timeline: list[tuple[float, int]] = []
    for t, offsets in sorted(records, key=lambda r: r[0]):
        for partition, next_offset in offsets.items():
            previous = best.get(partition, 0)
            if next_offset > previous:
                total += next_offset - previous
                best[partition] = next_offset
        timeline.append((t, total - base))
    return timeline


def latencies_ms(
    records: Iterable[FlushRecord],
    broker_ms: Mapping[int, Sequence[int]],
    start_offsets: Mapping[int, int],
) -> list[float]:
    """Broker timestamp to database commit, per event, in ms.

    ``broker_ms[p][i]`` is the broker timestamp of offset ``start_offsets[p] + i``. Each
    event is charged to the first commit whose offsets cover it; events never covered
    are left out (the caller compares the count with the total).
    """
    done: dict[int, int] = dict(start_offsets)
    result: list[float] = []
    for t, offsets in sorted(records, key=lambda r: r[0]):
        commit_ms = t * 1000.0
        for partition, next_offset in offsets.items():
            start = start_offsets.get(partition, 0)
            low = done.get(partition, start)
            if next_offset <= low:
                continue
            stamps = broker_ms.get(partition, ())
            for offset in range(low, next_offset):
                index = offset - start
                if 0 <= index < len(stamps):
                    result.append(commit_ms - stamps[index])
            done[partition] = next_offset
    return result


def latency_summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, p99.9 and max of latencies (ms, rounded to 0.1)."""
    ordered = sorted(values)
    if not ordered:
        return {k: None for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")} | {
            "count": 0
        }

    def r(value: float) -> float:
        return round(value, 1)

    return {
        "count": len(ordered),
        "mean_ms": r(sum(ordered) / len(ordered)),
        "p50_ms": r(percentile(ordered, 50)),
        "p90_ms": r(percentile(ordered, 90)),
        "p99_ms": r(percentile(ordered, 99)),
        "p999_ms": r(percentile(ordered, 99.9)),
        "max_ms": r(ordered[-1]),
    }


def rate_series(
    timeline: Sequence[tuple[float, int]], origin_s: float, bin_s: float = 0.5
) -> tuple[list[float], list[float]]:
    """Events/s per ``bin_s`` bin, from ``origin_s`` to the last point, by linear
    interpolation of the cumulative timeline. Returns (bin centres in s, rates)."""
    points = sorted(timeline)
    if not points or bin_s <= 0:
        return [], []
    points = [(origin_s, 0), *[(t, n) for t, n in points if t >= origin_s]]
    end = points[-1][0]

    def at(t: float) -> float:
        for (t0, n0), (t1, n1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return n0 if t1 == t0 else n0 + (n1 - n0) * (t - t0) / (t1 - t0)
        return float(points[-1][1]) if t > end else 0.0

    centres: list[float] = []
    rates: list[float] = []
    t = origin_s
    while t < end:
        upper = min(t + bin_s, end)
        width = upper - t
        if width > 1e-9:
            centres.append((t + upper) / 2 - origin_s)
            rates.append((at(upper) - at(t)) / width)
        t = upper
    return centres, rates


def ratios(rates: Mapping[str, float | None], reference: str = "spr") -> dict[str, float | None]:
    """``reference``'s events/s divided by every other contender's (None when unknown)."""
    mine = rates.get(reference)
    result: dict[str, float | None] = {}
    for name, rate in rates.items():
        if name == reference:
            continue
        result[name] = round(mine / rate, 3) if mine and rate else None
    return result


def visible_at(
    samples: Sequence[tuple[float, Mapping[int, int]]], final: Mapping[int, int]
) -> float | None:
    """The time of the first sample of ``read_committed`` end offsets in which every
    partition has reached ``final``; None when none did."""
    for t, offsets in samples:
        if all(offsets.get(p, 0) >= end for p, end in final.items()):
            return t
    return None


def visibility_latencies_ms(
    refs: Sequence[int], seen_s: Sequence[float], append_ms: Sequence[int]
) -> list[float]:
    """Per output record: the wall time it was seen (s) - its source record's broker
    append time (``append_ms[ref]``, ms), in ms. Refs without an append time (-1) or
    out of range are left out."""
    result: list[float] = []
    known = len(append_ms)
    for ref, seen in zip(refs, seen_s, strict=True):
        if 0 <= ref < known and append_ms[ref] >= 0:
            result.append(seen * 1000.0 - append_ms[ref])
    return result


#: The transform scenario's targets (issue 14): (name, compared, operator, bound).
TRANSFORM_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("spr / consume_produce events/s", "spr_vs_consume_produce", ">=", 0.5),
    ("spr / quix events/s", "spr_vs_quix", ">=", 3.0),
    ("spr peak RSS MB", "spr_peak_rss_mb", "<=", 200.0),
)


def rss_growth(series: Sequence[tuple[float, int]], *, warmup_s: float) -> dict[str, Any]:
    """What a soak's RSS samples (``(seconds, bytes)``, about one a second) say: MB at
    the start, at the end of the warm-up and at the end, the peak, and the growth after
    the warm-up (the median of the last minute minus the median of the minute that
    ends the warm-up, so that one sample's noise does not count)."""
    if not series:
        return {"samples": 0}

    def mb(value: float) -> float:
        return round(value / 2**20, 1)

    def median_of(lo: float, hi: float) -> float:
        values = sorted(b for t, b in series if lo <= t <= hi) or [
            min(series, key=lambda s: abs(s[0] - hi))[1]
        ]
        return float(values[len(values) // 2])

    end = series[-1][0]
    window = min(60.0, warmup_s, max(end - warmup_s, 0.0)) or 1.0
    at_warmup = median_of(warmup_s - window, warmup_s)
    at_end = median_of(end - window, end)
    after = [b for t, b in series if t >= warmup_s] or [series[-1][1]]
    return {
        "samples": len(series),
        "warmup_s": warmup_s,
        "start_mb": mb(series[0][1]),
        "at_warmup_mb": mb(at_warmup),
        "end_mb": mb(at_end),
        "peak_mb": mb(max(b for _, b in series)),
        "growth_after_warmup_mb": mb(at_end - at_warmup),
        "peak_after_warmup_mb": mb(max(after) - at_warmup),
    }


def transform_ratios(rates: Mapping[str, float | None]) -> dict[str, float | None]:
    """spr transform's events/s over the ceiling's and over Quix's."""
    mine = rates.get("spr")
    return {
        f"spr_vs_{name}": round(mine / rate, 3) if mine and rate else None
        for name in ("consume_produce", "quix")
        for rate in [rates.get(name)]
    }


def transform_targets(
    ratios: Mapping[str, float | None], spr: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Each target with its value and whether it was met (None: not measured)."""
    values = {**ratios, "spr_peak_rss_mb": spr.get("peak_rss_mb")}
    targets = []
    for name, key, op, bound in TRANSFORM_TARGETS:
        value = values.get(key)
        met = None if value is None else value >= bound if op == ">=" else value <= bound
        targets.append({"name": name, "value": value, "target": f"{op} {bound:g}", "met": met})
    return targets


def _transform_lines(section: Mapping[str, Any]) -> list[str]:
    workload = section.get("workload", {})
    latency = section.get("latency", {})
    lines = [""]
    if workload:
        lines.append(
            f"spr bench transform: {workload.get('events', 0):,} foreign-shaped events "
            f"({', '.join(workload.get('shapes', {}))}; keyed by {workload.get('source_key')}), "
            f"{workload.get('entities', 0):,} entities, {workload.get('partitions', 0)} partitions"
        )
    if latency:
        lines.append(
            f"latency at {latency.get('rate', 0):,.0f} events/s for {latency.get('seconds')} s: "
            f"{latency.get('measured')}"
        )
    lines += [
        "",
        f"{'contender':<17}{'status':<10}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'peak RSS MB':>13}  verification",
    ]
    for name, c in section.get("contenders", {}).items():
        rate = c.get("events_per_s")
        shown = "too short" if c.get("too_short") else "-" if rate is None else f"{rate:,.0f}"
        lat = c.get("latency") or {}
        check = c.get("verification")
        verdict = "-" if check is None else "ok" if check.get("ok") else "FAILED"
        if lat and lat.get("status") not in (None, "ok"):
            verdict += f"; latency phase {lat['status']}"

        def ms(key: str, lat: Mapping[str, Any] = lat) -> str:
            value = lat.get(key)
            return "-" if value is None else f"{value:,.0f}"

        lines.append(
            f"{name:<17}{c.get('status', '?'):<10}{shown:>11}{ms('p50_ms'):>9}{ms('p99_ms'):>9}"
            f"{ms('max_ms'):>9}{_mb(c.get('peak_rss_mb')):>13}  {verdict}"
        )
        if c.get("status") != "ok" and c.get("reason"):
            lines.append(f"{'':<17}└ {c['reason']}")
    targets = section.get("targets", [])
    if targets:
        lines.append("")
    for target in targets:
        value = target.get("value")
        met = target.get("met")
        verdict = "not measured" if met is None else "met" if met else "MISSED"
        shown = "-" if value is None else f"{value:,.2f}"
        lines.append(f"{target['name']}: {shown} (target {target['target']}: {verdict})")
    return lines


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _state_lines(section: Mapping[str, Any], title: str = "spr bench") -> list[str]:
    """The contenders table of one state scenario (``backlog`` at the document's top,
    ``live`` under ``"live"``), with spr's counters and rows written per event."""
    workload = section.get("workload", {})
    if not workload:
        lines: list[str] = []
    else:
        lines = [
            f"{title}: {workload.get('events', 0):,} events, {workload.get('entities', 0):,} "
            f"entities, {workload.get('partitions', 0)} partitions "
            f"({workload.get('duplicates_sent', 0):,} duplicates, "
            f"{workload.get('stale_sent', 0):,} stale)",
            "",
            f"{'contender':<14}{'status':<10}{'events':>11}{'events/s':>12}{'spr x':>9}"
            f"{'peak RSS MB':>13}  verification",
        ]
    contenders = section.get("contenders", {})
    ratio_map = section.get("ratios", {})
    too_short = [name for name, c in contenders.items() if c.get("too_short")]
    spr_too_short = bool(contenders.get("spr", {}).get("too_short"))
    for name, c in contenders.items():
        rate = c.get("events_per_s")
        ratio = None if c.get("too_short") or spr_too_short else ratio_map.get(name)
        shown = "too short" if c.get("too_short") else "-" if rate is None else f"{rate:,.0f}"
        check = c.get("verification")
        if check is None:
            verdict = "-"
        else:
            verdict = (
                "ok"
                if check.get("ok")
                else f"lost {check['lost']:,} wrong {check['wrong']:,} "
                f"duplicated {check['duplicated']:,}"
            )
        status = c.get("status", "?")
        lines.append(
            f"{name:<14}{status:<10}{c.get('events') or 0:>11,}"
            f"{shown:>12}"
            f"{'' if ratio is None else f'{ratio:,.2f}':>9}"
            f"{_mb(c.get('peak_rss_mb')):>13}  {verdict}"
        )
        if status not in ("ok",) and c.get("reason"):
            lines.append(f"{'':<14}└ {c['reason']}")
    if too_short:
        lines += [
            "",
            f"{TOO_SHORT}: {', '.join(too_short)} (a rate needs at least "
            f"{MIN_RATE_SPAN_S:g} s and {MIN_RATE_FLUSHES} commits; give more --events)",
        ]
    spr = contenders.get("spr", {})
    stats = spr.get("stats") or {}
    if stats:
        lines += [
            "",
            f"spr: {stats.get('flushes', 0):,} flushes, {stats.get('pauses', 0):,} pauses, "
            f"{stats.get('duplicate', 0):,} dedup hits, {stats.get('stale', 0):,} stale "
            f"(guard), {stats.get('collapsed', 0):,} collapsed, "
            f"{stats.get('applied', 0):,} rows applied; busiest flush connection busy "
            f"{spr.get('flush_busy_pct', 0)}% of the run",
        ]
        consumed = stats.get("consumed") or 0
        if consumed:
            rows = (stats.get("applied") or 0) + (stats.get("stale") or 0)
            lines.append(
                f"rows merged per event consumed: {rows / consumed:.2f} (the collapse: "
                "what the database writes is what sets the rate)"
            )
    return lines


def format_report(document: Mapping[str, Any]) -> str:
    """The human-readable table of a bench document (the ``--json`` content)."""
    lines = _state_lines(document)
    live = document.get("live")
    if live:
        lines += ([""] if lines else []) + _state_lines(
            live, "live (one event per entity, nothing to collapse)"
        )
    latency = document.get("latency")
    if latency:
        lines += [
            "",
            f"latency at {latency.get('rate', 0):,.0f} events/s "
            f"({latency.get('events', 0):,} events, broker timestamp -> database commit): "
            f"p50 {latency.get('p50_ms')} ms, p90 {latency.get('p90_ms')} ms, "
            f"p99 {latency.get('p99_ms')} ms, p99.9 {latency.get('p999_ms')} ms, "
            f"max {latency.get('max_ms')} ms"
            + ("" if latency.get("verification", {}).get("ok", True) else "  VERIFICATION FAILED"),
        ]
    soak = document.get("soak")
    if soak:
        rss = soak.get("rss", {})
        lines += [
            "",
            f"soak at {soak.get('rate', 0):,.0f} events/s for {soak.get('seconds', 0) / 60:g} min "
            f"({soak.get('events', 0):,} events, {soak.get('status')}): RSS "
            f"{rss.get('start_mb')} MB at start, {rss.get('at_warmup_mb')} MB after "
            f"{rss.get('warmup_s', 0):g} s, {rss.get('end_mb')} MB at the end (growth after "
            f"warm-up {rss.get('growth_after_warmup_mb')} MB, peak {rss.get('peak_mb')} MB)",
        ]
    transform = document.get("transform")
    if transform:
        lines += _transform_lines(transform)[0 if lines else 1 :]
    lines += ["", "PASSED" if document.get("ok") else "FAILED"]
    return "\n".join(lines)
