"""The transform's loop (what ``spr transform`` runs): consume -> submit -> poll.

:class:`Transformer` builds the consumer, the transactional producer, the dead-letter
writer (which writes through that producer, inside the transaction) and the output
topic, drives a :class:`TransformPipeline` until it is stopped, ``max_events`` messages
were taken or the group is idle and caught up, then commits what is open and closes.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

from spr.clock import Clock, SystemClock
from spr.config.transform import TransformConfig
from spr.errors import ConfigError, SprError
from spr.kafka import clients
from spr.kafka.admin import KafkaAdmin, unreachable
from spr.metrics import MetricsPublisher
from spr.transform.pipeline import TransformPipeline, TransformStats

__all__ = ["Transformer"]

log = logging.getLogger("spr.transform")

ClientFactory = Callable[[dict[str, Any]], Any]


class Transformer:
    """Runs one transform worker. :meth:`run` blocks and returns the final
    :class:`TransformStats`; it raises SprError (one sentence) when a server is missing,
    a setting is wrong, or the producer was fenced. ``consumer_factory`` and
    ``producer_factory`` are test seams. ``tracing`` (the extra ``spr[otel]``) continues
    the sampled input events' traces into their output records."""

    def __init__(
        self,
        config: TransformConfig,
        *,
        metrics: MetricsPublisher | None = None,
        clock: Clock | None = None,
        consumer_factory: ClientFactory | None = None,
        producer_factory: ClientFactory | None = None,
        tracing: bool = False,
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.metrics = metrics
        self.clock: Clock = clock or SystemClock()
        self._consumer_factory = consumer_factory or clients.consumer
        self._producer_factory = producer_factory or clients.producer
        self._stop = threading.Event()
        self.pipeline: TransformPipeline | None = None
        self._last_lag_check_s = 0.0

    def stop(self) -> None:
        """Ask :meth:`run` to finish: commit what is open and close. Never blocks."""
        self._stop.set()

    def stats(self) -> TransformStats:
        pipeline = self.pipeline
        if pipeline is None:
            return TransformStats()
        pipeline.stats.active_s = pipeline.active_s()
        return pipeline.stats

    def run(self) -> TransformStats:
        config = self.config
        admin = KafkaAdmin(config.consumer_config(), timeout_s=config.connect_timeout_s)
        admin.check_reachable()
        admin.partitions(config.topics)  # ConfigError naming a missing source topic
        partitions = self._output_partitions(admin)
        producer = self._producer_factory(config.producer_config())
        consumer = self._consumer_factory(config.consumer_config())
        dead_letters = None
        if config.dead_letters:
            from spr.dlq import DeadLetterWriter

            dead_letters = DeadLetterWriter(
                bootstrap=config.bootstrap,
                dlq_topic=config.dlq_topic,
                producer_config=config.producer_config(),
                group=config.group_id,
                source_topics=(*config.topics, config.output_topic),
                producer=producer,
            )
            for topic in config.topics:  # created before any transaction needs them
                dead_letters.ensure_topic(topic)
        pipeline = TransformPipeline(
            config,
            consumer,
            producer,
            dead_letters=dead_letters,
            output_partitions=partitions,
            clock=self.clock,
        )
        if self.tracing:
            from spr.tracing import require_otel

            require_otel()
            from spr.tracing.otel import TransformTracer

            pipeline.tracer = TransformTracer()
        self.pipeline = pipeline
        telemetry = self._telemetry(admin)
        # Every output record is a tuple and a list of headers, a few hundred thousand a
        # second: the collector's young-generation passes would keep walking the
        # long-lived heap built above (clients, tables, decoders). Freezing it keeps
        # them to what the loop allocates (measured: rekey 3.3 -> 1.0 us/event).
        gc.freeze()
        try:
            pipeline.open()
            consumer.subscribe(
                list(config.topics),
                on_assign=pipeline.on_assign,
                on_revoke=pipeline.on_revoke,
                on_lost=pipeline.on_lost,
            )
            pipeline.last_message_s = self.clock.monotonic()
            self._loop(consumer, pipeline, admin, telemetry)
            if not pipeline.join():
                pipeline.failure.raise_if_failed()
                raise SprError(
                    "the last transaction was aborted at shutdown; its input will be "
                    "transformed again by the next run"
                )
        except BaseException as exc:
            pipeline.failure.fail(exc)
            raise
        finally:
            if telemetry is not None:
                telemetry.publish(consumer, set(pipeline.assigned), {}, {})
            self._shutdown(consumer, producer, pipeline)
        return self.stats()

    def _loop(self, consumer: Any, pipeline: TransformPipeline, admin: KafkaAdmin,
              telemetry: Any) -> None:  # fmt: skip
        config = self.config
        timeout = config.consume_timeout_ms / 1000.0
        while not self._stop.is_set():
            messages = consumer.consume(config.consume_batch, timeout)
            if messages and config.max_events is not None:
                room = config.max_events - pipeline.stats.consumed
                messages = _truncate(messages, room)
            pipeline.submit(messages)
            if config.max_events is not None and pipeline.stats.consumed >= config.max_events:
                self._stop.set()
            pipeline.poll()
            if telemetry is not None:
                telemetry.tick(consumer, set(pipeline.assigned), dict, {})
            if config.idle_exit_s is not None and self._idle_and_caught_up(pipeline, admin):
                log.info("idle for %.1f s with no lag: exiting", config.idle_exit_s)
                self._stop.set()

    def _idle_and_caught_up(self, pipeline: TransformPipeline, admin: KafkaAdmin) -> bool:
        now = self.clock.monotonic()
        assert self.config.idle_exit_s is not None
        if now - pipeline.last_message_s < self.config.idle_exit_s or pipeline.busy:
            return False
        if now - self._last_lag_check_s < 1.0:
            return False
        self._last_lag_check_s = now
        try:
            keys = admin.partitions(self.config.topics)
            ends = admin.end_offsets(keys, committed_only=True)
            committed = admin.group_offsets(self.config.group_id)
            starts = admin.log_start_offsets(keys)
            if any(ends[k] > committed.get(k, starts[k]) for k in keys):
                return False
            return admin.group_settled(self.config.group_id, keys)
        except Exception as exc:  # a server hiccup only delays the exit
            log.debug("lag check failed: %s", exc)
            return False

    def _output_partitions(self, admin: KafkaAdmin) -> int:
        """The output topic's partition count: created with ``output_partitions`` (12 by
        default) when missing; when it exists, ``output_partitions`` must match it."""
        config = self.config
        count = admin.partition_count(config.output_topic)
        if count is not None:
            if config.output_partitions is not None and config.output_partitions != count:
                raise ConfigError(
                    f"--output-partitions is {config.output_partitions}, but {config.output_topic} "
                    f"has {count} partitions; events would be placed for the wrong count"
                )
            return count
        wanted = config.output_partitions or 12
        from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

        futures = admin.admin.create_topics(
            [NewTopic(config.output_topic, num_partitions=wanted, replication_factor=-1)],
            operation_timeout=config.connect_timeout_s,
        )
        try:
            futures[config.output_topic].result(timeout=config.connect_timeout_s + 5)
        except Exception as exc:
            error = exc.args[0] if exc.args else None
            if getattr(error, "name", lambda: "")() != "TOPIC_ALREADY_EXISTS":
                raise unreachable(config.bootstrap, exc) from exc
        return wanted

    def _telemetry(self, admin: KafkaAdmin) -> Any:
        if self.metrics is None:
            return None
        from spr.engine.telemetry import Telemetry

        return Telemetry(
            self.metrics,
            clock=self.clock,
            topics=self.config.topics,
            stats=self.stats,  # type: ignore[arg-type]
            admin=lambda: admin,
        )

    def _shutdown(self, consumer: Any, producer: Any, pipeline: TransformPipeline) -> None:
        try:
            consumer.close()  # its final revoke commits what is open, unless failed
        except Exception as exc:
            log.debug("consumer close failed: %s", exc)
        pipeline.close()
        try:
            producer.flush(5.0)
        except Exception as exc:
            log.debug("producer flush failed: %s", exc)


def _truncate(messages: list[Any], room: int) -> list[Any]:
    kept: list[Any] = []
    for message in messages:
        if message.error() is None:
            if room <= 0:
                break
            room -= 1
        kept.append(message)
    return kept
