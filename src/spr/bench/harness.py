"""``spr bench``: produce once, run every contender on the same events, verify, report.

:func:`run_bench` blocks for the whole benchmark and returns the report document (the
``--json`` content). Each contender runs in a process of its own (``spr.bench.worker``,
or the Quix venv's python) with its own consumer group and its own fresh table, one
after the other, so that they never compete for the 2 cores. Everything the bench
creates (topics, tables, consumer groups, temporary files) is removed at the end,
unless ``keep`` is set. ``--scenario transform`` runs :mod:`spr.bench.transform`
(spr transform against its ceiling and Quix's exactly-once mode) in the same workspace,
into the document's ``transform`` section.

Measurement rules, the same for every contender:

* events/s = events / (time the last of them was durable - time the first was received):
  start-up and group joins are excluded, the final commit is included;
* peak RSS = the contender process's own peak (``VmHWM``, read by itself at exit; not
  ``ru_maxrss``, which a child inherits from the harness at exec); the
  harness also samples RSS every 0.2 s as a cross-check (``rss_sampled_mb``);
* latency (``--rate`` / the latency phase) = database commit time (wall clock, taken by
  spr's flush thread right after COMMIT returns) - broker timestamp of the event (the
  latency topic uses ``LogAppendTime``, so it is the broker's append time, 1 ms
  resolution), for every event, charged to the first commit whose offsets cover it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spr.bench import report
from spr.bench.options import (
    CONTENDERS,
    LIVE_CONTENDERS,
    LIVE_ONLY,
    SKIPPABLE,
    BenchOptions,
    Progress,
)
from spr.bench.verify import (
    Verification,
    compare,
    expected_from_topic,
    fetch_rows,
    stored_offsets,
)
from spr.bench.workspace import Child, Workspace, broker_timestamps, watermarks
from spr.config.engine import default_flush_connections
from spr.errors import ServerUnavailable

__all__ = ["CONTENDERS", "SKIPPABLE", "BenchOptions", "run_bench", "write_json"]


#: The database-only ceilings (spr.bench.ceilings), by contender name.
_MERGE_NOTES = {
    "copy_merge": "ceiling: spr's COPY -> merge flushes of {rows:,}-row batches, database time only",
    "plain_merge": "ceiling: the textbook merge (temp table per transaction, text COPY, "
    "DISTINCT ON) of {rows:,}-event batches, database time only",
}


def _judge(
    ws: Workspace,
    result: Mapping[str, Any],
    expected: Mapping[str, Any],
    table: str,
    total: int,
) -> dict[str, Any]:
    """Verify a finished contender's table against ``expected``, drop it, summarise."""
    verification = None
    if "error" not in result:
        verification = compare(expected, fetch_rows(ws.options.dsn, table))
    ws.drop_table(table)
    return _summarise(result, total, verification)


def _summarise(
    result: Mapping[str, Any],
    total: int,
    verification: Verification | None,
    timeline: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """The report entry of one contender from its worker result."""
    if "error" in result:
        entry: dict[str, Any] = {"status": "error", "reason": result["error"]}
        if result.get("log"):
            entry["log"] = result["log"]
        return entry
    timeline = timeline if timeline is not None else [(t, n) for t, n in result["timeline"]]
    first = result.get("first_s")
    rate = report.throughput(timeline, total, first)
    end = report.done_time(timeline, total)
    entry = {
        "status": "ok",
        "events": total,
        "events_per_s": None if rate is None else round(rate, 1),
        "seconds": None if end is None or first is None else round(end - first, 3),
        "peak_rss_mb": round(result.get("peak_rss_bytes", 0) / 2**20, 1),
        "rss_sampled_mb": round(result.get("rss_sampled_bytes", 0) / 2**20, 1),
    }
    if rate is None:
        entry["status"] = "error"
        entry["reason"] = f"only {timeline[-1][1] if timeline else 0:,} of {total:,} events done"
    elif end is not None and first is not None:
        units = report.units_within(timeline, first, total)
        if report.measured_rate(total, end - first, units) is None:
            # Kept in the document for reference; never printed as a throughput.
            entry["too_short"] = True
    if verification is not None:
        entry["verification"] = verification.as_dict()
        if entry["status"] == "ok" and not verification.ok:
            entry["status"] = "incorrect"
            entry["reason"] = (
                f"{verification.lost:,} lost, {verification.wrong:,} wrong, "
                f"{verification.duplicated:,} duplicated effects"
            )
    return entry


def _run_spr(
    ws: Workspace,
    topic: str,
    label: str,
    *,
    idle_exit_s: float,
    ready: bool = False,
    flush_record_step_s: float = 0.0,
) -> tuple[list[Child], str, str, list[Path]]:
    options = ws.options
    group = ws.group(label)
    table = ws.table(label)
    children = []
    ready_files = []
    for index in range(options.workers):
        ready_file = ws.tmp / f"{label}.{index}.ready"
        ready_files.append(ready_file)
        children.append(
            ws.launch(
                "spr",
                f"{label}.{index}",
                topic=topic,
                group=group,
                bootstrap=options.bootstrap,
                dsn=options.dsn,
                table=table,
                offsets_table=ws.offsets_table,
                idle_exit_s=idle_exit_s,
                batch=options.batch,
                ready_file=str(ready_file) if ready else None,
                flush_record_step_s=flush_record_step_s,
                flush_connections=options.flush_connections,
            )
        )
    return children, group, table, ready_files


def _collect_spr(
    ws: Workspace,
    children: list[Child],
    timeout_s: float,
    *,
    topic: str,
    low: Mapping[int, int],
    high: Mapping[int, int],
    group: str,
    table: str,
    expected: Mapping[str, Any],
) -> tuple[dict[str, Any], list[report.FlushRecord], list[tuple[float, int]], float | None]:
    """Wait for the spr workers; merge their flushes; verify table and offsets.
    Returns the report entry, the flush records, the merged timeline and the first
    message's time."""
    deadline = time.monotonic() + timeout_s
    results = [c.wait(max(1.0, deadline - time.monotonic())) for c in children]
    total = sum(high[p] - low[p] for p in high)
    errors = [r for r in results if "error" in r]
    if errors:
        return _summarise(errors[0], total, None), [], [], None
    records: list[report.FlushRecord] = [
        (t, {int(p): int(o) for p, o in offsets.items()})
        for r in results
        for t, offsets in r["flushes"]
    ]
    timeline = report.cumulative_from_flushes(records, low)
    firsts = [r["first_s"] for r in results if r.get("first_s") is not None]
    first_s = min(firsts) if firsts else None
    verification = compare(expected, fetch_rows(ws.options.dsn, table))
    merged = {
        "first_s": first_s,
        "timeline": timeline,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "rss_sampled_bytes": max(r["rss_sampled_bytes"] for r in results),
    }
    entry = _summarise(merged, total, verification, timeline)
    stats: dict[str, Any] = {}
    for r in results:
        for key, value in r["stats"].items():
            if isinstance(value, (int, float)) and not key.endswith(("_max", "_last")):
                stats[key] = stats.get(key, 0) + value
    stats["flush_seconds_max"] = max(r["stats"].get("flush_seconds_max", 0) for r in results)
    stats["flush_seconds_total"] = round(stats.get("flush_seconds_total", 0.0), 3)
    entry["stats"] = {
        k: stats[k]
        for k in ("consumed", "applied", "stale", "collapsed", "duplicate", "invalid",
                  "flushes", "flush_retries", "pauses", "rebalances", "max_buffered_bytes",
                  "flush_seconds_total", "flush_seconds_max")
        if k in stats
    }  # fmt: skip
    entry["dedup_hits"] = stats.get("duplicate", 0)
    entry["workers"] = len(results)
    entry["peak_rss_mb_total"] = round(sum(r["peak_rss_bytes"] for r in results) / 2**20, 1)
    busy = sum(r.get("flush_busy_s", 0.0) for r in results)
    if entry.get("seconds"):
        entry["flush_busy_pct"] = round(100.0 * busy / entry["seconds"] / len(results), 1)
    stored = stored_offsets(ws.options.dsn, ws.offsets_table, group, topic)
    behind = {p: high[p] - stored.get(p, low[p]) for p in high if stored.get(p, low[p]) != high[p]}
    entry["offsets_committed"] = not behind
    if behind and entry["status"] == "ok":
        entry["status"] = "failed"
        entry["reason"] = f"stored offsets differ from the end offsets: {behind}"
    if entry["status"] == "incorrect":
        entry["status"] = "failed"
    return entry, records, timeline, first_s


def _ensure_quix(ws: Workspace) -> tuple[Path | None, str]:
    from spr.bench import quix

    return quix.prepare(ws.options.quix_build_timeout_s, ws.progress)


def _run_quix(
    ws: Workspace, python: Path, topic: str, total: int, timeout_s: float
) -> tuple[dict[str, Any], str]:
    from psycopg.conninfo import conninfo_to_dict

    from spr.bench import quix

    params = conninfo_to_dict(ws.options.dsn)
    script = ws.tmp / "quix_contender.py"
    script.write_text(quix.SCRIPT)
    table = ws.table("quix")
    args = {
        "bootstrap": ws.options.bootstrap,
        "group": ws.group("quix"),
        "topic": topic,
        "table": table,
        "total": total,
        "timeout_s": timeout_s,
        "host": params.get("host", "127.0.0.1"),
        "port": int(str(params.get("port") or 5432)),
        "dbname": params.get("dbname", "postgres"),
        "user": params.get("user", "postgres"),
        "password": params.get("password", ""),
    }
    args_path = ws.tmp / "quix.args.json"
    args_path.write_text(json.dumps(args))
    out = ws.tmp / "quix.result.json"
    child = Child([str(python), str(script), str(args_path), str(out)], out, ws.tmp / "quix.log")
    return child.wait(timeout_s + 30), table


# ----------------------------------------------------------------------------- main


def _latency_phase(
    ws: Workspace, rate: float, seconds: float, *, soak: bool = False
) -> tuple[dict[str, Any], list[float], list[tuple[float, int]]]:
    """spr run while events are produced at a steady ``rate`` for ``seconds``.

    ``soak``: the long run, about memory over time: spr's RSS is kept once a second
    (``rss`` in the document, with its growth after the warm-up) and the per-event
    latencies, millions of them, are not computed.
    """
    from spr.dev.loadgen import LoadSpec, produce

    options = ws.options
    label = "soak" if soak else "latency"
    topic = ws.create_topic(label, {"message.timestamp.type": "LogAppendTime"})
    count = max(1, int(rate * seconds))
    # The soak keeps one flush record a second: it measures spr's memory, not its own.
    children, group, table, ready_files = _run_spr(
        ws, topic, label, idle_exit_s=3.0, ready=True, flush_record_step_s=1.0 if soak else 0.0
    )
    deadline = time.monotonic() + 60
    while not any(f.exists() for f in ready_files) and time.monotonic() < deadline:
        if all(c.process.poll() is not None for c in children):
            break
        time.sleep(0.05)
    ws.progress(f"{label}: producing {count:,} events at {rate:,.0f}/s while spr consumes")
    manifest = ws.tmp / f"{label}-manifest.json"
    spec = LoadSpec(
        count=count,
        entities=options.entities,
        seed=options.seed + 1,
        duplicates=options.duplicates,
        stale=options.stale,
        value_size=options.value_size,
    )
    produced = produce(
        spec,
        topic=topic,
        bootstrap=options.bootstrap,
        partitions=options.partitions,
        rate=rate,
        manifest_path=manifest,
    )
    expected = json.loads(manifest.read_text())["entities"]
    low, high = watermarks(options.bootstrap, topic, options.partitions)
    entry, records, timeline, _ = _collect_spr(
        ws,
        children,
        _timeout(options, count),
        topic=topic,
        low=low,
        high=high,
        group=group,
        table=table,
        expected=expected,
    )
    ws.drop_table(table)
    latencies: list[float] = []
    if records and not soak:
        stamps = broker_timestamps(options.bootstrap, topic, low, high)
        latencies = report.latencies_ms(records, stamps, low)
    summary = {} if soak else report.latency_summary(latencies)
    document = {
        "rate": rate,
        "achieved_rate": produced.events_per_s,
        "events": count,
        "status": entry["status"],
        **summary,
        "peak_rss_mb": entry.get("peak_rss_mb"),
        "flushes": entry.get("stats", {}).get("flushes"),
        "pauses": entry.get("stats", {}).get("pauses"),
        "verification": entry.get("verification"),
        "batch": options.batch or "engine defaults",
    }
    if entry.get("reason"):
        document["reason"] = entry["reason"]
    if soak:
        series = children[0].rss_series
        document["seconds"] = seconds
        document["rss"] = report.rss_growth(series, warmup_s=min(300.0, seconds / 6))
        document["rss_series_mb"] = [(t, round(b / 2**20, 2)) for t, b in series]
        return document, [], timeline
    if summary["count"] != count and entry["status"] == "ok":
        document["status"] = "failed"
        document["reason"] = f"latency known for {summary['count']:,} of {count:,} events"
    return document, latencies, timeline


def _timeout(options: BenchOptions, events: int) -> float:
    if options.contender_timeout_s is not None:
        return options.contender_timeout_s
    return 120.0 + events / 2_000.0


def run_bench(
    options: BenchOptions,
    *,
    progress: Progress | None = None,
    series: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the report document. Blocks for its whole duration.

    ``series``, when given, receives the timelines and latencies for :mod:`plot`.
    Raises :class:`ServerUnavailable` when Kafka or PostgreSQL cannot be reached.
    """
    say: Progress = progress or (lambda text: None)
    series = series if series is not None else {}
    ws = Workspace(options, say)
    started = time.time()
    document: dict[str, Any] = {
        "spr_version": _version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "options": {
            "workers": options.workers,
            "flush_connections": options.flush_connections or default_flush_connections(),
            "batch": options.batch or "engine defaults",
            "skip": sorted(options.skip),
            "scenario": options.scenario,
        },
    }
    try:
        if options.runs_backlog:
            _compare(ws, document, series)
        if options.runs_live:
            document["live"] = {}
            _compare(ws, document["live"], {}, live=True)
        if options.runs_soak:
            soak, _, _ = _latency_phase(ws, options.latency_rate, options.soak_seconds, soak=True)
            document["soak"] = soak
            series["soak_rss_mb"] = soak["rss_series_mb"]
        if options.runs_latency:
            latency, values, timeline = _latency_phase(
                ws, options.latency_rate, options.latency_seconds
            )
            document["latency"] = latency
            series["latency_ms"] = values
            series["latency_timeline"] = timeline
        if options.runs_transform:
            from spr.bench.transform import run_transform_scenario

            document["transform"] = run_transform_scenario(ws)
    finally:
        ws.cleanup()
    spr_ok = all(
        section["contenders"]["spr"]["status"] in ("ok", "skipped")
        for section in (document, document.get("live", {}))
        if "contenders" in section
    )
    latency_ok = all(
        document[name]["status"] == "ok" for name in ("latency", "soak") if name in document
    )
    transform_ok = "transform" not in document or document["transform"]["ok"]
    document["ok"] = spr_ok and latency_ok and transform_ok
    document["elapsed_s"] = round(time.time() - started, 1)
    return document


def _version() -> str:
    from spr._impl import IMPL
    from spr._version import __version__

    return f"{__version__} ({IMPL})"


def _compare(
    ws: Workspace, document: dict[str, Any], series: dict[str, Any], *, live: bool = False
) -> None:
    """Produce the workload once and run the contenders on it, into ``document``.

    ``live``: one event per entity, no duplicates, nothing stale, so that nothing
    collapses and the database writes a row per event (live traffic, not a backlog);
    only spr and its ceilings run.
    """
    from spr.dev.loadgen import LoadSpec, produce

    options = ws.options
    topic = ws.create_topic("live" if live else "events")
    spec = LoadSpec(
        count=options.events,
        entities=options.events if live else options.entities,
        seed=options.seed,
        duplicates=0.0 if live else options.duplicates,
        stale=0.0 if live else options.stale,
        value_size=options.value_size,
        one_per_entity=live,
    )
    manifest = ws.tmp / "manifest.json"
    ws.progress(f"producing {options.events:,} events to {topic}")
    produced = produce(
        spec,
        topic=topic,
        bootstrap=options.bootstrap,
        partitions=options.partitions,
        manifest_path=manifest,
    )
    if produced.errors:
        raise ServerUnavailable(
            f"{produced.errors:,} events could not be produced: {produced.first_error}"
        )
    expected = json.loads(manifest.read_text())["entities"]
    low, high = watermarks(options.bootstrap, topic, options.partitions)
    total = sum(high[p] - low[p] for p in high)
    document["workload"] = {
        "topic": topic,
        "events": total,
        "entities": spec.entities,
        "distinct_entities_touched": len(expected),
        "partitions": options.partitions,
        "value_bytes": options.value_size,
        "duplicates_sent": produced.duplicates,
        "stale_sent": produced.stale,
        "produce_events_per_s": produced.events_per_s,
        "seed": options.seed,
    }
    contenders: dict[str, dict[str, Any]] = {}
    document["contenders"] = contenders
    timelines: dict[str, tuple[float | None, list[tuple[float, int]]]] = {}
    series["timelines"] = timelines
    timeout = _timeout(options, total)
    common = {"topic": topic, "bootstrap": options.bootstrap, "dsn": options.dsn}
    start_offsets = {str(p): o for p, o in low.items()}

    def finish(name: str, entry: dict[str, Any], result: Mapping[str, Any] | None) -> None:
        contenders[name] = entry
        rate = entry.get("events_per_s")
        say = f"{name}: {entry['status']}"
        if entry.get("too_short"):
            say += f", {report.TOO_SHORT}"
        elif rate:
            say += f", {rate:,.0f} events/s"
        if entry.get("reason"):
            say += f" ({entry['reason']})"
        ws.progress(say)
        if result is not None and "timeline" in result:
            timelines[name] = (result.get("first_s"), [(t, n) for t, n in result["timeline"]])

    for name in CONTENDERS:
        if (live and name not in LIVE_CONTENDERS) or (not live and name in LIVE_ONLY):
            continue
        # Its own processes, group and table names: live runs in the same workspace.
        label = f"live_{name}" if live else name
        if options.skips(name):
            contenders[name] = {"status": "skipped", "reason": "--skip"}
            continue
        ws.progress(f"running {label}")
        if name == "raw_consume":
            result = ws.launch(
                "raw",
                label,
                **common,
                group=ws.group(label),
                total=total,
                start_offsets=start_offsets,
                timeout_s=timeout,
            ).wait(timeout + 30)
            entry = _summarise(result, total, None)
            entry["note"] = "ceiling: consumption only, no processing"
            finish(name, entry, result)
        elif name == "spr":
            children, group, table, _ = _run_spr(ws, topic, label, idle_exit_s=1.0)
            entry, _records, timeline, first_s = _collect_spr(
                ws, children, timeout + 30, topic=topic, low=low, high=high, group=group,
                table=table, expected=expected,
            )  # fmt: skip
            ws.drop_table(table)
            finish(name, entry, {"first_s": first_s, "timeline": timeline})
        elif name in _MERGE_NOTES:
            table = ws.create_state_table(label, textbook=name == "plain_merge")
            result = ws.launch(
                name, label, **common, group=ws.group(label), table=table,
                offsets_table=ws.offsets_table, total=total, start_offsets=start_offsets,
                max_rows=options.max_rows, timeout_s=timeout,
            ).wait(timeout + 30)  # fmt: skip
            entry = _judge(ws, result, expected, table, total)
            entry["note"] = _MERGE_NOTES[name].format(rows=options.max_rows)
            if "error" not in result:
                entry["flushes"] = result.get("flushes")
            finish(name, entry, result)
        elif name == "arroyo":
            table = ws.create_state_table(label)
            result = ws.launch(
                "arroyo", label, **common, group=ws.group(label), table=table, total=total,
                max_rows=options.max_rows, timeout_s=timeout,
            ).wait(timeout + 30)  # fmt: skip
            entry = _judge(ws, result, expected, table, total)
            entry["note"] = "at-least-once; speed reference"
            finish(name, entry, result)
        elif name == "quix":
            python, reason = _ensure_quix(ws)
            if python is None:
                finish(name, {"status": "skipped", "reason": reason}, None)
                continue
            result, table = _run_quix(ws, python, topic, total, timeout)
            entry = _judge(ws, result, expected, table, total)
            entry["note"] = (
                f"quixstreams {result.get('quixstreams', '?')} PostgreSQLSink, "
                "upsert on (entity_type, entity_id), default 5 s checkpoints"
            )
            finish(name, entry, result)
        elif name == "antipattern":
            table = ws.create_state_table(label)
            limit = min(options.antipattern_events, total)
            result = ws.launch(
                "antipattern", label, **common, group=ws.group(label), table=table, limit=limit,
                timeout_s=120.0 + limit / 100.0,
            ).wait(150.0 + limit / 100.0)  # fmt: skip
            verification = None
            if "error" not in result:
                stop = {int(p): int(o) for p, o in result["stop_offsets"].items()}
                prefix = expected_from_topic(options.bootstrap, topic, stop)
                verification = compare(prefix, fetch_rows(options.dsn, table))
            ws.drop_table(table)
            entry = _summarise(result, limit, verification)
            entry["note"] = (
                f"prefix of {limit:,} events; per message: INSERT ... ON CONFLICT + "
                "synchronous commit"
            )
            finish(name, entry, result)
    rates = {name: c.get("events_per_s") for name, c in contenders.items()}
    document["ratios"] = report.ratios(rates)


def write_json(document: Mapping[str, Any], path: Path) -> None:
    """Write the report document as indented JSON (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
