"""``spr bench --scenario transform``: spr's routing stage against the fastest Python
relay and Quix Streams' exactly-once mode (issue 14).

The workload (:mod:`spr.bench.foreign`) is what foreign producers write: four shapes of
field names, a quarter of the events without a sequence, keyed by the bare entity id
and partitioned by librdkafka's CRC32, so nothing is where spr wants it. It is produced
once; then each contender runs in a process of its own, one after the other, with its
own consumer group and its own output topic of the same partition count:

``consume_produce``
    the ceiling (:func:`spr.bench.relay.run_consume_produce`): consume, produce the same
    bytes with the same key, commit offsets asynchronously; no transactions, no decoding;
``spr``
    spr's :class:`~spr.transform.Transformer`, exactly once;
``quix``
    Quix Streams 3.28 with ``processing_guarantee="exactly-once"`` doing the same
    normalisation in its own venv (:mod:`spr.bench.quix_eos`).

Measurement rules, the same for every contender:

* **events/s** = events / (*visible* - *first*). *first* is the wall time the contender
  received its first source message (noted by the contender itself, so start-up and
  the group join are excluded). *visible* is the first moment at which every output
  record is visible to a ``read_committed`` consumer: the harness polls the output
  topic's ``read_committed`` end offsets (the last stable offset, ListOffsets with
  ``isolation_level=read_committed``) every 20 ms from before the contender starts, and
  *visible* is the time of the first answer in which every partition has reached the
  end offset it holds once the contender is done (the time the answer arrived: at most
  one poll interval late). For the non-transactional ceiling that is its last
  acknowledged record; for the others, the commit of their last transaction.
* **p99 latency** (and p50, max) comes from a separate steady-rate phase per contender:
  a fresh source topic with ``message.timestamp.type=LogAppendTime``, the contender
  started and its group stable with every partition assigned, a ``read_committed``
  observer process of its output started (:func:`spr.bench.relay.run_observe`), then
  ``--latency-rate`` events/s for ``--latency-seconds``. The latency of an event = the
  wall time the observer received it - the broker's append time of its source record
  (from the produce acknowledgement; 1 ms resolution).
* **peak RSS** = the contender process's own peak RSS (``VmHWM``, read by itself at
  exit: not ``ru_maxrss``, which a child inherits from the harness at exec), in
  the throughput phase; the harness also samples RSS every 0.2 s as a cross-check.

Correctness: every output is read back with ``read_committed``
(:func:`spr.bench.foreign.verify_output`): every source event exactly once, on
``partition_for(key, n)`` with spr's partition key (not checked for the ceiling, which
keeps the source key and placement), each entity in source order. spr's run fails on
any violation, in either phase; the others' violations are reported.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from spr.bench import report
from spr.bench.foreign import SHAPES, Expected, ForeignSpec, produce_foreign, verify_output
from spr.bench.workspace import Child, Workspace
from spr.errors import ServerUnavailable

__all__ = ["TRANSFORM_CONTENDERS", "VisibilityWatch", "run_transform_scenario"]

#: Contenders in the order they run and appear in the report.
TRANSFORM_CONTENDERS = ("consume_produce", "spr", "quix")

_NOTES = {
    "consume_produce": "ceiling: consume -> produce the same bytes and key, async offset "
    "commits; no transactions, no decoding",
    "spr": "spr transform: decode, re-key, partition_for, headers; one transaction per "
    "batch with the offsets",
}


class VisibilityWatch:
    """Polls the ``read_committed`` end offsets of ``topic`` every ``interval_s`` on a
    thread of its own; :meth:`finish` says when everything became visible."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, interval_s: float = 0.02):
        from confluent_kafka.admin import AdminClient

        self.topic = topic
        self.partitions = partitions
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="visibility", daemon=True)

    def _offsets(self, committed: bool) -> dict[int, int] | None:
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        level = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        request = {TopicPartition(self.topic, p): latest for p in range(self.partitions)}
        try:
            futures = self._admin.list_offsets(request, isolation_level=level, request_timeout=5)
            return {tp.partition: f.result(timeout=5).offset for tp, f in futures.items()}
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            offsets = self._offsets(committed=True)
            if offsets is not None:
                self.samples.append((time.time(), offsets))
            self._stop.wait(self.interval_s)

    def start(self) -> VisibilityWatch:
        self._thread.start()
        return self

    def finish(self, settle_s: float = 15.0) -> float | None:
        """Call once the contender is done: waits (at most ``settle_s``) until nothing is
        pending (the stable end offsets equal the end offsets), stops polling, and
        returns the time everything first became visible (None when it never did)."""
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            ends = self._offsets(committed=False)
            if ends is not None and self.samples:
                last = self.samples[-1][1]
                if all(last.get(p, 0) >= end for p, end in ends.items()):
                    break
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)
        if not self.samples:
            return None
        return report.visible_at(self.samples, self.samples[-1][1])


def _timeout(ws: Workspace, events: int) -> float:
    if ws.options.contender_timeout_s is not None:
        return ws.options.contender_timeout_s
    return 120.0 + events / 1_000.0


def _launch(
    ws: Workspace,
    name: str,
    label: str,
    *,
    source: str,
    output: str,
    total: int,
    quix_python: Any,
) -> tuple[Child, str]:
    """Start contender ``name``; returns its process and its consumer group."""
    import json

    options = ws.options
    group = ws.group(label)
    timeout = _timeout(ws, total)
    common = {"source": source, "output": output, "bootstrap": options.bootstrap,
              "group": group, "total": total, "timeout_s": timeout}  # fmt: skip
    if name == "consume_produce":
        return ws.launch("consume_produce", label, **common), group
    if name == "spr":
        dlq = ws.name(f"{label}_dlq")
        ws.topics.append(dlq)  # created by the transform, deleted at clean-up
        return ws.launch("transform", label, **common, partitions=options.partitions,
                         dlq_topic=dlq), group  # fmt: skip
    from spr.bench.quix_eos import SCRIPT

    script = ws.tmp / "quix_eos.py"
    script.write_text(SCRIPT)
    args = ws.tmp / f"{label}.args.json"
    state = ws.tmp / f"{label}.state"
    args.write_text(json.dumps({**common, "state_dir": str(state)}))
    out = ws.tmp / f"{label}.result.json"
    argv = [str(quix_python), str(script), str(args), str(out)]
    return Child(argv, out, ws.tmp / f"{label}.log"), group


def _entry(result: dict[str, Any], total: int, visible_s: float | None) -> dict[str, Any]:
    if "error" in result:
        entry: dict[str, Any] = {"status": "error", "reason": result["error"]}
        if result.get("log"):
            entry["log"] = result["log"]
        return entry
    first = result.get("first_s")
    entry = {
        "status": "ok",
        "events": total,
        "events_per_s": None,
        "seconds": None,
        "peak_rss_mb": round(result.get("peak_rss_bytes", 0) / 2**20, 1),
        "rss_sampled_mb": round(result.get("rss_sampled_bytes", 0) / 2**20, 1),
    }
    if first is None or visible_s is None:
        entry.update(status="error", reason="no message received or nothing became visible")
        return entry
    seconds = max(visible_s - first, 1e-6)
    entry["seconds"] = round(seconds, 3)
    rate = report.measured_rate(total, seconds)
    if rate is None:
        entry["too_short"] = True
        rate = total / seconds
    entry["events_per_s"] = round(rate, 1)
    return entry


def _placement(name: str, expected: Expected) -> tuple[list[bytes], list[int] | None]:
    """The keys and partitions ``name``'s output must have, per entity."""
    if name == "consume_produce":
        return expected.source_keys(), None
    return expected.spr_routing()


def _check_spr(entry: dict[str, Any], result: dict[str, Any], total: int) -> None:
    stats = result.get("stats") or {}
    entry["stats"] = stats
    if entry["status"] != "ok":
        return
    dropped = {k: stats.get(k, 0) for k in ("duplicate", "invalid", "unorderable", "aborts")}
    if stats.get("produced") != total or any(dropped.values()):
        entry["status"] = "failed"
        entry["reason"] = f"produced {stats.get('produced')} of {total:,}; {dropped}"


def _throughput(ws: Workspace, section: dict[str, Any], quix: tuple[Any, str]) -> None:
    options = ws.options
    source = ws.create_topic("transform_src")
    spec = ForeignSpec(count=options.events, entities=options.entities, seed=options.seed,
                       value_size=options.value_size)  # fmt: skip
    ws.progress(f"transform: producing {spec.count:,} foreign-shaped events to {source}")
    produced = produce_foreign(spec, topic=source, bootstrap=options.bootstrap,
                               partitions=options.partitions)  # fmt: skip
    if produced.errors:
        raise ServerUnavailable(
            f"{produced.errors:,} events could not be produced: {produced.first_error}"
        )
    expected = produced.expected
    total = len(expected)
    section["workload"] = {
        "topic": source,
        "events": total,
        "entities": options.entities,
        "partitions": options.partitions,
        "value_bytes": options.value_size,
        "shapes": {name: ("with sequence" if seq else "no sequence") for name, _, seq in SHAPES},
        "source_key": "entity id, librdkafka default partitioner (CRC32)",
        "produce_events_per_s": produced.events_per_s,
        "seed": options.seed,
    }
    contenders = section["contenders"]
    for name in TRANSFORM_CONTENDERS:
        if _skipped(ws, name, quix, contenders):
            continue
        ws.progress(f"transform: running {name}")
        output = ws.create_topic(f"transform_{name}_out")
        watch = VisibilityWatch(options.bootstrap, output, options.partitions).start()
        load = os.getloadavg()[0]
        child, _ = _launch(ws, name, f"transform_{name}", source=source, output=output,
                           total=total, quix_python=quix[0])  # fmt: skip
        result = child.wait(_timeout(ws, total) + 30)
        entry = _entry(result, total, watch.finish())
        # Other work on the machine skews every figure: the 1-minute load, before/after.
        entry["load_avg"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        entry["note"] = _NOTES.get(name) or (
            f"quixstreams {result.get('quixstreams', '?')} exactly-once, commit interval "
            f"{result.get('commit_interval_s', '?')} s; no validation, dedup or headers"
        )
        if name == "spr":
            _check_spr(entry, result, total)
        if "error" not in result:
            keys, placement = _placement(name, expected)
            check = verify_output(bootstrap=options.bootstrap, topic=output,
                                  partitions=options.partitions, expected=expected, keys=keys,
                                  placement=placement)  # fmt: skip
            entry["verification"] = check
            if not check["ok"] and entry["status"] == "ok":
                entry["status"] = "failed" if name == "spr" else "incorrect"
                entry["reason"] = _violations(check)
        ws.delete_topic(output)
        contenders[name] = entry
        _say(ws, name, entry)


def _skipped(ws: Workspace, name: str, quix: tuple[Any, str], into: dict[str, Any]) -> bool:
    if name != "spr" and ws.options.skips(name):
        into[name] = {"status": "skipped", "reason": "--skip"}
        return True
    if name == "quix" and quix[0] is None:
        into[name] = {"status": "skipped", "reason": quix[1]}
        return True
    return False


def _violations(check: dict[str, Any]) -> str:
    found = [
        f"{check[k]:,} {k.replace('_', ' ')}"
        for k in ("missing", "duplicated", "unexpected", "unreadable", "wrong_key",
                  "wrong_partition", "out_of_order")
        if check.get(k)
    ]  # fmt: skip
    if check.get("unread_partitions"):
        found.append(f"partitions {check['unread_partitions']} not read to the end")
    return ", ".join(found) or "verification failed"


def _say(ws: Workspace, name: str, entry: dict[str, Any]) -> None:
    text = f"transform: {name}: {entry['status']}"
    if entry.get("events_per_s"):
        text += f", {entry['events_per_s']:,.0f} events/s, peak RSS {entry['peak_rss_mb']} MB"
    if entry.get("reason"):
        text += f" ({entry['reason']})"
    ws.progress(text)


def _latency(ws: Workspace, section: dict[str, Any], quix: tuple[Any, str]) -> None:
    options = ws.options
    rate, seconds = options.latency_rate, options.latency_seconds
    count = max(1, int(rate * seconds))
    section["latency"] = {"rate": rate, "seconds": seconds, "events": count,
                          "measured": "broker append time of the source record -> "
                          "received by a read_committed reader of the output"}  # fmt: skip
    contenders = section["contenders"]
    for name in TRANSFORM_CONTENDERS:
        entry = contenders.get(name)
        if entry is None:  # the latency phase alone (--rate)
            if _skipped(ws, name, quix, contenders):
                continue
            entry = contenders[name] = {"status": "ok"}
        elif entry["status"] == "skipped":
            continue
        ws.progress(f"transform latency: {name} at {rate:,.0f} events/s for {seconds:g} s")
        latency = entry["latency"] = _latency_of(ws, name, count, quix[0])
        if latency["status"] != "ok" and entry["status"] == "ok":
            entry["status"] = "failed" if name == "spr" else latency["status"]
            entry["reason"] = f"latency phase: {latency.get('reason')}"


def _latency_of(ws: Workspace, name: str, count: int, quix_python: Any) -> dict[str, Any]:
    options = ws.options
    label = f"transform_latency_{name}"
    source = ws.create_topic(f"{label}_src", {"message.timestamp.type": "LogAppendTime"})
    output = ws.create_topic(f"{label}_out")
    ready = ws.tmp / f"{label}.observer.ready"
    observer = ws.launch("observe", f"{label}_observer", topic=output, bootstrap=options.bootstrap,
                         partitions=options.partitions, total=count, ready_file=str(ready),
                         timeout_s=options.latency_seconds + 120.0)  # fmt: skip
    child, group = _launch(ws, name, label, source=source, output=output, total=count,
                           quix_python=quix_python)  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ws.wait_assigned(group, source, 90.0):
        ws.progress(f"transform latency: {name} did not join its group within 90 s")
    spec = ForeignSpec(count=count, entities=options.entities, seed=options.seed + 1,
                       value_size=options.value_size)  # fmt: skip
    produced = produce_foreign(spec, topic=source, bootstrap=options.bootstrap,
                               partitions=options.partitions, rate=options.latency_rate,
                               append_times=True)  # fmt: skip
    result = child.wait(_timeout(ws, count) + 30)
    if "error" in result:
        observer.process.terminate()
    seen = observer.wait(options.latency_seconds + 150.0)
    check = None
    if "error" not in result:
        keys, placement = _placement(name, produced.expected)
        check = verify_output(bootstrap=options.bootstrap, topic=output,
                              partitions=options.partitions, expected=produced.expected,
                              keys=keys, placement=placement)  # fmt: skip
    ws.delete_topic(source)
    ws.delete_topic(output)
    if "error" in result or "error" in seen:
        failed = result if "error" in result else seen
        return {"status": "error", "reason": failed["error"], "log": failed.get("log", "")}
    assert produced.append_ms is not None and check is not None
    refs: list[int] = seen["refs"]
    values = report.visibility_latencies_ms(refs, seen["seen_s"], produced.append_ms)
    entry: dict[str, Any] = {
        "status": "ok",
        "achieved_rate": produced.events_per_s,
        **report.latency_summary(values),
        "peak_rss_mb": round(result.get("peak_rss_bytes", 0) / 2**20, 1),
        "verification": check,
    }
    # The observer saw each record once, as it became visible (a cross-check).
    distinct = len(set(refs))
    if not check["ok"] or distinct != count or len(refs) != count or seen.get("unreadable"):
        entry["status"] = "incorrect"
        entry["reason"] = _violations(check) if not check["ok"] else (
            f"the observer saw {distinct:,} distinct of {count:,} events in "
            f"{len(refs):,} records"
        )  # fmt: skip
    return entry


def run_transform_scenario(ws: Workspace) -> dict[str, Any]:
    """Run the transform scenario in ``ws``; returns its report section (``ok`` when
    spr's output verified in every phase that ran). Blocks for the whole scenario."""
    from spr.bench import quix

    options = ws.options
    section: dict[str, Any] = {"contenders": {}}
    wants_quix = not options.skips("quix")
    quix_env: tuple[Any, str] = (None, "--skip")
    if wants_quix:
        quix_env = quix.prepare(options.quix_build_timeout_s, ws.progress)
    contenders = section["contenders"]
    rates: dict[str, float | None] = {}
    if not options.latency_only:
        _throughput(ws, section, quix_env)
        # A rate counts when its run verified (a failure in the latency phase after it
        # does not change how fast it was) and was long enough to time.
        rates = {
            name: None if c.get("too_short") or c.get("status") != "ok" else c["events_per_s"]
            for name, c in contenders.items()
        }
    if options.latency_only or not options.skips("latency"):
        _latency(ws, section, quix_env)
    section["ratios"] = report.transform_ratios(rates)
    section["targets"] = report.transform_targets(section["ratios"], contenders.get("spr", {}))
    section["ok"] = contenders.get("spr", {}).get("status") == "ok"
    return section
