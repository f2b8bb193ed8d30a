"""The engine: a short loop that drives a :class:`StatePipeline` (what ``spr run`` runs).

Each turn of the loop: ``consume()`` -> :meth:`StatePipeline.submit` ->
:meth:`StatePipeline.poll` -> backpressure (:mod:`spr.engine.pausing`) -> telemetry ->
the idle check. The rebalance callbacks only orchestrate: the pipeline moves the
positions and the work, pausing states each new partition's pause flag. The loop adds
what a process needs around the pipeline: starting and stopping, ``max_events`` and
``idle_exit_s``, pausing and metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from spr.clock import Clock, SystemClock
from spr.config import EngineConfig
from spr.decode import DEFAULT_LIMITS, DecodeLimits
from spr.engine.deadletters import DeadLetterSink
from spr.engine.failures import FlushFailed
from spr.engine.pausing import Backpressure, Pausing
from spr.engine.pipeline import AdminFactory, SinkFactory, StatePipeline
from spr.engine.stalls import StallWatch
from spr.engine.telemetry import EngineStats, Telemetry
from spr.errors import ConfigError
from spr.kafka import clients
from spr.kafka.admin import unreachable
from spr.metrics import MetricsPublisher
from spr.retry import CircuitState
from spr.tracing import TraceLinks, TracingOptions, require_otel

__all__ = ["Engine"]

log = logging.getLogger("spr.engine")

ConsumerFactory = Callable[[dict[str, Any]], Any]


class Engine:
    """Consumes ``config.topics`` as ``config.group_id`` into PostgreSQL, exactly once.

    :meth:`run` blocks until :meth:`stop` is called (from any thread or a signal
    handler), ``max_events`` messages were consumed, or ``idle_exit_s`` passed with the
    group caught up; it then flushes, commits and closes, and returns the final stats.
    It raises :class:`SprError` (one-sentence message) when a server is missing at
    start, the schema does not fit, or a flush fails for good; nothing is committed
    past an event that was not durably handled in any of these cases.

    Failures are classified once (:func:`spr.classify.classify`, design §6): a TRANSIENT
    flush failure is retried with backoff and full jitter (``config.retry_policy``)
    while the loop keeps polling with every partition paused, and feeds a
    :class:`~spr.retry.CircuitBreaker` that, once open, holds the partitions paused and
    lets one probe flush through per cool-down; rows the database rejects (DATA) are
    isolated and dead-lettered; anything else stops the engine.

    ``consumer_factory``, ``sink_factory`` and ``admin_factory`` exist for tests
    (fakes); ``dead_letters`` receives invalid messages and rejected rows (see
    :class:`~spr.engine.deadletters.DeadLetterSink`); without it they are only counted,
    and a rejected row stops the engine. ``metrics`` gets the engine's counters about
    once a second (and once more on shutdown). ``tracing`` (needs the extra
    ``spr[otel]``) makes an "apply batch" span per flush with the global OpenTelemetry
    tracer provider, linked to the sampled events it carries (:mod:`spr.tracing`).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        consumer_factory: ConsumerFactory | None = None,
        sink_factory: SinkFactory | None = None,
        clock: Clock | None = None,
        dead_letters: DeadLetterSink | None = None,
        decode_limits: DecodeLimits = DEFAULT_LIMITS,
        metrics: MetricsPublisher | None = None,
        admin_factory: AdminFactory | None = None,
        tracing: TracingOptions | None = None,
    ) -> None:
        self.config = config
        self._tracing = tracing
        self.clock: Clock = clock or SystemClock()
        self._consumer_factory = consumer_factory or clients.consumer
        self._sink_factory = sink_factory
        self._admin_factory = admin_factory
        self._dead_letters = dead_letters
        self._limits = decode_limits
        self._metrics = metrics
        self._stop = threading.Event()
        self.backpressure = Backpressure(config.backpressure, self.clock)
        self.pipeline: StatePipeline | None = None
        self.pausing: Pausing | None = None
        self.telemetry: Telemetry | None = None
        self.stalls: StallWatch | None = None
        self._consumer: Any = None
        self._max_buffered_bytes = 0
        self._last_commit_s: float | None = None
        self._last_lag_check_s = 0.0

    # -- public -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish: stop fetching, flush, commit, close. Never blocks."""
        self._stop.set()

    @property
    def circuit_state(self) -> CircuitState:
        """The flush circuit breaker's state."""
        pipeline = self.pipeline
        return CircuitState.CLOSED if pipeline is None else pipeline.flushing.breaker.state

    def stats(self) -> EngineStats:
        """A consistent-enough snapshot of the counters (read without locking)."""
        pipeline, pausing = self.pipeline, self.pausing
        if pipeline is None or pausing is None:
            return EngineStats()
        intake, flushing = pipeline.intake, pipeline.flushing
        positions = pipeline.positions if pipeline.opened else None
        return EngineStats(
            consumed=intake.consumed,
            duplicate=intake.duplicate,
            invalid=pipeline.dead_letters.invalid,
            applied=flushing.applied,
            stale=flushing.stale,
            collapsed=flushing.collapsed,
            rejected=flushing.rejected,
            flushes=flushing.flushes,
            flush_retries=flushing.flush_retries,
            flush_seconds_total=flushing.flush_seconds_total,
            flush_seconds_max=flushing.flush_seconds_max,
            flush_seconds_last=flushing.flush_seconds_last,
            circuit_state=int(flushing.breaker.state),
            circuit_opens=flushing.circuit_opens,
            pauses=pausing.pauses,
            resumes=pausing.resumes,
            paused_partitions=len(pausing.paused),
            rebalances=pipeline.rebalances,
            assigned_partitions=0 if positions is None else len(positions.assigned),
            partitions_revoked=pipeline.partitions_revoked,
            partitions_lost=pipeline.partitions_lost,
            rollbacks=pipeline.rollbacks,
            kafka_errors=pipeline.kafka_errors,
            offset_gaps=0 if positions is None else positions.offset_gaps,
            offset_gap_events=0 if positions is None else positions.offset_gap_events,
            buffered_bytes=pipeline.buffered_bytes,
            max_buffered_bytes=self._max_buffered_bytes,
            stalled_partitions=0 if self.stalls is None else self.stalls.stalled,
            stall_recoveries=0 if self.stalls is None else self.stalls.recoveries,
            misrouted=sum(intake.misrouted.values()),
            misrouted_dead_lettered=pipeline.dead_letters.misrouted,
            active_s=self._active_s(),
        )

    def _active_s(self) -> float | None:
        assert self.pipeline is not None
        first, last = self.pipeline.intake.first_message_s, self._last_commit_s
        return None if first is None or last is None or last < first else last - first

    def run(self) -> EngineStats:
        """Consume until stopped; see the class docstring. Blocks; raises SprError."""
        config = self.config
        consumer = self._consumer_factory(StatePipeline.consumer_config(config))
        self._consumer = consumer
        pipeline = StatePipeline(
            config,
            consumer,
            dead_letters=self._dead_letters,
            clock=self.clock,
            decode_limits=self._limits,
            sink_factory=self._sink_factory,
            admin_factory=self._admin_factory,
            sample_latency=self._metrics is not None,
        )
        self.pipeline = pipeline
        self.pausing = Pausing(consumer, config.topics[0])
        telemetry = Telemetry(
            self._metrics,
            clock=self.clock,
            topics=config.topics,
            stats=self.stats,
            admin=lambda: pipeline.positions.admin,
        )
        self.telemetry = telemetry
        self.stalls = StallWatch(
            config.stall_after_s,
            watermarks=lambda keys: pipeline.positions.admin.watermarks(keys),
        )
        if self._tracing is not None:
            self._trace(pipeline, self._tracing)
        pipeline.flush_listeners.append(self._flushed)
        pipeline.on_reassigned = self._reassigned
        try:
            pipeline.open()
            self._probe_topics()
            consumer.subscribe(
                list(config.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            # Idle is measured from the start: a topic still empty is not "done" yet.
            pipeline.intake.last_message_s = self.clock.monotonic()
            self._loop()
            budget = config.flush_retry_s + 10.0
            if not pipeline.failure.failed and not pipeline.join(budget):
                pipeline.failure.fail(
                    FlushFailed(
                        f"the last flush did not finish within {budget:g} s at shutdown; "
                        "nothing more was committed"
                    )
                )
            pipeline.failure.raise_if_failed()
            pipeline.positions.commit_kafka(sync=True)
        except BaseException as exc:
            # Whatever stopped the engine, nothing more is flushed or committed: the
            # final revoke in close() must not commit offsets past events that were
            # never dead-lettered (design §6: fatal means nothing committed).
            pipeline.failure.fail(exc)
            raise
        finally:
            self._publish_metrics()
            self._shutdown()
        return self.stats()

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        config = self.config
        consumer = self._consumer
        pipeline = self.pipeline
        pausing = self.pausing
        assert pipeline is not None and pausing is not None
        intake, flushing = pipeline.intake, pipeline.flushing
        timeout = config.consume_timeout_ms / 1000.0
        while not self._stop.is_set():
            if flushing.busy and intake.messages and not pausing.paused:
                # A batch is waiting, and it can only go when the flush in flight has
                # committed: take what Kafka already holds (decoding overlaps the
                # flush, as at full speed), else wait on the flush itself, so the batch
                # leaves the moment it may instead of when consume() next returns
                # (that cost ~1 ms per flush at 10k events/s: half a consume timeout).
                messages = consumer.consume(config.consume_batch, 0)
                self._take(messages)
                if not messages:
                    flushing.await_outcome(timeout)
            elif not intake.messages:
                # Nothing waits: wake on the first message, not when the timeout ends
                # or a whole consume_batch has arrived (consume(n, t) returns at
                # whichever comes first; below full speed that is t, a floor on
                # latency), then take what arrived with it. Two consume() results,
                # each screened on its own (a callback may run in either), one batch.
                messages = consumer.consume(1, timeout)
                self._take(messages)
                if messages and not self._stop.is_set():
                    self._take(consumer.consume(config.consume_batch - 1, 0))
            else:
                self._take(consumer.consume(config.consume_batch, timeout))
            pipeline.poll(may_block=not pausing.paused)
            self._backpressure()
            self._check_stalls()
            self._tick_metrics()
            if config.idle_exit_s is not None and self._idle_and_caught_up():
                log.info("idle for %.1f s with no lag: exiting", config.idle_exit_s)
                self._stop.set()

    def _take(self, messages: list[Any]) -> None:
        """Hand one ``consume()`` result to the pipeline, up to ``max_events``."""
        pipeline, max_events = self.pipeline, self.config.max_events
        assert pipeline is not None
        if messages and max_events is not None:
            messages = _truncate(messages, max_events - pipeline.intake.consumed)
        pipeline.submit(messages)
        if max_events is not None and pipeline.intake.consumed >= max_events:
            self._stop.set()

    def _backpressure(self) -> None:
        pipeline, pausing = self.pipeline, self.pausing
        assert pipeline is not None and pausing is not None
        flushing = pipeline.flushing
        buffered = pipeline.buffered_bytes
        self._max_buffered_bytes = max(self._max_buffered_bytes, buffered)
        pause = self.backpressure.update(
            inflight_age_s=flushing.inflight_age(self.clock.monotonic()),
            buffered_bytes=buffered,
            batch_full=pipeline.intake.full,
        )
        held = flushing.holding
        pausing.update(
            pipeline.positions.assigned,
            pause=pause or held,
            reason=flushing.hold_reason() if held else self.backpressure.reason,
            held=held,
        )

    def _check_stalls(self) -> None:
        pipeline, pausing, stalls = self.pipeline, self.pausing, self.stalls
        assert pipeline is not None and pausing is not None and stalls is not None
        stalls.check(
            self._consumer,
            pipeline.positions,
            paused=pausing.paused,
            held=pipeline.flushing.holding,
            now_s=self.clock.monotonic(),
        )

    def _idle_and_caught_up(self) -> bool:
        pipeline = self.pipeline
        assert pipeline is not None and self.config.idle_exit_s is not None
        now = self.clock.monotonic()
        if now - pipeline.intake.last_message_s < self.config.idle_exit_s:
            return False
        if pipeline.busy:
            return False
        if now - self._last_lag_check_s < 1.0:
            return False
        self._last_lag_check_s = now
        try:
            return pipeline.positions.group_caught_up()
        except Exception as exc:  # a server hiccup only delays the exit
            log.debug("lag check failed: %s", exc)
            return False

    # -- rebalance callbacks: the pipeline moves the work, pausing states the flags -------

    def _holding(self) -> bool:
        assert self.pipeline is not None
        return self.backpressure.paused or self.pipeline.flushing.holding

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        pipeline, pausing = self.pipeline, self.pausing
        assert pipeline is not None and pausing is not None
        keys = pipeline.on_assign(consumer, partitions)
        if pipeline.failure.failed:
            return
        if not pipeline.cooperative:
            pausing.forget()
        pausing.assigned(keys, hold=self._holding())

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        assert self.pipeline is not None
        self._released(self.pipeline.on_revoke(consumer, partitions))

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        assert self.pipeline is not None
        self._released(self.pipeline.on_lost(consumer, partitions))

    def _released(self, keys: set[tuple[str, int]]) -> None:
        pipeline, pausing, telemetry = self.pipeline, self.pausing, self.telemetry
        assert pipeline is not None and pausing is not None and telemetry is not None
        pausing.released(keys)
        telemetry.forget(keys)
        if not pipeline.assigned:
            self.backpressure.reset()

    def _reassigned(self, keys: list[tuple[str, int]]) -> None:
        assert self.pausing is not None
        self.pausing.assigned(keys, hold=bool(self.pausing.paused) or self._holding())

    def _trace(self, pipeline: StatePipeline, options: TracingOptions) -> None:
        require_otel()
        from spr.tracing.otel import BatchTracer, samples_nothing

        config = self.config
        pipeline.flushing.tracer = BatchTracer(
            group=config.group_id,
            topics=config.topics,
            table=str(config.mapping.state_name),
            dsn=config.dsn,
        )
        if options.collect and options.max_links > 0 and not samples_nothing():
            pipeline.intake.trace_links = TraceLinks(options.max_links)

    # -- metrics --------------------------------------------------------------------------

    def _flushed(self, pending: Any, result: Any, seconds: float) -> None:
        self._last_commit_s = self.clock.monotonic()
        self.backpressure.flush_finished(seconds)
        if self.telemetry is not None:
            self.telemetry.observe_flush(pending.timestamps, pending.weights, seconds)

    def _tick_metrics(self) -> None:
        telemetry, pipeline = self.telemetry, self.pipeline
        if telemetry is not None and pipeline is not None and telemetry.enabled:
            telemetry.tick(
                self._consumer,
                pipeline.positions.assigned,
                pipeline.intake.take_partition_events,
                pipeline.intake.misrouted,
            )

    def _publish_metrics(self) -> None:
        telemetry, pipeline = self.telemetry, self.pipeline
        if telemetry is None or pipeline is None or not telemetry.enabled:
            return
        telemetry.publish(
            self._consumer,
            pipeline.assigned,
            pipeline.intake.take_partition_events(),
            pipeline.intake.misrouted,
        )

    # -- start-up and shutdown ------------------------------------------------------------

    def _probe_topics(self) -> None:
        bootstrap = str(StatePipeline.consumer_config(self.config).get("bootstrap.servers"))
        try:
            metadata = self._consumer.list_topics(timeout=self.config.connect_timeout_s)
        except Exception as exc:
            raise unreachable(bootstrap, exc) from exc
        for topic in self.config.topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                raise ConfigError(f"topic {topic} does not exist on {bootstrap}")

    def _shutdown(self) -> None:
        consumer, pipeline = self._consumer, self.pipeline
        if consumer is not None:
            if pipeline is not None and pipeline.failure.failed:
                # Write nothing more: close() serves a final revoke, which must not flush.
                pipeline.intake.drop()
            try:
                consumer.close()
            except Exception as exc:
                log.debug("consumer close failed: %s", exc)
        self._consumer = None
        if pipeline is not None:
            pipeline.close()


def _truncate(messages: list[Any], room: int) -> list[Any]:
    """The first ``room`` data messages and what came before them; nothing after the cut
    (an end-of-partition event there would claim records this run never took)."""
    kept: list[Any] = []
    for message in messages:
        if message.error() is None:
            if room <= 0:
                break
            room -= 1
        kept.append(message)
    return kept
