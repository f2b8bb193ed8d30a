"""The transform scenario's processes (``spr.bench.worker`` kinds), each in a process of
its own so that its peak RSS is its own.

``consume_produce``
    The ceiling: the fastest a Python process can move the source events to an output
    topic. A plain confluent-kafka loop: ``consume()`` a batch (spr's consumer settings
    and batch size), ``produce()`` every message's own bytes with its own key (spr's
    producer settings, without a transactional id), ``commit(asynchronous=True)`` the
    consumed offsets after each batch. No transactions, no decoding, no headers.
``transform``
    spr's routing stage, the real :class:`spr.transform.Transformer` through its public
    API (exactly once, one Kafka transaction per batch), with one instrument: a consumer
    wrapper noting when the first message arrived.
``observe``
    A ``read_committed`` reader of an output topic for the latency phase: partitions
    assigned directly at the beginning, ``fetch.wait.max.ms=10``, and for every record
    the wall time of the ``consume()`` return that delivered it, i.e. when it had become
    visible to a ``read_committed`` consumer (at most ~10 ms late).

Every runner returns ``first_s`` (wall time of the first source message received) and
``peak_rss_bytes`` (:mod:`spr.bench.recorder`); setting ``SPR_BENCH_PROFILE=DIR`` in
the environment makes ``transform`` and ``consume_produce`` write a cProfile of their
run to ``DIR/<kind>.pstats``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from spr.bench.recorder import Recorder

__all__ = ["run_consume_produce", "run_observe", "run_transform"]


@contextlib.contextmanager
def _profiled(kind: str) -> Iterator[None]:
    folder = os.environ.get("SPR_BENCH_PROFILE")
    if not folder:
        yield
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        Path(folder).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(str(Path(folder) / f"{kind}.pstats"))


def _on_stop(stop: Callable[[], None], timeout_s: float) -> threading.Timer:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    return timer


def run_consume_produce(
    *,
    source: str,
    output: str,
    bootstrap: str,
    group: str,
    total: int,
    timeout_s: float = 600.0,
    **_: Any,
) -> dict[str, Any]:
    """Move ``total`` messages from ``source`` to ``output``; blocks at most ``timeout_s``."""
    from confluent_kafka import KafkaException

    from spr.config.transform import PRODUCER_TRANSACTION_DEFAULTS, TransformConfig
    from spr.kafka import clients

    config = TransformConfig(group_id=group, topics=(source,), output_topic=output,
                             bootstrap=bootstrap)  # fmt: skip
    conf = config.consumer_config()
    # commit() without offsets commits what the consumer handed over.
    conf["enable.auto.offset.store"] = "true"
    conf["enable.partition.eof"] = "false"
    consumer = clients.consumer(conf)
    producer = clients.producer({**PRODUCER_TRANSACTION_DEFAULTS, "bootstrap.servers": bootstrap})
    recorder = Recorder()
    stopped = threading.Event()
    timer = _on_stop(stopped.set, timeout_s)
    moved = 0
    batch, wait = config.consume_batch, config.consume_timeout_ms / 1000.0
    consumer.subscribe([source])
    try:
        with _profiled("consume_produce"):
            produce, poll, consume, commit = (producer.produce, producer.poll, consumer.consume,
                                              consumer.commit)  # fmt: skip
            while moved < total and not stopped.is_set():
                messages = consume(batch, wait)
                if not messages:
                    continue
                recorder.first()
                for m in messages:
                    if m.error() is not None:
                        continue
                    while True:
                        try:
                            produce(output, m.value(), m.key())
                            break
                        except BufferError:  # the local queue is full: wait for acks
                            poll(0.05)
                    moved += 1
                poll(0)
                with contextlib.suppress(KafkaException):
                    commit(asynchronous=True)
            left = producer.flush(30.0)
        with contextlib.suppress(KafkaException):
            consumer.commit(asynchronous=False)
    finally:
        timer.cancel()
        consumer.close()
    if left:
        raise RuntimeError(f"{left} records were not delivered to {output}")
    if moved < total:
        raise RuntimeError(f"moved {moved:,} of {total:,} messages before the timeout")
    recorder.done = moved
    return recorder.result()


def run_transform(
    *,
    source: str,
    output: str,
    bootstrap: str,
    group: str,
    partitions: int,
    total: int,
    dlq_topic: str,
    timeout_s: float = 600.0,
    **_: Any,
) -> dict[str, Any]:
    """Run spr's Transformer until it has taken ``total`` messages (or the group is idle
    with no lag); return its counters."""
    from spr.bench.engine import TimedConsumer
    from spr.config.transform import TransformConfig
    from spr.kafka import clients
    from spr.memory import bound_malloc_retention
    from spr.transform import Transformer

    bound_malloc_retention()  # as spr transform does (cli.options.run_until_stopped)

    config = TransformConfig(
        group_id=group,
        topics=(source,),
        output_topic=output,
        output_partitions=partitions,
        bootstrap=bootstrap,
        dlq_topic=dlq_topic,
        idle_exit_s=5.0,
        max_events=total,
    )
    recorder = Recorder()

    def consumer_factory(conf: dict[str, Any]) -> Any:
        return TimedConsumer(clients.consumer(conf), recorder.first, None)

    transformer = Transformer(config, consumer_factory=consumer_factory)
    timer = _on_stop(transformer.stop, timeout_s)
    started = time.time()
    try:
        with _profiled("transform"):
            stats = transformer.run()
    finally:
        timer.cancel()
    counters = {k: v for k, v in stats.as_dict().items()
                if k in ("consumed", "produced", "duplicate", "invalid", "unorderable",
                         "transactions", "aborts", "rebalances", "kafka_errors")}  # fmt: skip
    recorder.done = stats.produced
    return recorder.result(stats=counters, started_s=started, ended_s=time.time())


def run_observe(
    *,
    topic: str,
    bootstrap: str,
    partitions: int,
    total: int,
    ready_file: str,
    timeout_s: float = 600.0,
    **_: Any,
) -> dict[str, Any]:
    """Read ``topic`` with read_committed until ``total`` records were seen (or
    ``timeout_s``); return every record's source ref and when it was seen."""
    from confluent_kafka import Consumer, TopicPartition

    from spr.bench.foreign import ref_of

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "spr-bench-observer",
         "isolation.level": "read_committed", "enable.auto.commit": False,
         "fetch.wait.max.ms": 10, "fetch.queue.backoff.ms": 1, "log_level": 0}
    )  # fmt: skip
    consumer.assign([TopicPartition(topic, p, -2) for p in range(partitions)])
    refs: list[int] = []
    seen_s: list[float] = []
    unreadable = 0
    deadline = time.monotonic() + timeout_s
    ready: Path | None = Path(ready_file)
    try:
        while len(refs) + unreadable < total and time.monotonic() < deadline:
            messages = consumer.consume(10_000, 0.002)
            now = time.time()
            if ready is not None:  # the fetchers are running from here on
                ready.touch()
                ready = None
            for m in messages:
                if m.error() is not None:
                    continue
                ref = ref_of(m.value())
                if ref is None:
                    unreadable += 1
                    continue
                refs.append(ref)
                seen_s.append(now)
    finally:
        consumer.close()
    recorder = Recorder()
    return recorder.result(refs=refs, seen_s=seen_s, unreadable=unreadable)
