"""The state pipeline: ``consume()`` results in, exactly-once state out (design §4).

A :class:`StatePipeline` is the path one batch takes, as stages:

    submit(messages) -> Positions.screen -> Intake.ingest (decode, key check, ring,
        collapse) -> DeadLetters (invalid events) -> poll() -> Flushing (one transaction:
        rows + offsets) -> Positions.record -> Kafka commit mirror

It follows sentry-arroyo's processing-strategy contract: :meth:`submit` takes a
``consume()`` result and never blocks on the database; :meth:`poll` makes progress
(collects the flush in flight, hands off the next batch) and blocks only for flow
control; :meth:`join` flushes everything and waits; :meth:`close` releases the
connections. ``spr run`` (:class:`spr.engine.Engine`) drives one, and so can your own
confluent-kafka loop: give the consumer :meth:`consumer_config` and the rebalance
callbacks :meth:`on_assign`, :meth:`on_revoke` and :meth:`on_lost`, and you get the same
ring, overlap, dead letters, sequence guard and offsets in the transaction.

Invariants (see each stage for its own):

* An offset reaches the database only in the transaction that writes the rows of every
  event below it, or after that event was durably dead-lettered; Kafka is committed
  only after that transaction.
* Whenever consumed-but-uncommitted work is dropped (a lost assignment, a revoke whose
  budget ran out), the flush in flight is cancelled, the waiting batch and the ring are
  forgotten, and every partition still owned is rewound to its committed offset
  (:meth:`abandon`).
* The first failure stops the pipeline (:class:`FirstFailure`): after it nothing more is
  flushed, committed or dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spr._event import MISROUTED_APPLY, MISROUTED_BY_SEQUENCE, MISROUTED_DEAD_LETTER
from spr.classify import ErrorClass, classify_kafka_error
from spr.clock import Clock, SystemClock
from spr.config import EngineConfig, uses_cooperative_rebalance
from spr.decode import DEFAULT_LIMITS, DecodeLimits
from spr.dedup import IdempotencyRing
from spr.engine.deadletters import DeadLetters, DeadLetterSink, RateLimitedLog
from spr.engine.failures import FirstFailure
from spr.engine.flushing import Flushing, FlushJob
from spr.engine.intake import Intake, PendingBatch
from spr.engine.positions import Positions
from spr.errors import ServerUnavailable, SprError
from spr.kafka.admin import KafkaAdmin
from spr.kafka.clients import topic_partition
from spr.logs import log_event
from spr.sink.postgres import FlushResult, PostgresSink

__all__ = ["StatePipeline"]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]
SinkFactory = Callable[[], PostgresSink]
AdminFactory = Callable[[dict[str, Any]], KafkaAdmin]
FlushListener = Callable[[PendingBatch, FlushResult, float], None]

_MISROUTED_MODES = {
    "auto": MISROUTED_BY_SEQUENCE,
    "apply": MISROUTED_APPLY,
    "dead-letter": MISROUTED_DEAD_LETTER,
    "stop": MISROUTED_DEAD_LETTER,  # held back, then the pipeline stops at the first
}
_ERR_PARTITION_EOF = -191
_ERR_UNKNOWN_TOPIC = -188
_ERR_UNKNOWN_TOPIC_OR_PART = 3
_ERR_OFFSET_OUT_OF_RANGE = 1
_ERR_AUTO_OFFSET_RESET = -140  # confluent_kafka.KafkaError._AUTO_OFFSET_RESET
#: How often an idle pipeline asks the database whether it still holds what was
#: committed (a crash or a failover after the last flush loses it silently).
DURABILITY_PROBE_S = 5.0


def _keys(partitions: list[Any]) -> list[TopicPartitionKey]:
    return [(p.topic, p.partition) for p in partitions]


def _describe(keys: list[TopicPartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(keys)) or "none"


class StatePipeline:
    """Applies one consumer's messages to PostgreSQL, exactly once.

    ``consumer`` is a confluent-kafka ``Consumer`` built with :meth:`consumer_config`
    and subscribed with this pipeline's rebalance callbacks. ``dead_letters`` receives
    invalid events and rejected rows (:func:`spr.dlq.dead_letter_sink` makes the
    standard one); without it they are only counted, and a rejected row stops the
    pipeline. ``sink_factory`` and ``admin_factory`` are test seams. Not thread-safe:
    call everything from the consumer's thread.
    """

    def __init__(
        self,
        config: EngineConfig,
        consumer: Any,
        *,
        dead_letters: DeadLetterSink | None = None,
        clock: Clock | None = None,
        decode_limits: DecodeLimits = DEFAULT_LIMITS,
        sink_factory: SinkFactory | None = None,
        admin_factory: AdminFactory | None = None,
        sample_latency: bool = False,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.clock: Clock = clock or SystemClock()
        self._sink_factory = sink_factory or (lambda: PostgresSink.from_config(config))
        self.kafka_conf = self.consumer_config(config)
        # Where a partition the database has never seen starts: the user's choice.
        self.offset_reset = str(config.consumer_config().get("auto.offset.reset", "earliest"))
        self._admin_factory = admin_factory or (
            lambda conf: KafkaAdmin(conf, timeout_s=config.connect_timeout_s)
        )
        self.cooperative = uses_cooperative_rebalance(self.kafka_conf)
        self.failure = FirstFailure()
        ring = IdempotencyRing(config.ring_capacity, config.ring_ttl_ms)
        self.intake = Intake(
            config.batch,
            ring,
            decode_limits,
            sample_latency=sample_latency,
            on_misrouted=_MISROUTED_MODES[config.on_misrouted],
        )
        self.dead_letters = DeadLetters(
            dead_letters,
            self.failure,
            clock=self.clock,
            kafka_conf=self.kafka_conf,
            read_timeout_s=config.connect_timeout_s + 5.0,
        )
        self.flushing = Flushing(
            config, clock=self.clock, failure=self.failure, on_committed=self._committed
        )
        self.control: PostgresSink | None = None
        self._positions: Positions | None = None
        #: Called on the consumer's thread after each committed flush.
        self.flush_listeners: list[FlushListener] = []
        #: Called with partitions re-assigned outside a rebalance (a retention gap
        #: skipped mid-run), whose pause flag must be stated again.
        self.on_reassigned: Callable[[list[TopicPartitionKey]], None] | None = None
        self._kafka_log = RateLimitedLog(log, self.clock)
        self.rebalances = 0
        self.partitions_revoked = 0
        self.partitions_lost = 0
        self.rollbacks = 0
        self.kafka_errors = 0
        # A database may lose commits it acknowledged: a crash under
        # synchronous_commit=off, or a failover to a standby that had not received them
        # (asynchronous replication, on by default in PostgreSQL). Their events must
        # then be consumed again (see _replay_lost_commits), whatever this process's
        # own synchronous_commit says, so the check is always on.
        self._check_durable = True
        self._next_probe_s = 0.0
        self.commits_lost = 0

    @staticmethod
    def consumer_config(config: EngineConfig) -> dict[str, Any]:
        """The librdkafka settings to build the consumer with: ``config``'s, except that
        librdkafka must never reset a position by itself (a retention gap mid-run): it
        reports ``_AUTO_OFFSET_RESET`` instead, and the user's ``auto.offset.reset`` only
        picks where a partition the database has never seen starts."""
        conf = config.consumer_config()
        conf["auto.offset.reset"] = "error"
        return conf

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Connect to PostgreSQL, check (or create) the tables and start the flush
        thread. Blocks; raises SprError (one sentence) when the database is missing or
        the schema does not fit."""
        control = self._sink_factory()
        self.control = control
        control.connect()
        control.ensure_schema(auto_create=self.config.auto_create_schema)
        self._positions = Positions(
            self.config,
            self.consumer,
            control,
            lambda: self._admin_factory(self.kafka_conf),
            offset_reset=self.offset_reset,
            cooperative=self.cooperative,
        )
        rejected = self.dead_letters.rejected_rows if self.dead_letters.enabled else None
        writers = [self._sink_factory() for _ in range(self.config.lanes)]
        for writer in writers:
            # Only the connections that write batches: offsets commit with their rows
            # there, which is what makes a weaker setting safe (see EngineConfig).
            writer.synchronous_commit = self.config.synchronous_commit
        if self.config.synchronous_commit == "off":
            log.warning(
                "synchronous_commit is off for the flushes: a PostgreSQL crash loses the "
                "last commits (rows and offsets together, up to about three times the "
                "server's wal_writer_delay), and spr consumes those events again from "
                "Kafka, which must still hold them"
            )
        self.flushing.start(writers, rejected)

    def close(self) -> None:
        """Stop the flush thread and close the connections (flushes nothing)."""
        self.flushing.close()
        if self.control is not None:
            self.control.close()

    @property
    def opened(self) -> bool:
        return self._positions is not None

    @property
    def positions(self) -> Positions:
        assert self._positions is not None, "open() the pipeline first"
        return self._positions

    # -- the data path --------------------------------------------------------------------

    def submit(self, messages: list[Any]) -> None:
        """Take one ``consume()`` result into the waiting batch (one call into the core),
        dead-letter the invalid events it hands back and classify the Kafka errors.
        Raises the pipeline's first failure."""
        self.failure.raise_if_failed()
        # Screened even when empty: a rewind made inside this consume() call must seek
        # again now, outside the callback.
        messages = self.positions.screen(messages)
        if not messages:
            return
        now = self.clock.monotonic()
        result = self.intake.ingest(messages, now, self.positions.assigned)
        for message, reason in result.invalid:
            self.dead_letters.invalid_event(message, reason)
        for message, reason in result.misrouted_letters:
            if self.config.on_misrouted == "stop":
                self.failure.fail(SprError(f"{reason} (--on-misrouted stop)"))
                break
            self.dead_letters.invalid_event(message, reason, error_class=ErrorClass.MISROUTED)
        # After the invalid events are dead-lettered: a Kafka error that stops the
        # pipeline must not leave an offset in the batch past an event never handled.
        for message in result.errors:
            self._kafka_error(message)

    def poll(self, *, may_block: bool = True) -> None:
        """Collect a finished flush, hand off the next batch when it is due. With
        ``may_block`` and the next batch full behind a flush in flight, wait for that
        flush (flow control that keeps librdkafka's prefetch, which a pause would drop),
        at most the backpressure policy's longest cool-down. Raises the first failure."""
        flushing = self.flushing
        self.failure.raise_if_failed()
        flushing.poll()
        self.failure.raise_if_failed()
        if self._check_durable:
            self._replay_lost_commits()
        # Group commit: with no flush in flight the database is idle, so anything
        # waiting goes at once (at a low rate an event waits for one flush, not for a
        # timer); while a flush runs, the next batch grows by itself up to the batch
        # policy's limits, which is what lets the pipeline keep pace under load.
        intake = self.intake
        if not flushing.busy:
            if intake.messages and flushing.allows_new(self.clock.monotonic()):
                self._submit()
        elif may_block and intake.full:
            job = flushing.inflight
            assert job is not None
            block_s = self.config.backpressure.max_cool_down_ms / 1000.0
            if flushing.wait(job.started_s + block_s) and intake.messages:
                self._submit()
        self.failure.raise_if_failed()

    def join(self, timeout_s: float) -> bool:
        """Flush everything taken so far and wait for it, within ``timeout_s``. Returns
        False when the time ran out or the pipeline failed (the caller rolls back)."""
        flushing = self.flushing
        deadline = self.clock.monotonic() + timeout_s
        if not flushing.wait(deadline) or self.failure.failed:
            return False
        if self.intake.messages:
            self._submit()
            if not flushing.wait(deadline):
                return False
        return not self.failure.failed

    def abandon(self) -> None:
        """Drop all uncommitted work: cancel the flush in flight, forget the waiting
        batch and the ring, and rewind every owned partition to its committed offset."""
        self.flushing.cancel(wait_s=5.0)
        self.rollbacks += 1
        self.intake.drop()
        self.positions.rewind()

    @property
    def busy(self) -> bool:
        """Work taken but not yet committed: a waiting batch or a flush in flight."""
        return self.flushing.busy or bool(self.intake.messages)

    @property
    def assigned(self) -> set[TopicPartitionKey]:
        """The partitions this pipeline owns now (empty before :meth:`open`)."""
        return set() if self._positions is None else self._positions.assigned

    @property
    def buffered_bytes(self) -> int:
        return self.intake.nbytes + self.flushing.inflight_bytes()

    def _submit(self) -> None:
        if self.intake.invalid and self.dead_letters.enabled:
            # Dead letters must be durable before the offsets past them are.
            self.dead_letters.flush()
        if self._check_durable:
            self.flushing.expect_durable(self.positions.committed)
        self.flushing.submit(self.intake.take())

    def _replay_lost_commits(self) -> None:
        """When the database lost commits it had acknowledged (a crash under
        synchronous_commit=off, a failover under asynchronous replication), drop all
        uncommitted work and consume again from the offsets it holds, ring forgotten, so
        that the lost events are applied again and none is skipped. Found by a flush
        connection when it reconnects (it refuses to flush past them: CommitsLost) or,
        while idle, by a probe every DURABILITY_PROBE_S."""
        lost = self.flushing.take_lost_commits()
        if not lost and not self.busy:
            now = self.clock.monotonic()
            if now < self._next_probe_s:
                return
            self._next_probe_s = now + DURABILITY_PROBE_S
            try:
                lost = self.positions.lost_commits()
            except Exception as exc:  # unreachable now: the next probe or flush checks
                log.debug("durability probe failed: %s", exc)
                return
        if not lost:
            return
        committed = self.positions.committed
        self.commits_lost += 1
        log_event(
            log,
            "commits_lost",
            level=logging.WARNING,
            partitions=", ".join(
                f"{t}[{p}] {committed.get((t, p), 'none')} -> "
                f"{'none' if lost[(t, p)] is None else lost[(t, p)]}"
                for t, p in sorted(lost)
            ),
            note="PostgreSQL lost acknowledged commits (a crash under "
            "synchronous_commit=off, or a failover); consuming them again from its offsets",
        )
        self.positions.lower(lost)
        self.abandon()

    def _committed(self, job: FlushJob, result: FlushResult, seconds: float) -> None:
        positions = self.positions
        positions.record(result.offsets)
        positions.commit_kafka(result.offsets)
        for listener in self.flush_listeners:
            listener(job.pending, result, seconds)

    def _kafka_error(self, message: Any) -> None:
        """Classify one error message of a ``consume()`` result (design §4, §6)."""
        error = message.error()
        code = error.code()
        if code == _ERR_PARTITION_EOF:
            self._end_of_partition(message)
            return
        self.kafka_errors += 1
        if code in (_ERR_AUTO_OFFSET_RESET, _ERR_OFFSET_OUT_OF_RANGE):
            budget = self.config.flush_retry_s + 10.0
            key = self.positions.out_of_range(message, lambda: self.join(budget))
            if key is not None and self.on_reassigned is not None:
                self.on_reassigned([key])
            return
        error_class = classify_kafka_error(error)
        if error_class is ErrorClass.FATAL:
            raise ServerUnavailable(
                f"Kafka reported an error spr cannot recover from: {error.str()}"
            )
        if code in (_ERR_UNKNOWN_TOPIC, _ERR_UNKNOWN_TOPIC_OR_PART):
            self._kafka_log.warning("Kafka: %s", error.str())
            return
        if error_class is ErrorClass.INVALID:
            self._unreadable_record(message, error)
            return
        # TRANSIENT: the client retries by itself. DATA is a producer-side error.
        self._kafka_log.warning("Kafka error (%s): %s", error_class, error.str())

    def _end_of_partition(self, message: Any) -> None:
        """Everything before the end offset was returned: store the end as the next
        offset when only control records lay between (see ``enable.partition.eof``).

        Trusted only when the consumer's position is that end: an end reported before a
        rewind (or for records this loop dropped) must not move an offset past events
        that were never applied."""
        key = (message.topic(), message.partition())
        end = message.offset()
        positions = self.positions
        if end <= positions.committed.get(key, -1) or key not in positions.assigned:
            return
        (at,) = self.consumer.position([topic_partition(key[0], key[1])])
        if at.offset == end:
            self.intake.reach_end(key[0], key[1], end, self.clock.monotonic())

    def _unreadable_record(self, message: Any, error: Any) -> None:
        try:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
        except Exception:  # not tied to a record
            topic, partition, offset = None, -1, -1
        if topic is None or partition < 0 or offset < 0:
            self._kafka_log.warning("Kafka error (invalid): %s", error.str())
            return
        if (topic, partition) not in self.positions.assigned:
            return  # fetched before a revoke was served; the next owner reads it
        if self.dead_letters.unreadable_record(topic, partition, offset, error):
            # Dead-lettered (flushed before the batch is handed off): now its offset moves.
            self.intake.advance(topic, partition, offset, self.clock.monotonic())

    # -- rebalance callbacks (inside consume(), on the consumer's thread) -----------------

    def on_assign(self, consumer: Any, partitions: list[Any]) -> list[TopicPartitionKey]:
        """Assign ``partitions`` at the offsets stored in the database. Returns them; an
        error stops the pipeline (raised by the next :meth:`submit` or :meth:`poll`)."""
        keys = _keys(partitions)
        try:
            self.rebalances += 1
            self.positions.assign(keys)
            self._count_partitions()
            log_event(log, "rebalance", change="assign", partitions=_describe(keys))
        except BaseException as exc:
            self.failure.fail(exc)
        return keys

    def _count_partitions(self) -> None:
        # The topics' partition counts, for the misrouting check (design §10). Without
        # an answer the check keeps the counts it had (none at first: no check).
        try:
            self.intake.partitions = self.positions.partition_counts()
        except Exception as exc:
            log.debug("partition counts unavailable; misrouting not checked: %s", exc)

    def on_revoke(self, consumer: Any, partitions: list[Any]) -> set[TopicPartitionKey]:
        """Flush and commit before ``partitions`` go, within the revoke budget, or roll
        back (the next owner replays, harmlessly). Returns the partitions released."""
        keys = set(_keys(partitions))
        try:
            self.rebalances += 1
            self.partitions_revoked += len(keys)
            log_event(log, "rebalance", change="revoke", partitions=_describe(sorted(keys)))
            if not self.failure.failed:
                budget = self.config.effective_revoke_budget_ms / 1000.0
                if not self.join(budget):
                    log.warning("revoke: flush did not finish within %.1f s; rolled back", budget)
                    self.abandon()
            self.positions.release(keys)
        except BaseException as exc:
            self.failure.fail(exc)
        return keys

    def on_lost(self, consumer: Any, partitions: list[Any]) -> set[TopicPartitionKey]:
        """``partitions`` were taken away (this member was considered dead): drop their
        in-flight work, write nothing. Returns the partitions released."""
        keys = set(_keys(partitions))
        try:
            self.rebalances += 1
            self.partitions_lost += len(keys)
            log_event(
                log,
                "rebalance",
                level=logging.WARNING,
                change="lost",
                partitions=_describe(sorted(keys)),
                note="dropping their in-flight work",
            )
            self.abandon()
            self.positions.release(keys)
        except BaseException as exc:
            self.failure.fail(exc)
        return keys
