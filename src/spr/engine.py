"""The consumer engine: Kafka to PostgreSQL, exactly once, rebalance-safe, bounded.

Flow (design §4)::

    consume() -> classify errors -> decode -> idempotency ring -> Batch (collapse)
              -> hand off to the flush thread -> one transaction (state + offsets)
              -> asynchronous Kafka commit (for lag tools only)

Invariants this module keeps, and why they give exactly-once effects:

* An offset reaches the database only in the transaction that writes the rows of every
  event below it (the batch carries both), and Kafka is committed only after that
  transaction. The database is the truth: on assignment the engine seeks to the stored
  offsets, never to Kafka's.
* One flush is in flight at a time, on one thread, so flushes commit in order; the main
  thread gathers and decodes the next batch meanwhile.
* Whenever consumed-but-uncommitted work is dropped (a lost assignment, a revoke whose
  budget ran out, a failed flush), the ring is cleared, since a "seen" fingerprint
  of an event that was never written would turn its redelivery into a loss, and
  every partition still owned is rewound to its last committed offset.
* The sequence guard and ``GREATEST`` on offsets make every flush idempotent, so a
  replay, a retried ambiguous commit or a zombie's late flush is harmless.
* Memory is bounded: the waiting batch is capped by :class:`~spr.config.BatchPolicy`,
  one batch is in flight, and partitions are paused (:class:`Backpressure`) while the
  sink is slow or the buffers are full; ``consume`` keeps being called while paused, so
  the member stays in its group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from spr.batch import STATE_COLUMNS, Batch
from spr.classify import ErrorClass, classify, classify_kafka_error, error_reason
from spr.clock import Clock, SystemClock
from spr.config import BackpressurePolicy, EngineConfig, uses_cooperative_rebalance
from spr.decode import DEFAULT_LIMITS, DecodeLimits
from spr.dedup import IdempotencyRing
from spr.errors import ConfigError, DeadLetterUnavailable, ServerUnavailable, SprError
from spr.logs import log_event
from spr.metrics import LocalStats, MetricsPublisher, fold_engine_counters
from spr.retry import CircuitBreaker, CircuitState, RetryAttempt
from spr.sink.postgres import FlushResult, PostgresSink, RejectedRow, redact_dsn

__all__ = [
    "Backpressure",
    "DeadLetterSink",
    "Engine",
    "EngineStats",
    "FlushFailed",
]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]

# librdkafka's logical offsets (confluent_kafka.OFFSET_BEGINNING / OFFSET_END), spelled
# out so that this module imports without the client for pure-logic tests.
OFFSET_BEGINNING = -2
OFFSET_END = -1
_ERR_PARTITION_EOF = -191
_ERR_UNKNOWN_TOPIC = -188
_ERR_UNKNOWN_TOPIC_OR_PART = 3
_ERR_OFFSET_OUT_OF_RANGE = 1
_ERR_AUTO_OFFSET_RESET = -140  # confluent_kafka.KafkaError._AUTO_OFFSET_RESET
# A flush still running this long past statement_timeout is stuck (a dead connection).
_FLUSH_WATCHDOG_MARGIN_S = 30.0
# Consumer settings an AdminClient shares (where and how to connect).
_ADMIN_KEY_PREFIXES = ("bootstrap.", "security.", "sasl.", "ssl.", "socket.", "client.", "broker.")


class FlushFailed(SprError):
    """A flush could not be committed within its retry budget, or failed for good.

    Nothing of the failed batch was committed; the engine stops. ``cause`` is the last
    underlying error.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class DeadLetterSink(Protocol):
    """Where invalid events and rejected rows go (:class:`spr.dlq.InvalidEventSink`
    writes them to ``<topic>.dlq``).

    ``send(message, reason)`` is called on the engine's thread for each invalid message,
    in consumption order, before its offset is added to a batch. ``flush`` is called
    before a batch that holds such offsets is handed to the database, and must block
    until every sent dead letter is durable, or raise (the engine then stops without
    committing the batch). Rows the database rejects (class DATA) are sent from the
    flush thread as ``send(record, reason, error_class="data")`` followed by ``flush()``
    inside the flush's transaction; the engine serialises all calls with a lock. A
    record Kafka itself could not read (bad CRC, compression) is sent as a
    :class:`spr.dlq.SourceRecord` holding only its position, with the client's error as
    ``reason``.
    """

    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """A snapshot of the engine's local counters (another issue publishes them).

    ``consumed`` counts data messages taken from Kafka; each ends as ``duplicate``
    (dropped by the ring), ``invalid`` (offset advanced, handed to the dead-letter hook),
    or a batch event, which the flush turns into ``applied`` rows, ``stale`` rows (the
    guard kept a newer stored sequence), ``rejected`` rows (refused by the database for
    their content, class DATA, and dead-lettered) or ``collapsed`` (superseded within its
    batch by a newer event of the same entity; when that newest event is rejected, the
    events it superseded stay ``collapsed``: only the newest one is dead-lettered).

    ``flush_retries`` counts failed flush attempts that were retried;
    ``circuit_state`` is the breaker's state (0 closed, 1 half-open, 2 open) and
    ``circuit_opens`` how often it opened; ``offset_gaps`` counts retention gaps skipped
    and ``offset_gap_events`` the events lost in them.
    """

    consumed: int = 0
    applied: int = 0
    stale: int = 0
    collapsed: int = 0
    duplicate: int = 0
    invalid: int = 0
    flushes: int = 0
    flush_retries: int = 0
    flush_seconds_total: float = 0.0
    flush_seconds_max: float = 0.0
    flush_seconds_last: float = 0.0
    pauses: int = 0
    resumes: int = 0
    paused_partitions: int = 0
    rebalances: int = 0
    assigned_partitions: int = 0
    partitions_revoked: int = 0
    partitions_lost: int = 0
    rollbacks: int = 0
    kafka_errors: int = 0
    offset_gaps: int = 0
    offset_gap_events: int = 0
    rejected: int = 0
    circuit_state: int = 0
    circuit_opens: int = 0
    buffered_bytes: int = 0
    max_buffered_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backpressure:
    """When to pause consumption and when to resume (policy in BackpressurePolicy).

    Pure logic on an injected clock: the engine feeds it the in-flight flush's age, the
    buffered bytes and whether the waiting batch is full, and applies the answer to all
    of its partitions. Reasons to pause:

    * ``memory``: buffered bytes reached the bound; held until they fall to
      ``resume_ratio`` of it (hysteresis);
    * ``slow``: the flush in flight has run longer than ``slow_flush_ms`` *and* the
      waiting batch is full (or buffered bytes are past ``resume_ratio`` of the bound).
      Held for a cool-down; if the sink is still slow when it expires, the cool-down
      doubles (up to ``max_cool_down_ms``); a fast flush resets it.

    A slow flush alone is no reason to pause: the next batch keeps growing meanwhile
    (group commit), which is how the engine keeps up with the database. Pausing on
    every flush longer than 50 ms paused 96 of 103 flushes of the 1M-event bench and
    halved throughput, because each pause drops librdkafka's prefetch. A full batch
    behind an in-flight flush is first handled by the engine blocking on that flush
    (flow control that keeps the prefetch); only when that wait runs out is it paused.
    """

    def __init__(self, policy: BackpressurePolicy, clock: Clock) -> None:
        self.policy = policy
        self.clock = clock
        self.paused = False
        self.reason = ""
        self.cool_down_s = policy.cool_down_ms / 1000.0
        self._slow_until = 0.0
        self._memory_hold = False

    def update(
        self, *, inflight_age_s: float | None, buffered_bytes: int, batch_full: bool
    ) -> bool:
        """Re-evaluate; returns True while consumption should be paused. Never blocks."""
        policy = self.policy
        now = self.clock.monotonic()
        near_bound = buffered_bytes > policy.memory_bound_bytes * policy.resume_ratio
        slow = (
            inflight_age_s is not None
            and inflight_age_s * 1000.0 > policy.slow_flush_ms
            and (batch_full or near_bound)
        )
        if buffered_bytes >= policy.memory_bound_bytes:
            self._memory_hold = True
        elif not near_bound:
            self._memory_hold = False
        if slow and self._slow_until == 0.0:
            self._slow_until = now + self.cool_down_s
        elif self._slow_until and now >= self._slow_until:
            if slow:
                self.cool_down_s = min(self.cool_down_s * 2, policy.max_cool_down_ms / 1000.0)
                self._slow_until = now + self.cool_down_s
            else:
                self._slow_until = 0.0
        if self._memory_hold:
            reason = "memory"
        elif self._slow_until:
            reason = "slow"
        else:
            reason = ""
        self.paused = bool(reason)
        self.reason = reason
        return self.paused

    def flush_finished(self, duration_s: float) -> None:
        """Record a completed flush: a fast one resets the cool-down to its base."""
        if duration_s * 1000.0 <= self.policy.slow_flush_ms:
            self.cool_down_s = self.policy.cool_down_ms / 1000.0

    def reset(self) -> None:
        """Forget every hold (after the assignment is dropped)."""
        self.paused = False
        self.reason = ""
        self._slow_until = 0.0
        self._memory_hold = False
        self.cool_down_s = self.policy.cool_down_ms / 1000.0


# ------------------------------------------------------------------------- flush thread


@dataclass(eq=False)
class _FlushJob:
    """One batch on its way to the database, possibly over several attempts.

    ``running`` while the flush thread has it; between attempts ``retry`` holds the
    backoff state and the main loop resubmits it once ``retry.ready_at`` has come and
    the circuit breaker allows. ``timestamps``/``weights`` are broker timestamps
    sampled per consume() call (see :meth:`Engine._sample_timestamps`).
    """

    number: int
    batch: Batch
    events: int
    started_s: float
    cancel: threading.Event
    abandoned: bool = False
    running: bool = False
    retry: RetryAttempt | None = None
    timestamps: array[int] | None = None
    weights: array[int] | None = None
    attempt_s: float = 0.0  # when the current attempt was handed to the flush thread


@dataclass(eq=False)
class _FlushOutcome:
    job: _FlushJob
    result: FlushResult | None
    error: BaseException | None
    cancelled: bool
    duration_s: float
    retries: int


RejectedRowsHandler = Callable[[Sequence[RejectedRow]], None]


class _Flusher:
    """The dedicated flush thread: one attempt of one job at a time, in submission order.

    It owns its own sink (and so its own connection). It never retries by itself: each
    attempt's outcome goes back to the engine's thread, which classifies the error,
    feeds the circuit breaker and decides when to try again (the loop keeps polling
    meanwhile). ``dead_letter`` receives rows the database rejects (see
    :meth:`PostgresSink.flush`); without it such a batch fails.
    """

    def __init__(
        self, sink: PostgresSink, *, clock: Clock, dead_letter: RejectedRowsHandler | None = None
    ) -> None:
        self.sink = sink
        self.clock = clock
        if dead_letter is not None:
            sink.dead_letter = dead_letter
        self._jobs: queue.Queue[_FlushJob | None] = queue.Queue()
        self.results: queue.Queue[_FlushOutcome] = queue.Queue()
        self._current: _FlushJob | None = None
        self._thread = threading.Thread(target=self._run, name="spr-flush", daemon=True)
        self._thread.start()

    def submit(self, job: _FlushJob) -> None:
        self._jobs.put(job)

    def cancel(self, job: _FlushJob) -> None:
        """Ask ``job`` to stop: no more retries, and abort its running statement."""
        job.cancel.set()
        if self._current is job:
            self.sink.cancel()

    def close(self, timeout_s: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # Stuck in a statement on a dead connection: closing it from this thread
            # would race the flush thread inside libpq. The process exit ends both.
            log.warning("the flush thread did not stop within %.0f s; leaving it", timeout_s)
            return
        self.sink.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._current = job
            try:
                self.results.put(self._flush(job))
            finally:
                self._current = None

    def _flush(self, job: _FlushJob) -> _FlushOutcome:
        start = time.monotonic()
        if job.cancel.is_set():
            return _FlushOutcome(job, None, None, True, 0.0, 0)
        try:
            result = self.sink.flush(job.batch)
            return _FlushOutcome(job, result, None, False, time.monotonic() - start, 0)
        except Exception as exc:
            cancelled = job.cancel.is_set()
            return _FlushOutcome(job, None, exc, cancelled, time.monotonic() - start, 0)


# ------------------------------------------------------------------------------ engine


class _RateLimitedLog:
    """At most one log line per ``interval_s``; the lines skipped are counted in the next."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = -1e18
        self._skipped = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return
        self._last = now
        if self._skipped:
            message += f" ({self._skipped} similar line(s) suppressed)"
            self._skipped = 0
        self.logger.warning(message, *args)


ConsumerFactory = Callable[[dict[str, Any]], Any]
SinkFactory = Callable[[], PostgresSink]


def _default_consumer_factory(conf: dict[str, Any]) -> Any:
    from confluent_kafka import Consumer

    # librdkafka's own log lines go through logging ("spr.kafka"), not straight to stderr.
    conf.setdefault("logger", logging.getLogger("spr.kafka"))
    return Consumer(conf)


def _topic_partition(topic: str, partition: int, offset: int | None = None) -> Any:
    from confluent_kafka import TopicPartition

    if offset is None:
        return TopicPartition(topic, partition)
    return TopicPartition(topic, partition, offset)


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

    ``consumer_factory`` and ``sink_factory`` exist for tests (fakes); ``dead_letters``
    receives invalid messages and rejected rows (see :class:`DeadLetterSink`); without
    it they are only counted, and a rejected row stops the engine. ``metrics`` gets the
    engine's counters about once a second (and once more on shutdown).
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
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._consumer_factory = consumer_factory or _default_consumer_factory
        self._sink_factory = sink_factory or self._default_sink
        self._dead_letters = dead_letters
        self._limits = decode_limits
        self._consumer_conf = config.consumer_config()
        # Where a partition the database has never seen starts (the user's
        # auto.offset.reset); librdkafka itself must never reset a position silently (a
        # retention gap mid-run): it reports _AUTO_OFFSET_RESET instead (_kafka_error).
        self._offset_reset = str(self._consumer_conf.get("auto.offset.reset", "earliest")).lower()
        self._consumer_conf["auto.offset.reset"] = "error"
        self._cooperative = uses_cooperative_rebalance(self._consumer_conf)
        self._backpressure = Backpressure(config.backpressure, self.clock)
        self._ring = IdempotencyRing(config.ring_capacity, config.ring_ttl_ms)
        self._stop = threading.Event()
        self._invalid_log = _RateLimitedLog(log)
        self._kafka_log = _RateLimitedLog(log)

        self._consumer: Any = None
        self._admin: Any = None
        self._control: PostgresSink | None = None
        self._flusher: _Flusher | None = None
        self._fatal: BaseException | None = None

        self._assigned: set[TopicPartitionKey] = set()
        self._paused: set[TopicPartitionKey] = set()
        self._committed: dict[TopicPartitionKey, int] = {}
        self._start_offsets: dict[TopicPartitionKey, int] = {}
        self._rewound: set[TopicPartitionKey] = set()
        # Assigned at the logical OFFSET_END, not yet resolved to a real offset: the
        # first offset consumed resolves it (a rewind must not jump to the end again).
        self._unresolved: set[TopicPartitionKey] = set()
        self._pending = Batch(STATE_COLUMNS)
        self._pending_since: float | None = None
        self._pending_messages = 0
        self._pending_invalid = 0
        self._inflight: _FlushJob | None = None
        self._job_number = 0
        self._last_message_s = 0.0
        self._last_lag_check_s = 0.0
        self._counts: dict[str, Any] = EngineStats().as_dict()
        self._partition_counts: dict[TopicPartitionKey, int] = {}  # read+reset by metrics

        self._retry_policy = config.retry_policy
        self._breaker = CircuitBreaker(config.breaker, on_change=self._on_circuit_change)
        # The flush thread dead-letters rejected rows while this thread sends invalid
        # events: the dead-letter writer is not thread-safe.
        self._dead_letter_lock = threading.Lock()
        self._metrics = metrics
        self._local = LocalStats()
        self._metrics_previous: dict[str, Any] = {}
        self._metrics_last_s = time.monotonic()
        self._retention_checked = False
        self._pause_level = logging.DEBUG
        self._pending_timestamps: array[int] = array("q")
        self._pending_weights: array[int] = array("q")

    def _default_sink(self) -> PostgresSink:
        return PostgresSink.from_config(self.config)

    # -- public -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish: stop fetching, flush, commit, close. Never blocks."""
        self._stop.set()

    def stats(self) -> EngineStats:
        """A consistent-enough snapshot of the counters (read without locking)."""
        counts = dict(self._counts)
        counts["paused_partitions"] = len(self._paused)
        counts["assigned_partitions"] = len(self._assigned)
        counts["buffered_bytes"] = self._buffered_bytes()
        counts["circuit_state"] = int(self._breaker.state)
        return EngineStats(**counts)

    @property
    def circuit_state(self) -> CircuitState:
        """The flush circuit breaker's state."""
        return self._breaker.state

    def run(self) -> EngineStats:
        """Consume until stopped; see the class docstring. Blocks; raises SprError."""
        config = self.config
        self._control = self._sink_factory()
        self._control.connect()
        self._control.ensure_schema(auto_create=config.auto_create_schema)
        consumer = self._consumer_factory(dict(self._consumer_conf))
        self._consumer = consumer
        try:
            self._probe_topics()
            self._flusher = _Flusher(
                self._sink_factory(),
                clock=self.clock,
                dead_letter=self._dead_letter_rows if self._dead_letters is not None else None,
            )
            consumer.subscribe(
                list(config.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._last_message_s = self.clock.monotonic()
            self._loop()
            if self._fatal is None and not self._drain(config.flush_retry_s + 10.0):
                self._fail(
                    FlushFailed(
                        "the last flush did not finish within "
                        f"{config.flush_retry_s + 10.0:g} s at shutdown; nothing more was committed"
                    )
                )
            self._raise_fatal()
            self._commit_kafka(sync=True)
        except BaseException as exc:
            # Whatever stopped the engine, nothing more is flushed or committed: the
            # final revoke in close() must not commit offsets past events that were
            # never dead-lettered (design §6: fatal means nothing committed).
            self._fail(exc)
            raise
        finally:
            self._publish_metrics()
            self._shutdown()
        return self.stats()

    # -- main loop --------------------------------------------------------------------

    def _loop(self) -> None:
        config = self.config
        consumer = self._consumer
        timeout = config.consume_timeout_ms / 1000.0
        max_events = config.max_events
        while not self._stop.is_set():
            messages = consumer.consume(config.consume_batch, timeout)
            self._raise_fatal()
            if self._unresolved and messages:
                self._resolve_starts(messages)
            if self._rewound:
                messages = self._reseek(messages)
            if messages:
                if max_events is not None:
                    room = max_events - self._counts["consumed"]
                    messages = self._truncate(messages, room)
                before = self._pending_messages
                self._process(messages)
                if self._pending_messages > before:
                    self._sample_timestamps(messages, self._pending_messages - before)
                if max_events is not None and self._counts["consumed"] >= max_events:
                    self._stop.set()
            self._service()
            if config.idle_exit_s is not None and self._idle_and_caught_up():
                log.info("idle for %.1f s with no lag: exiting", config.idle_exit_s)
                self._stop.set()

    def _resolve_starts(self, messages: Sequence[Any]) -> None:
        """Record the first offset consumed from each partition that started at the
        logical end (its end offset could not be read at assignment)."""
        unresolved = self._unresolved
        for message in messages:
            if message.error() is not None:
                continue
            key = (message.topic(), message.partition())
            if key in unresolved:
                unresolved.discard(key)
                self._start_offsets[key] = message.offset()
                if not unresolved:
                    return

    def _truncate(self, messages: list[Any], room: int) -> list[Any]:
        kept: list[Any] = []
        for message in messages:
            if message.error() is None:
                if room <= 0:
                    continue
                room -= 1
            kept.append(message)
        return kept

    def _process(self, messages: Sequence[Any]) -> None:
        """Take one consume() result into the waiting batch with one call into the core
        (decode, key check, idempotency ring, collapse: ``Batch.ingest``); classify the
        Kafka errors and dead-letter the invalid events it hands back."""
        now = self.clock.monotonic()
        result = self._pending.ingest(
            messages, self._ring, int(now * 1000), self._assigned, self._limits
        )
        self._take_ingested(result, now)
        # After the invalid events are dead-lettered: a Kafka error that stops the engine
        # must not leave an offset in the batch past an event that was never handled.
        for message in result.errors:
            self._kafka_error(message)

    def _take_ingested(self, result: Any, now: float) -> None:
        if not result.consumed:
            return
        self._last_message_s = now
        if self._pending_since is None:
            self._pending_since = now
        counts = self._counts
        counts["consumed"] += result.consumed
        counts["duplicate"] += result.duplicates
        self._pending_messages += result.consumed
        partition_counts = self._partition_counts
        for key, events in result.partition_counts.items():
            partition_counts[key] = partition_counts.get(key, 0) + events
        if result.invalid:
            # Their offsets are already advanced in the batch; a dead-letter failure
            # stops the engine (_fail) before that batch can be flushed.
            self._pending_invalid += len(result.invalid)
            for message, reason in result.invalid:
                self._handle_invalid(message, reason)

    def _handle_invalid(
        self, message: Any, reason: str, position: tuple[str, int, int] | None = None
    ) -> None:
        """Count, log and dead-letter one invalid message (``position``: its topic,
        partition and offset, when ``message`` is a :class:`spr.dlq.SourceRecord`)."""
        if position is None:
            position = (message.topic(), message.partition(), message.offset())
        topic, partition, offset = position
        self._counts["invalid"] += 1
        self._invalid_log.warning(
            "invalid event at %s[%d]@%d: %s", topic, partition, offset, reason
        )
        dead_letters = self._dead_letters
        if dead_letters is None or self._fatal is not None:
            return
        try:
            with self._dead_letter_lock:
                dead_letters.send(message, reason)
        except DeadLetterUnavailable as exc:
            # Its offset must not be committed: stop before the batch holding it goes.
            self._fail(exc)
            return
        log_event(
            log,
            "dlq",
            error_class=str(ErrorClass.INVALID),
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
        )

    def _fail(self, exc: BaseException) -> None:
        """Stop with ``exc``: nothing more is flushed, committed or dead-lettered."""
        if self._fatal is None:
            self._fatal = exc
        self._stop.set()

    def _kafka_error(self, message: Any) -> None:
        """Classify one error ``message`` of a consume() result (design §4, §6)."""
        error = message.error()
        code = error.code()
        if code == _ERR_PARTITION_EOF:
            return
        self._counts["kafka_errors"] += 1
        if code in (_ERR_AUTO_OFFSET_RESET, _ERR_OFFSET_OUT_OF_RANGE):
            self._offset_out_of_range(message)
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

    def _unreadable_record(self, message: Any, error: Any) -> None:
        """A record the client could not read (bad CRC, compression...): dead-letter what
        is known of it (its position and the error), then move its offset forward, like
        an invalid event; without dead letters, stop (it would be skipped unseen)."""
        try:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
        except Exception:  # not tied to a record
            topic, partition, offset = None, -1, -1
        if topic is None or partition < 0 or offset < 0:
            self._kafka_log.warning("Kafka error (invalid): %s", error.str())
            return
        key = (topic, partition)
        if key not in self._assigned:
            return  # fetched before a revoke was served; the next owner reads it
        reason = f"Kafka could not read the record: {error.str()}"
        if self._dead_letters is None:
            self._fail(
                SprError(
                    f"{topic}[{partition}]@{offset}: {reason}; dead letters are turned off, "
                    "so spr stops instead of skipping it"
                )
            )
            return
        from spr.dlq import SourceRecord

        record = SourceRecord(topic=topic, partition=partition, offset=offset)
        self._handle_invalid(record, reason, (topic, partition, offset))
        if self._fatal is not None:
            return
        # Dead-lettered (flushed before the batch is handed off): now its offset moves.
        self._pending.advance(topic, partition, offset)
        self._pending_invalid += 1
        self._pending_messages += 1
        if self._pending_since is None:
            self._pending_since = self.clock.monotonic()

    def _offset_out_of_range(self, message: Any) -> None:
        """librdkafka found a fetch position below the log start (retention deleted
        events not applied yet) and, told ``auto.offset.reset=error``, stopped fetching
        the partition: apply ``on_offset_gap``, as at assignment (:meth:`_check_gap`)."""
        error = message.error()
        try:
            key = (message.topic(), message.partition())
            position = int(message.offset())
        except Exception:
            key, position = None, -1
        if key is None or key[0] is None or key not in self._assigned:
            if key is None or key[0] is None:
                raise ServerUnavailable(f"Kafka reported an offset out of range: {error.str()}")
            return
        if position < 0:
            position = self._committed.get(key, -1)
        try:
            low = self._watermarks([key], latest=False)[key]
        except Exception as exc:
            raise ServerUnavailable(
                f"{key[0]}[{key[1]}]: the fetch position {position} is out of range and "
                f"the log start cannot be read: {_first_line(exc)}"
            ) from exc
        if position < 0 or position >= low:
            # Not a retention gap (e.g. the end moved back): nothing was skipped yet.
            raise ServerUnavailable(
                f"{key[0]}[{key[1]}]: Kafka reported the fetch position {position} out of "
                f"range (log start {low}): {error.str()}"
            )
        if self.config.on_offset_gap != "fail":
            # Everything consumed below the gap is committed first: the gap's record
            # moves the stored offset past it.
            budget = self.config.flush_retry_s + 10.0
            if not self._drain(budget):
                self._raise_fatal()
                raise FlushFailed(
                    f"{key[0]}[{key[1]}]: could not flush before skipping a retention gap"
                )
        resume = self._check_gap(key, position, low)
        self._committed[key] = max(self._committed.get(key, -1), resume)
        self._start_offsets[key] = resume
        self._unresolved.discard(key)
        self._restart_fetch(key, resume)

    def _restart_fetch(self, key: TopicPartitionKey, offset: int) -> None:
        """Fetch ``key`` from ``offset`` again after librdkafka stopped it (a seek is
        refused in that state): re-assign it."""
        consumer = self._consumer
        part = _topic_partition(key[0], key[1], offset)
        if self._cooperative:
            consumer.incremental_unassign([_topic_partition(*key)])
            consumer.incremental_assign([part])
        else:
            keys = sorted(self._assigned)
            positions = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.position([_topic_partition(t, p) for t, p in keys])
            }
            assignment = []
            for other in keys:
                if other == key:
                    assignment.append(part)
                    continue
                at = positions.get(other, -1)
                if at is None or at < 0:
                    at = self._committed.get(
                        other, self._start_offsets.get(other, OFFSET_BEGINNING)
                    )
                assignment.append(_topic_partition(other[0], other[1], at))
            consumer.assign(assignment)
        if key in self._paused:
            consumer.pause([_topic_partition(*key)])

    # -- flushing ---------------------------------------------------------------------

    def _buffered_bytes(self) -> int:
        inflight = self._inflight
        return self._pending.nbytes + (inflight.batch.nbytes if inflight else 0)

    def _batch_full(self) -> bool:
        policy = self.config.batch
        pending = self._pending
        return pending.row_count >= policy.max_rows or pending.nbytes >= policy.max_bytes

    def _batch_due(self) -> bool:
        # Group commit: with no flush in flight the database is idle, so anything pending
        # goes now (at a low rate an event waits for one flush, not for max_age_ms);
        # while a flush runs, the next batch grows by itself, up to the batch policy's
        # limits, which is what lets the engine keep pace with the database under load.
        if not self._pending_messages:
            return False
        if self._inflight is None or self._batch_full() or self._stop.is_set():
            return True
        assert self._pending_since is not None
        age_ms = (self.clock.monotonic() - self._pending_since) * 1000.0
        return age_ms >= self.config.batch.max_age_ms

    def _service(self) -> None:
        """Collect a finished flush, hand off the next one, apply backpressure."""
        flusher = self._flusher
        assert flusher is not None
        self._raise_fatal()
        while True:
            try:
                outcome = flusher.results.get_nowait()
            except queue.Empty:
                break
            self._on_outcome(outcome)
        self._raise_fatal()
        self._check_stuck_flush()
        self._raise_fatal()
        self._drive_retry()
        self._tick_metrics()
        if self._inflight is None and self._batch_due() and self._breaker_allows():
            self._submit()
        elif self._inflight is not None and not self._paused and self._batch_full():
            # Flow control: the next batch is full, so wait for the flush instead of
            # fetching more. Blocking keeps librdkafka's prefetch (bounded by
            # queued.max.messages.kbytes), which a pause would drop; it lasts at most as
            # long as the longest pause would (max_cool_down_ms, far below
            # max.poll.interval.ms), and only a flush still running then leads to a
            # pause below, with consume() called meanwhile to stay in the group.
            block_s = self.config.backpressure.max_cool_down_ms / 1000.0
            if self._wait_inflight(self._inflight.started_s + block_s) and self._batch_due():
                self._submit()
        buffered = self._buffered_bytes()
        if buffered > self._counts["max_buffered_bytes"]:
            self._counts["max_buffered_bytes"] = buffered
        inflight = self._inflight
        age = None if inflight is None else self.clock.monotonic() - inflight.started_s
        pause = self._backpressure.update(
            inflight_age_s=age, buffered_bytes=buffered, batch_full=self._batch_full()
        )
        self._apply_pause(pause or self._holding())

    def _check_stuck_flush(self) -> None:
        """Stop when the flush attempt in flight has run far longer than the statement
        timeout allows: its connection is dead (a silent network drop), and waiting on
        it would hold the engine, uncommitted, for hours."""
        job = self._inflight
        if job is None or not job.running:
            return
        limit_s = self.config.statement_timeout_ms / 1000.0 + _FLUSH_WATCHDOG_MARGIN_S
        age_s = self.clock.monotonic() - max(job.attempt_s, job.started_s)
        if age_s > limit_s:
            # No cancel request: on a dead network it could block as long. The flush
            # thread is left behind (a daemon); whatever it may still commit is harmless.
            job.cancel.set()
            job.abandoned = True
            self._fail(
                FlushFailed(
                    f"a flush to PostgreSQL ({redact_dsn(self.config.dsn)}) has not "
                    f"answered for {age_s:.0f} s (statement_timeout is "
                    f"{self.config.statement_timeout_ms / 1000.0:g} s): the connection "
                    "looks dead; nothing more was committed"
                )
            )

    def _holding(self) -> bool:
        """Whether flushing is held up by failures: a flush waits for its retry, or the
        circuit breaker is not closed. All partitions stay paused meanwhile."""
        job = self._inflight
        return (job is not None and job.retry is not None) or (
            self._breaker.state is not CircuitState.CLOSED
        )

    def _breaker_allows(self) -> bool:
        """Whether a new flush may start now: always while the breaker is closed;
        otherwise only as its probe (a flush waiting for its retry normally is that
        probe, see :meth:`_drive_retry`; this covers a batch gathered after one was
        dropped by a rebalance)."""
        breaker = self._breaker
        return breaker.state is CircuitState.CLOSED or breaker.allow(self.clock.monotonic())

    def _drive_retry(self) -> None:
        """Resubmit a flush that waits for its retry once its backoff is over and the
        circuit breaker allows (in half-open state that attempt is the probe)."""
        job = self._inflight
        flusher = self._flusher
        if job is None or job.running or job.retry is None or flusher is None:
            return
        now = self.clock.monotonic()
        if not job.retry.ready(now) or not self._breaker.allow(now):
            return
        job.running = True
        job.attempt_s = now
        flusher.submit(job)

    def _submit(self) -> None:
        flusher = self._flusher
        assert flusher is not None and self._inflight is None
        if self._pending_invalid and self._dead_letters is not None:
            # Dead letters must be durable before the offsets past them are.
            try:
                with self._dead_letter_lock:
                    self._dead_letters.flush()
            except DeadLetterUnavailable as exc:
                self._fail(exc)
                self._raise_fatal()
        self._job_number += 1
        job = _FlushJob(
            number=self._job_number,
            batch=self._pending,
            events=self._pending.events_added,
            started_s=self.clock.monotonic(),
            cancel=threading.Event(),
            running=True,
            timestamps=self._pending_timestamps,
            weights=self._pending_weights,
        )
        self._pending = Batch(STATE_COLUMNS)
        self._pending_since = None
        self._pending_messages = 0
        self._pending_invalid = 0
        self._pending_timestamps = array("q")
        self._pending_weights = array("q")
        self._inflight = job
        flusher.submit(job)

    def _on_outcome(self, outcome: _FlushOutcome) -> None:
        job = outcome.job
        if job.abandoned:
            # A cancelled flush that finished after we stopped waiting for it: whatever
            # it committed is harmless (monotonic), and its rows were already written off.
            return
        job.running = False
        counts = self._counts
        now = self.clock.monotonic()
        if outcome.result is not None:
            if job is self._inflight:
                self._inflight = None
            result = outcome.result
            self._breaker.record_success(now)
            if job.retry is not None:
                log.warning("flush succeeded after %d retry(ies)", job.retry.attempts)
            counts["flushes"] += 1
            counts["applied"] += result.applied
            counts["stale"] += result.stale
            counts["rejected"] += result.rejected
            counts["collapsed"] += job.events - result.rows
            counts["flush_seconds_total"] += outcome.duration_s
            counts["flush_seconds_last"] = outcome.duration_s
            counts["flush_seconds_max"] = max(counts["flush_seconds_max"], outcome.duration_s)
            self._backpressure.flush_finished(outcome.duration_s)
            if self._metrics is not None:
                self._observe_flush(job, outcome.duration_s)
            for key, offset in result.offsets.items():
                if offset > self._committed.get(key, -1):
                    self._committed[key] = offset
            self._commit_kafka(sync=False, offsets=result.offsets)
            return
        if outcome.cancelled:
            if job is self._inflight:
                self._inflight = None
            return
        error = outcome.error
        assert error is not None
        error_class = classify(error)
        if error_class is ErrorClass.TRANSIENT:
            self._breaker.record_failure(now)
            if job.retry is None:
                job.retry = self._retry_policy.start(job.started_s)
            delay = job.retry.next_delay(now)
            if delay is not None:
                # The job stays in flight; _drive_retry resubmits it, partitions paused.
                counts["flush_retries"] += 1
                log.warning(
                    "flush failed (%s); retry %d in %.2f s",
                    _first_line(error),
                    job.retry.attempts,
                    delay,
                )
                return
            message = (
                f"PostgreSQL stayed unavailable for {self.config.flush_retry_s:g} s "
                f"({redact_dsn(self.config.dsn)}): {_first_line(error)}"
            )
        elif isinstance(error, DeadLetterUnavailable):
            message = str(error)
        elif error_class is ErrorClass.DATA:
            message = (
                f"PostgreSQL rejected a row and dead letters are turned off: {_first_line(error)}"
            )
        else:
            message = f"a flush to PostgreSQL failed: {_first_line(error)}"
        if job is self._inflight:
            self._inflight = None
        self._fail(
            error if isinstance(error, DeadLetterUnavailable) else FlushFailed(message, error)
        )

    def _wait_inflight(self, deadline_s: float) -> bool:
        """Block until the in-flight flush reports, or ``deadline_s``; True when done."""
        flusher = self._flusher
        while self._inflight is not None:
            remaining = deadline_s - self.clock.monotonic()
            if remaining <= 0 or flusher is None:
                return False
            self._drive_retry()
            waiting = not self._inflight.running
            try:
                outcome = flusher.results.get(timeout=min(remaining, 0.05 if waiting else 0.2))
            except queue.Empty:
                continue
            self._on_outcome(outcome)
        return True

    def _drain(self, budget_s: float) -> bool:
        """Flush everything consumed so far and wait for it, within ``budget_s``.

        Returns False when the budget ran out or a flush failed (the caller rolls back).
        """
        deadline = self.clock.monotonic() + budget_s
        if not self._wait_inflight(deadline):
            return False
        if self._fatal is not None:
            return False
        if self._pending_messages:
            self._submit()
            if not self._wait_inflight(deadline):
                return False
        return self._fatal is None

    def _abandon(self) -> None:
        """Drop all uncommitted work: cancel the in-flight flush, clear the waiting batch
        and the ring, and rewind every partition to its committed offset.

        The partitions still owned are seeked now; all are also marked ``_rewound``, so
        that what the current consume() call returns for them (possibly fetched before
        this callback) is discarded and they are seeked again once it returns. That
        covers an eager rebalance, which revokes and re-assigns in one consume() call.
        """
        job = self._inflight
        flusher = self._flusher
        if job is not None and not job.running:
            # Waiting for a retry: nothing of it is in the database's hands.
            job.cancel.set()
            self._inflight = None
        elif job is not None and flusher is not None:
            flusher.cancel(job)
            if not self._wait_inflight(self.clock.monotonic() + 5.0):
                # It may still commit later; that is a zombie write, and harmless.
                job.abandoned = True
                self._inflight = None
        self._counts["rollbacks"] += 1
        self._pending = Batch(STATE_COLUMNS)
        self._pending_since = None
        self._pending_messages = 0
        self._pending_invalid = 0
        self._ring.clear()
        for key in self._assigned:
            self._rewound.add(key)
            if key not in self._committed and key in self._unresolved:
                # Nothing consumed from it yet (it would be resolved): its position is
                # still where it started; a seek to the logical end would skip ahead.
                continue
            offset = self._committed.get(key, self._start_offsets.get(key, OFFSET_BEGINNING))
            try:
                self._consumer.seek(_topic_partition(key[0], key[1], offset))
            except Exception as exc:  # re-seeked after the current consume() returns
                log.debug("seek %s failed: %s", key, exc)

    def _reseek(self, messages: list[Any]) -> list[Any]:
        """Drop what one consume() returned for rewound partitions (some of it may
        predate the seek made inside a callback) and seek them again, now outside any
        callback, so that their next message is the committed offset."""
        rewound, self._rewound = self._rewound, set()
        kept = [
            m
            for m in messages
            if m.error() is not None or (m.topic(), m.partition()) not in rewound
        ]
        for key in rewound:
            if key not in self._assigned:
                continue
            if key not in self._committed and key in self._unresolved:
                continue  # nothing consumed from it yet (see _abandon)
            offset = self._committed.get(key, self._start_offsets.get(key, OFFSET_BEGINNING))
            try:
                self._consumer.seek(_topic_partition(key[0], key[1], offset))
            except Exception as exc:
                raise ServerUnavailable(f"cannot rewind {key[0]}[{key[1]}]: {exc}") from exc
        return kept

    def _commit_kafka(
        self, *, sync: bool, offsets: Mapping[TopicPartitionKey, int] | None = None
    ) -> None:
        """Mirror durable offsets to Kafka for lag tools; never authoritative."""
        source = self._committed if offsets is None else offsets
        owned = [
            _topic_partition(t, p, o) for (t, p), o in source.items() if (t, p) in self._assigned
        ]
        if not owned or self._consumer is None:
            return
        try:
            self._consumer.commit(offsets=owned, asynchronous=not sync)
        except Exception as exc:  # informational only: the database holds the truth
            log.debug("Kafka offset commit failed: %s", exc)

    # -- pause / resume ---------------------------------------------------------------

    def _apply_pause(self, pause: bool) -> None:
        consumer = self._consumer
        if pause:
            todo = self._assigned - self._paused
            if todo:
                if not self._paused:
                    self._counts["pauses"] += 1
                    # Backpressure pauses come and go many times a second under load;
                    # a pause held by failures is worth an INFO line.
                    self._pause_level = logging.INFO if self._holding() else logging.DEBUG
                    log_event(
                        log,
                        "pause",
                        level=self._pause_level,
                        reason=self._pause_reason(),
                        partitions=len(todo),
                    )
                try:
                    consumer.pause([_topic_partition(t, p) for t, p in sorted(todo)])
                    self._paused |= todo
                except Exception as exc:
                    log.debug("pause failed: %s", exc)
        elif self._paused:
            todo = self._paused & self._assigned
            try:
                if todo:
                    consumer.resume([_topic_partition(t, p) for t, p in sorted(todo)])
                    # librdkafka does not wake its broker threads on resume; they notice
                    # up to a second later. Any request to the broker wakes them now.
                    consumer.list_topics(self.config.topics[0], timeout=1.0)
            except Exception as exc:
                log.debug("resume failed: %s", exc)
            log_event(log, "resume", level=self._pause_level, partitions=len(todo))
            self._paused = set()
            self._counts["resumes"] += 1

    def _pause_reason(self) -> str:
        if self._breaker.state is not CircuitState.CLOSED:
            return f"circuit {self._breaker.state.name.lower()}"
        if self._inflight is not None and self._inflight.retry is not None:
            return "flush retry"
        return self._backpressure.reason

    # -- rebalance callbacks (run inside consume(), on this thread) ------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._counts["rebalances"] += 1
            keys = [(p.topic, p.partition) for p in partitions]
            start = self._start_positions(keys)
            assignment = [_topic_partition(t, p, start[(t, p)]) for t, p in keys]
            if self._cooperative:
                consumer.incremental_assign(assignment)
                self._assigned |= set(keys)
            else:
                consumer.assign(assignment)
                self._assigned = set(keys)
                self._paused.clear()
            # librdkafka does not carry pause state across assignments: re-apply ours.
            if (self._backpressure.paused or self._holding()) and keys:
                consumer.pause([_topic_partition(t, p) for t, p in keys])
                self._paused |= set(keys)
            log_event(log, "rebalance", change="assign", partitions=_describe(keys))
        except BaseException as exc:
            self._fatal = exc
            self._stop.set()

    def _start_positions(self, keys: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Where each newly assigned partition starts: the database's offset, or
        ``auto.offset.reset`` when the database has never seen the partition."""
        stored = self._load_offsets_retrying(sorted({t for t, _ in keys}))
        reset = self._offset_reset
        fallback = OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING
        known = [key for key in keys if key in stored]
        try:
            log_starts = self._watermarks(known, latest=False) if known else {}
        except Exception as exc:  # no answer: the fetcher reports a gap (_kafka_error)
            log.debug("log start offsets unavailable: %s", exc)
            log_starts = {}
        ends: dict[TopicPartitionKey, int] = {}
        unknown = [key for key in keys if key not in stored]
        if unknown and fallback == OFFSET_END:
            # A real offset, so that a rollback rewinds to where this owner started, not
            # to a later end of the log (which would skip what it consumed meanwhile).
            try:
                ends = self._watermarks(unknown, latest=True)
            except Exception as exc:
                log.debug("end offsets unavailable: %s", exc)
        start: dict[TopicPartitionKey, int] = {}
        for key in keys:
            offset = stored.get(key)
            if offset is None:
                if reset == "error":
                    raise ConfigError(
                        f"the database has no offset for {key[0]}[{key[1]}] and "
                        "auto.offset.reset is 'error'"
                    )
                resolved = ends.get(key, -1)
                start[key] = resolved if resolved >= 0 else fallback
                if start[key] == OFFSET_END:
                    self._unresolved.add(key)
                else:
                    self._unresolved.discard(key)
                self._committed.pop(key, None)
            else:
                start[key] = self._check_gap(key, offset, log_starts.get(key, -1))
                # A skipped gap moved the stored offset forward (see _check_gap).
                self._committed[key] = max(offset, start[key])
                self._unresolved.discard(key)
            self._start_offsets[key] = start[key]
        return start

    def _check_gap(self, key: TopicPartitionKey, offset: int, low: int) -> int:
        """Refuse to skip events deleted by retention, unless on_offset_gap allows it."""
        if low < 0 or offset >= low:
            return offset
        gap = low - offset
        choice = self.config.on_offset_gap
        if choice == "fail":
            raise ConfigError(
                f"{key[0]}[{key[1]}]: the stored offset {offset} is below the log start "
                f"{low}, so {gap} event(s) were deleted by retention before being applied; "
                "set on_offset_gap to 'earliest' or 'latest' to skip them"
            )
        if choice == "earliest":
            resume = low
        else:
            resume = max(low, self._watermarks([key], latest=True)[key])
        self._counts["offset_gaps"] += 1
        self._counts["offset_gap_events"] += gap
        log_event(
            log,
            "offset_gap",
            level=logging.WARNING,
            topic=key[0],
            partition=key[1],
            stored_offset=offset,
            log_start=low,
            gap_events=gap,
            on_offset_gap=choice,
            resume_offset=resume,
        )
        control = self._control
        if control is not None:
            # Recorded, and the stored offset moved past the gap, before anything after
            # it can be applied; a failure stops the engine (nothing is skipped unseen).
            control.record_offset_gap(
                self.config.group_id,
                key[0],
                key[1],
                stored_offset=offset,
                log_start=low,
                resumed_at=choice,
                resume_offset=resume,
            )
        return resume

    def _admin_client(self) -> Any:
        """An AdminClient for offset look-ups. The consumer's own connection would queue
        them behind its long-poll fetch (up to fetch.wait.max.ms each)."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            conf = {
                k: v for k, v in self._consumer_conf.items() if k.startswith(_ADMIN_KEY_PREFIXES)
            }
            self._admin = AdminClient(conf)
        return self._admin

    def _watermarks(
        self, keys: Sequence[TopicPartitionKey], *, latest: bool
    ) -> dict[TopicPartitionKey, int]:
        """End (``latest``) or log-start offsets of ``keys``, in one request."""
        # OffsetSpec is re-exported without __all__, and untyped.
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        spec = (
            OffsetSpec.latest()  # type: ignore[no-untyped-call]
            if latest
            else OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        )
        futures = self._admin_client().list_offsets(
            {_topic_partition(t, p): spec for t, p in keys},
            request_timeout=self.config.connect_timeout_s,
        )
        return {
            (tp.topic, tp.partition): int(f.result(timeout=self.config.connect_timeout_s).offset)
            for tp, f in futures.items()
        }

    def _load_offsets_retrying(self, topics: list[str]) -> dict[TopicPartitionKey, int]:
        control = self._control
        assert control is not None
        budget = self.config.effective_revoke_budget_ms / 1000.0
        policy = replace(self._retry_policy, max_delay=1.0, max_elapsed=budget)
        try:
            # Blocking is fine here: this runs inside a rebalance callback, within budget.
            return policy.call(
                lambda: control.load_offsets(self.config.group_id, topics),
                should_retry=lambda exc: classify(exc) is ErrorClass.TRANSIENT,
                clock=SystemClock(),
            )
        except Exception as exc:
            raise ServerUnavailable(
                f"cannot read offsets from PostgreSQL ({redact_dsn(self.config.dsn)}): "
                f"{_first_line(exc)}"
            ) from exc

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            keys = {(p.topic, p.partition) for p in partitions}
            self._counts["rebalances"] += 1
            self._counts["partitions_revoked"] += len(keys)
            log_event(log, "rebalance", change="revoke", partitions=_describe(sorted(keys)))
            if self._fatal is None:
                budget = self.config.effective_revoke_budget_ms / 1000.0
                if not self._drain(budget):
                    log.warning("revoke: flush did not finish within %.1f s; rolled back", budget)
                    self._abandon()
            self._release(consumer, keys)
        except BaseException as exc:
            self._fatal = exc
            self._stop.set()

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            keys = {(p.topic, p.partition) for p in partitions}
            self._counts["rebalances"] += 1
            self._counts["partitions_lost"] += len(keys)
            log_event(
                log,
                "rebalance",
                level=logging.WARNING,
                change="lost",
                partitions=_describe(sorted(keys)),
                note="dropping their in-flight work",
            )
            self._abandon()
            self._release(consumer, keys)
        except BaseException as exc:
            self._fatal = exc
            self._stop.set()

    def _release(self, consumer: Any, keys: set[TopicPartitionKey]) -> None:
        try:
            if self._cooperative:
                consumer.incremental_unassign([_topic_partition(t, p) for t, p in sorted(keys)])
            else:
                consumer.unassign()
        except Exception as exc:  # e.g. during close(): the client unassigns itself
            log.debug("unassign failed: %s", exc)
        self._assigned -= keys
        self._paused -= keys
        for key in keys:
            self._committed.pop(key, None)
            self._start_offsets.pop(key, None)
            self._unresolved.discard(key)
            self._local.forget_partition(*key)
        if not self._assigned:
            self._backpressure.reset()

    # -- start-up, idle exit, shutdown ------------------------------------------------

    def _probe_topics(self) -> None:
        try:
            metadata = self._consumer.list_topics(timeout=self.config.connect_timeout_s)
        except Exception as exc:
            raise ServerUnavailable(
                f"cannot reach Kafka at {self.config.bootstrap}: {_first_line(exc)}"
            ) from exc
        for topic in self.config.topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                raise ConfigError(f"topic {topic} does not exist on {self.config.bootstrap}")

    def _idle_and_caught_up(self) -> bool:
        now = self.clock.monotonic()
        idle_exit_s = self.config.idle_exit_s
        assert idle_exit_s is not None
        if now - self._last_message_s < idle_exit_s:
            return False
        if self._inflight is not None or self._pending_messages:
            return False
        if now - self._last_lag_check_s < 1.0:
            return False
        self._last_lag_check_s = now
        try:
            return self._group_lag() == 0
        except Exception as exc:  # a server hiccup only delays the exit
            log.debug("lag check failed: %s", exc)
            return False

    def _group_lag(self) -> int:
        """Sum over every partition of the topics of end offset - stored offset."""
        control = self._control
        assert control is not None
        metadata = self._admin_client().list_topics(timeout=self.config.connect_timeout_s)
        keys = [
            (topic, partition)
            for topic in self.config.topics
            for partition in metadata.topics[topic].partitions
        ]
        ends = self._watermarks(keys, latest=True)
        starts = self._watermarks(keys, latest=False)
        stored = control.load_offsets(self.config.group_id, self.config.topics)
        return sum(max(0, ends[key] - stored.get(key, starts[key])) for key in keys)

    def _raise_fatal(self) -> None:
        fatal = self._fatal
        if fatal is None:
            return
        if isinstance(fatal, (SprError, KeyboardInterrupt, SystemExit)):
            raise fatal
        raise SprError(f"the engine stopped: {_first_line(fatal)}") from fatal

    def _shutdown(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            if self._fatal is not None:
                # Write nothing more: close() serves a final revoke, which must not flush.
                self._pending = Batch(STATE_COLUMNS)
                self._pending_messages = 0
            try:
                self._consumer = consumer
                consumer.close()
            except Exception as exc:
                log.debug("consumer close failed: %s", exc)
            finally:
                self._consumer = None
        if self._flusher is not None:
            self._flusher.close()
        if self._control is not None:
            self._control.close()

    # -- dead letters from the flush thread -------------------------------------------

    def _dead_letter_rows(self, rows: Sequence[RejectedRow]) -> None:
        """Dead-letter rows the database rejected (class DATA); runs on the flush thread,
        inside the flush's transaction, and blocks until Kafka acknowledged them all.

        The batch keeps no messages (that would cost an object per event in the hot
        loop), so the original key, value and headers are read back from Kafka by
        position; a message that is gone (retention) is rebuilt from the row: its
        partition key and payload, without headers. Raises DeadLetterUnavailable.
        """
        dead_letters = self._dead_letters
        assert dead_letters is not None
        from spr.dlq import SourceRecord

        originals = self._fetch_originals([(r.topic, r.partition, r.offset) for r in rows])
        with self._dead_letter_lock:
            for row in rows:
                record = originals.get((row.topic, row.partition, row.offset))
                if record is None:
                    record = SourceRecord(
                        topic=row.topic,
                        partition=row.partition,
                        offset=row.offset,
                        key=row.key,
                        value=row.value,
                    )
                reason = error_reason(row.error)
                dead_letters.send(record, reason, error_class=str(ErrorClass.DATA))
                log_event(
                    log,
                    "dlq",
                    level=logging.WARNING,
                    error_class=str(ErrorClass.DATA),
                    topic=row.topic,
                    partition=row.partition,
                    offset=row.offset,
                    reason=reason,
                )
            dead_letters.flush()

    def _fetch_originals(self, positions: Sequence[tuple[str, int, int]]) -> dict[Any, Any]:
        """The messages at ``positions`` as :class:`spr.dlq.SourceRecord`, read with a
        throw-away consumer (no group); missing ones are left out. Blocks up to
        ``connect_timeout_s`` + 5 s; never raises."""
        from confluent_kafka import Consumer

        from spr.dlq import SourceRecord

        wanted = set(positions)
        found: dict[Any, Any] = {}
        if not wanted:
            return found
        conf = {k: v for k, v in self._consumer_conf.items() if k.startswith(_ADMIN_KEY_PREFIXES)}
        conf.update(
            {
                "group.id": f"{self.config.group_id}.spr-dlq-read",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "logger": logging.getLogger("spr.kafka"),
            }
        )
        starts: dict[TopicPartitionKey, int] = {}
        for topic, partition, offset in wanted:
            starts[(topic, partition)] = min(offset, starts.get((topic, partition), offset))
        ends = {key: max(o for t, p, o in wanted if (t, p) == key) for key in starts}
        reader = None
        try:
            reader = Consumer(conf)
            reader.assign([_topic_partition(t, p, o) for (t, p), o in starts.items()])
            deadline = time.monotonic() + self.config.connect_timeout_s + 5.0
            done: set[TopicPartitionKey] = set()
            while len(done) < len(starts) and time.monotonic() < deadline:
                messages: list[Any] = reader.consume(500, 0.5)
                for message in messages:
                    key = (message.topic(), message.partition())
                    error = message.error()
                    if error is not None:
                        if error.code() == _ERR_PARTITION_EOF:
                            done.add(key)
                        continue
                    position = (key[0], key[1], message.offset())
                    if position in wanted:
                        found[position] = SourceRecord.from_message(message)
                    if message.offset() >= ends.get(key, -1):
                        done.add(key)
        except Exception as exc:  # the rows' own data is the fallback
            log.warning("cannot read rejected messages back from Kafka: %s", _first_line(exc))
        finally:
            if reader is not None:
                try:
                    reader.close()
                except Exception as exc:
                    log.debug("closing the dead-letter reader failed: %s", exc)
        return found

    # -- circuit breaker and metrics ----------------------------------------------------

    def _on_circuit_change(self, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.OPEN and old is CircuitState.CLOSED:
            self._counts["circuit_opens"] += 1
        log_event(
            log,
            "circuit",
            level=logging.WARNING if new is CircuitState.OPEN else logging.INFO,
            old=old.name.lower(),
            new=new.name.lower(),
            failure_rate=round(self._breaker.failure_rate, 3),
        )

    def _sample_timestamps(self, messages: Sequence[Any], added: int) -> None:
        """Record broker timestamps for the latency histogram, for ``added`` events of
        one consume() call: the first, middle and last message stand for all of them
        (weights split evenly), so the hot loop pays three calls per batch, not one
        per event."""
        if self._metrics is None or not messages:
            return
        samples = (messages[0], messages[len(messages) // 2], messages[-1])
        share, extra = divmod(added, len(samples))
        for i, message in enumerate(samples):
            weight = share + (1 if i < extra else 0)
            if weight:
                timestamp = message.timestamp()[1]
                if timestamp > 0:
                    self._pending_timestamps.append(timestamp)
                    self._pending_weights.append(weight)

    def _observe_flush(self, job: _FlushJob, duration_s: float) -> None:
        local = self._local
        local.observe_flush(duration_s)
        if job.timestamps:
            assert job.weights is not None
            commit_ms = time.time() * 1000.0
            for timestamp, weight in zip(job.timestamps, job.weights, strict=True):
                local.observe_latency(max(commit_ms - timestamp, 0.0) / 1000.0, weight)

    def _tick_metrics(self) -> None:
        """About once a second (the publisher's interval): publish the counters."""
        publisher = self._metrics
        if publisher is None:
            return
        now = time.monotonic()
        if now - self._metrics_last_s < publisher.interval_s:
            return
        self._metrics_last_s = now
        self._publish_metrics()

    def _publish_metrics(self) -> None:
        """Fold counter deltas, circuit state, lag and per-partition counts into the
        local stats and publish them. Runs on the engine's thread; never raises."""
        publisher = self._metrics
        if publisher is None:
            return
        local = self._local
        try:
            current = self.stats().as_dict()
            fold_engine_counters(local, self._metrics_previous, current)
            self._metrics_previous = current
            local.circuit_state = int(self._breaker.state)
            # Maintained by _process (events per partition since the last tick).
            counts: dict[TopicPartitionKey, int] | None = getattr(self, "_partition_counts", None)
            if counts:
                for (topic, partition), events in counts.items():
                    local.count_partition_events(topic, partition, events)
                counts.clear()
            self._update_lag(local)
            publisher.publish(local)
        except Exception as exc:  # metrics must never stop the engine
            log.debug("publishing metrics failed: %s", exc)

    def _update_lag(self, local: LocalStats) -> None:
        consumer = self._consumer
        if consumer is None or not self._assigned:
            return
        keys = sorted(self._assigned)
        positions = consumer.position([_topic_partition(t, p) for t, p in keys])
        for tp in positions:
            key = (tp.topic, tp.partition)
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            position = tp.offset if tp.offset >= 0 else self._committed.get(key, -1)
            if high >= 0 and position >= 0:
                local.set_lag(tp.topic, tp.partition, max(0, high - position))
        if not self._retention_checked:
            self._retention_checked = True
            local.retention_seconds.update(self._retention_seconds())

    def _retention_seconds(self) -> dict[str, float]:
        """Each topic's ``retention.ms`` in seconds (absent when infinite); one request."""
        from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

        resources = [ConfigResource("topic", topic) for topic in self.config.topics]
        result: dict[str, float] = {}
        try:
            futures = self._admin_client().describe_configs(
                resources, request_timeout=self.config.connect_timeout_s
            )
            for resource, future in futures.items():
                entry = future.result(timeout=self.config.connect_timeout_s).get("retention.ms")
                if entry is not None and entry.value is not None and int(entry.value) > 0:
                    result[resource.name] = int(entry.value) / 1000.0
        except Exception as exc:
            log.debug("topic retention unavailable: %s", exc)
        return result


def _describe(keys: Sequence[TopicPartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(keys)) or "none"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
