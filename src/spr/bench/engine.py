"""spr's engine as a bench contender: the real :class:`spr.engine.Engine`, unchanged.

Two thin instruments: a sink that records the wall time and offsets of each committed
flush (one list append per flush), and a consumer wrapper that notes the first message
and the first assignment. Everything else is the engine's own code path.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["TimedConsumer", "run_spr"]


class TimedConsumer:
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
    flush_record_step_s: float = 0.0,
    flush_connections: int | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Run the engine until the group has no lag; return flush records and stats.

    Every flush is recorded (its time and offsets: the latency is charged to the first
    commit that covers an event). ``flush_record_step_s`` > 0 keeps one record per step
    instead, each holding the newest offsets of its step, so that a long run (the soak)
    does not measure its own record: every flush is ~0.6 KB, 7,000 a minute at 20k/s.
    """
    from spr.config import BatchPolicy, EngineConfig, TableMapping
    from spr.engine import Engine
    from spr.memory import bound_malloc_retention
    from spr.sink.postgres import FlushResult, PostgresSink

    bound_malloc_retention()  # as spr run does (cli.options.run_until_stopped)

    flushes: list[tuple[float, dict[int, int]]] = []
    flush_busy: dict[int, float] = {}  # per flush connection (sink)
    step_started = [0.0]

    recording = threading.Lock()  # the flush lanes record from their own threads

    class RecordingSink(PostgresSink):
        def flush(self, batch: Any) -> FlushResult:
            started = time.perf_counter()
            result = super().flush(batch)
            ended = time.perf_counter()
            now = time.time()
            offsets = {p: o for (_, p), o in result.offsets.items()}
            with recording:
                flush_busy[id(self)] = flush_busy.get(id(self), 0.0) + ended - started
                if flushes and now - step_started[0] < flush_record_step_s:
                    flushes[-1] = (now, {**flushes[-1][1], **offsets})
                else:
                    flushes.append((now, offsets))
                    step_started[0] = now
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
        flush_connections=flush_connections,
    )
    recorder = Recorder()
    ready = Path(ready_file) if ready_file else None

    def consumer_factory(conf: dict[str, Any]) -> Any:
        from spr.kafka.clients import consumer

        return TimedConsumer(consumer(conf), recorder.first, ready)

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
        # The busiest connection's: the one every batch that is not split goes over.
        flush_busy_s=max(flush_busy.values(), default=0.0),
        batch=dict(batch or {}),
    )
