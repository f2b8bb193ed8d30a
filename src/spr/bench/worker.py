"""The process each bench contender runs in: ``python -m spr.bench.worker KIND ARGS OUT``.

Every contender gets a process of its own, so that its peak RSS (``ru_maxrss``, read by
the process itself when it is done) is its own and not the harness's. ``ARGS`` is a
JSON file of keyword arguments; ``OUT`` receives a JSON result with at least
``first_s`` (wall time of the first message received), ``timeline`` (see
:mod:`spr.bench.report`) and ``peak_rss_bytes``. A failure writes ``{"error": ...}`` and
exits 1.

``KIND`` ``spr`` runs the real :class:`spr.engine.Engine`, unchanged, with two thin
instruments: a sink that records the wall time and offsets of each committed flush
(one list append per flush), and a consumer wrapper that notes the first message and
the first assignment. Everything else is the engine's own code path.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Recorder", "main", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class Recorder:
    """Progress of one contender: first message time and a cumulative timeline."""

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.done = 0
        self.timeline: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def first(self) -> None:
        if self.first_s is None:
            self.first_s = time.time()

    def add(self, events: int) -> None:
        with self._lock:
            self.done += events
            self.timeline.append((time.time(), self.done))

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "first_s": self.first_s,
            "timeline": self.timeline,
            "events": self.done,
            **extra,
            "peak_rss_bytes": peak_rss_bytes(),
        }


# ------------------------------------------------------------------------------ spr


class _TimedConsumer:
    """Delegates to a confluent_kafka Consumer; notes the first message and assignment."""

    def __init__(self, consumer: Any, on_first: Callable[[], None], ready: Path | None) -> None:
        self._consumer = consumer
        self._on_first: Callable[[], None] | None = on_first
        self._ready = ready

    def consume(self, num_messages: int = 1, timeout: float = -1) -> Any:
        messages = self._consumer.consume(num_messages, timeout)
        if messages and self._on_first is not None:
            self._on_first()
            self._on_first = None
        return messages

    def subscribe(self, topics: list[str], **callbacks: Any) -> Any:
        on_assign = callbacks.get("on_assign")
        ready = self._ready
        if on_assign is not None and ready is not None:

            def assigned(consumer: Any, partitions: list[Any]) -> None:
                on_assign(consumer, partitions)
                if partitions:
                    ready.touch()

            callbacks["on_assign"] = assigned
        return self._consumer.subscribe(topics, **callbacks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def run_spr(
    *,
    topic: str,
    group: str,
    bootstrap: str,
    dsn: str,
    table: str,
    offsets_table: str,
    idle_exit_s: float = 1.0,
    batch: dict[str, int] | None = None,
    ready_file: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Run the engine until the group has no lag; return flush records and stats."""
    from spr.config import BatchPolicy, EngineConfig, TableMapping
    from spr.engine import Engine
    from spr.sink.postgres import FlushResult, PostgresSink

    flushes: list[tuple[float, dict[int, int]]] = []
    flush_busy = [0.0]

    class RecordingSink(PostgresSink):
        def flush(self, batch: Any) -> FlushResult:
            started = time.perf_counter()
            result = super().flush(batch)
            flush_busy[0] += time.perf_counter() - started
            flushes.append((time.time(), {p: o for (_, p), o in result.offsets.items()}))
            return result

    config = EngineConfig(
        group_id=group,
        topics=(topic,),
        bootstrap=bootstrap,
        dsn=dsn,
        mapping=TableMapping(table=table, offsets_table=offsets_table),
        batch=BatchPolicy(**batch) if batch else BatchPolicy(),
        auto_create_schema=True,
        idle_exit_s=idle_exit_s,
    )
    recorder = Recorder()
    ready = Path(ready_file) if ready_file else None

    def consumer_factory(conf: dict[str, Any]) -> Any:
        from confluent_kafka import Consumer

        return _TimedConsumer(Consumer(conf), recorder.first, ready)

    def sink_factory() -> PostgresSink:
        return RecordingSink.from_config(config)

    engine = Engine(config, consumer_factory=consumer_factory, sink_factory=sink_factory)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        engine.stop()

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    stats = engine.run()
    ended = time.time()
    return recorder.result(
        flushes=flushes,
        stats=stats.as_dict(),
        started_s=started,
        ended_s=ended,
        flush_busy_s=flush_busy[0],
        batch=dict(batch or {}),
    )


# ---------------------------------------------------------------------------- entry


def _runners() -> dict[str, Callable[..., dict[str, Any]]]:
    from spr.bench import antipattern, arroyo, ceilings

    return {
        "spr": run_spr,
        "raw": ceilings.run_raw_consume,
        "copy_merge": ceilings.run_copy_merge,
        "antipattern": antipattern.run,
        "arroyo": arroyo.run,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m spr.bench.worker KIND ARGS.json OUT.json", file=sys.stderr)
        return 2
    kind, args_path, out_path = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = Path(out_path)
    try:
        kwargs = json.loads(Path(args_path).read_text())
        result = _runners()[kind](**kwargs)
        code = 0
    except BaseException as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}", "peak_rss_bytes": peak_rss_bytes()}
        code = 1
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
