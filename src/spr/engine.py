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
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from spr.batch import STATE_COLUMNS, Batch
from spr.clock import Clock, SystemClock
from spr.config import BackpressurePolicy, EngineConfig, uses_cooperative_rebalance
from spr.decode import DEFAULT_LIMITS, DecodeLimits, decode_batch
from spr.dedup import IdempotencyRing, event_fingerprint
from spr.errors import ConfigError, ServerUnavailable, SprError
from spr.sink.postgres import FlushResult, PostgresSink, is_transient, redact_dsn

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
    """Where invalid events go (issue 6 implements it with a ``<topic>.dlq`` topic).

    ``send`` is called on the engine's thread for each invalid message, in consumption
    order, before its offset is added to a batch. ``flush`` is called before a batch that
    holds such offsets is handed to the database, and must block until every sent dead
    letter is durable, or raise (the engine then stops without committing the batch).
    """

    def send(self, message: Any, reason: str) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """A snapshot of the engine's local counters (another issue publishes them).

    ``consumed`` counts data messages taken from Kafka; each ends as ``duplicate``
    (dropped by the ring), ``invalid`` (offset advanced, handed to the dead-letter hook),
    or a batch event, which the flush turns into ``applied`` rows, ``stale`` rows (the
    guard kept a newer stored sequence) or ``collapsed`` (superseded within its batch).
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
    * ``full``: the waiting batch is full while a flush is in flight (flow control,
      lifted as soon as the batch can be handed off);
    * ``slow``: the flush in flight has run longer than ``slow_flush_ms``. Held for a
      cool-down; if the sink is still slow when it expires, the cool-down doubles (up to
      ``max_cool_down_ms``); a fast flush resets it.
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
        slow = inflight_age_s is not None and inflight_age_s * 1000.0 > policy.slow_flush_ms
        if buffered_bytes >= policy.memory_bound_bytes:
            self._memory_hold = True
        elif buffered_bytes <= policy.memory_bound_bytes * policy.resume_ratio:
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
        elif batch_full and inflight_age_s is not None:
            reason = "full"
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
    number: int
    batch: Batch
    events: int
    started_s: float
    cancel: threading.Event
    abandoned: bool = False


@dataclass(eq=False)
class _FlushOutcome:
    job: _FlushJob
    result: FlushResult | None
    error: BaseException | None
    cancelled: bool
    duration_s: float
    retries: int


class _Flusher:
    """The dedicated flush thread: one job at a time, in submission order.

    It owns its own sink (and so its own connection). Transient errors are retried with
    exponential backoff and full jitter, reconnecting, within ``retry_budget_s``;
    a job whose ``cancel`` event is set stops retrying and reports ``cancelled``.
    """

    def __init__(self, sink: PostgresSink, *, retry_budget_s: float, clock: Clock) -> None:
        self.sink = sink
        self.retry_budget_s = retry_budget_s
        self.clock = clock
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
        retries = 0
        delay = 0.05
        while True:
            if job.cancel.is_set():
                return _FlushOutcome(job, None, None, True, time.monotonic() - start, retries)
            try:
                result = self.sink.flush(job.batch)
                return _FlushOutcome(job, result, None, False, time.monotonic() - start, retries)
            except Exception as exc:
                elapsed = time.monotonic() - start
                if job.cancel.is_set():
                    return _FlushOutcome(job, None, exc, True, elapsed, retries)
                if not is_transient(exc) or elapsed >= self.retry_budget_s:
                    return _FlushOutcome(job, None, exc, False, elapsed, retries)
                retries += 1
                log.warning("flush failed (%s); retry %d", _first_line(exc), retries)
                job.cancel.wait(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)


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

    ``consumer_factory`` and ``sink_factory`` exist for tests (fakes); ``on_invalid`` /
    ``dead_letters`` receive invalid messages (see :class:`DeadLetterSink`).
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
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self._consumer_factory = consumer_factory or _default_consumer_factory
        self._sink_factory = sink_factory or self._default_sink
        self._dead_letters = dead_letters
        self._limits = decode_limits
        self._consumer_conf = config.consumer_config()
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
        self._pending = Batch(STATE_COLUMNS)
        self._pending_since: float | None = None
        self._pending_messages = 0
        self._pending_invalid = 0
        self._inflight: _FlushJob | None = None
        self._job_number = 0
        self._last_message_s = 0.0
        self._last_lag_check_s = 0.0
        self._counts: dict[str, Any] = EngineStats().as_dict()

    def _default_sink(self) -> PostgresSink:
        c = self.config
        return PostgresSink(
            c.dsn,
            group_id=c.group_id,
            mapping=c.mapping,
            statement_timeout_ms=c.statement_timeout_ms,
            connect_timeout_s=c.connect_timeout_s,
            application_name=f"spr:{c.group_id}",
        )

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
        return EngineStats(**counts)

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
                self._sink_factory(), retry_budget_s=config.flush_retry_s, clock=self.clock
            )
            consumer.subscribe(
                list(config.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._last_message_s = self.clock.monotonic()
            self._loop()
            if self._fatal is None:
                self._drain(config.flush_retry_s + 10.0)
            self._raise_fatal()
            self._commit_kafka(sync=True)
        finally:
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
            if self._rewound:
                messages = self._reseek(messages)
            if messages:
                if max_events is not None:
                    room = max_events - self._counts["consumed"]
                    messages = self._truncate(messages, room)
                self._process(messages)
                if max_events is not None and self._counts["consumed"] >= max_events:
                    self._stop.set()
            self._service()
            if config.idle_exit_s is not None and self._idle_and_caught_up():
                log.info("idle for %.1f s with no lag: exiting", config.idle_exit_s)
                self._stop.set()

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
        assigned = self._assigned
        values: list[bytes | None] = []
        offsets: list[int] = []
        timestamps: list[int] = []
        data: list[Any] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._kafka_error(error)
                continue
            if (message.topic(), message.partition()) not in assigned:
                # Fetched before a revoke was served; the next owner reads it.
                continue
            data.append(message)
            values.append(message.value())
            offsets.append(message.offset())
            timestamps.append(message.timestamp()[1])
        if not data:
            return
        now = self.clock.monotonic()
        self._last_message_s = now
        if self._pending_since is None:
            self._pending_since = now
        counts = self._counts
        counts["consumed"] += len(data)
        events, invalid = decode_batch(values, offsets, timestamps, self._limits)
        pending = self._pending
        if invalid:
            for index, reason in invalid:
                message = data[index]
                self._handle_invalid(message, reason)
                pending.advance(message.topic(), message.partition(), offsets[index])
            self._pending_invalid += len(invalid)
        fingerprints = []
        positions = []
        for index, event in enumerate(events):
            if event is not None:
                fingerprints.append(
                    event_fingerprint(event.entity_type, event.entity_id, event.sequence)
                )
                positions.append(index)
        seen = self._ring.seen_or_add_many(fingerprints, int(now * 1000))
        duplicates = 0
        for index, was_seen in zip(positions, seen, strict=True):
            message = data[index]
            if was_seen:
                duplicates += 1
                pending.advance(message.topic(), message.partition(), offsets[index])
            else:
                event = events[index]
                assert event is not None
                pending.add(event, message.topic(), message.partition(), offsets[index])
        counts["duplicate"] += duplicates
        self._pending_messages += len(data)

    def _handle_invalid(self, message: Any, reason: str) -> None:
        self._counts["invalid"] += 1
        self._invalid_log.warning(
            "invalid event at %s[%d]@%d: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
        )
        if self._dead_letters is not None:
            self._dead_letters.send(message, reason)

    def _kafka_error(self, error: Any) -> None:
        code = error.code()
        if code == _ERR_PARTITION_EOF:
            return
        self._counts["kafka_errors"] += 1
        if error.fatal():
            raise ServerUnavailable(f"Kafka reported a fatal error: {error.str()}")
        if code in (_ERR_UNKNOWN_TOPIC, _ERR_UNKNOWN_TOPIC_OR_PART):
            self._kafka_log.warning("Kafka: %s", error.str())
            return
        self._kafka_log.warning("Kafka error (retried by the client): %s", error.str())

    # -- flushing ---------------------------------------------------------------------

    def _buffered_bytes(self) -> int:
        inflight = self._inflight
        return self._pending.nbytes + (inflight.batch.nbytes if inflight else 0)

    def _batch_full(self) -> bool:
        policy = self.config.batch
        pending = self._pending
        return pending.row_count >= policy.max_rows or pending.nbytes >= policy.max_bytes

    def _batch_due(self) -> bool:
        if not self._pending_messages:
            return False
        if self._batch_full() or self._stop.is_set():
            return True
        assert self._pending_since is not None
        age_ms = (self.clock.monotonic() - self._pending_since) * 1000.0
        return age_ms >= self.config.batch.max_age_ms

    def _service(self) -> None:
        """Collect a finished flush, hand off the next one, apply backpressure."""
        flusher = self._flusher
        assert flusher is not None
        while True:
            try:
                outcome = flusher.results.get_nowait()
            except queue.Empty:
                break
            self._on_outcome(outcome)
        if self._inflight is None and self._batch_due():
            self._submit()
        elif self._inflight is not None and not self._paused and self._batch_full():
            # Flow control: the next batch is full, so wait for the flush instead of
            # fetching more. A short wait is far cheaper than a pause (which drops the
            # prefetch); only a flush slower than slow_flush_ms leads to a pause below.
            slow_s = self.config.backpressure.slow_flush_ms / 1000.0
            if self._wait_inflight(self._inflight.started_s + slow_s) and self._batch_due():
                self._submit()
        buffered = self._buffered_bytes()
        if buffered > self._counts["max_buffered_bytes"]:
            self._counts["max_buffered_bytes"] = buffered
        inflight = self._inflight
        age = None if inflight is None else self.clock.monotonic() - inflight.started_s
        pause = self._backpressure.update(
            inflight_age_s=age, buffered_bytes=buffered, batch_full=self._batch_full()
        )
        self._apply_pause(pause)

    def _submit(self) -> None:
        flusher = self._flusher
        assert flusher is not None and self._inflight is None
        if self._pending_invalid and self._dead_letters is not None:
            # Dead letters must be durable before the offsets past them are.
            self._dead_letters.flush()
        self._job_number += 1
        job = _FlushJob(
            number=self._job_number,
            batch=self._pending,
            events=self._pending.events_added,
            started_s=self.clock.monotonic(),
            cancel=threading.Event(),
        )
        self._pending = Batch(STATE_COLUMNS)
        self._pending_since = None
        self._pending_messages = 0
        self._pending_invalid = 0
        self._inflight = job
        flusher.submit(job)

    def _on_outcome(self, outcome: _FlushOutcome) -> None:
        job = outcome.job
        if job.abandoned:
            # A cancelled flush that finished after we stopped waiting for it: whatever
            # it committed is harmless (monotonic), and its rows were already written off.
            return
        if job is self._inflight:
            self._inflight = None
        counts = self._counts
        counts["flush_retries"] += outcome.retries
        if outcome.result is not None:
            result = outcome.result
            counts["flushes"] += 1
            counts["applied"] += result.applied
            counts["stale"] += result.stale
            counts["collapsed"] += job.events - result.rows
            counts["flush_seconds_total"] += outcome.duration_s
            counts["flush_seconds_last"] = outcome.duration_s
            counts["flush_seconds_max"] = max(counts["flush_seconds_max"], outcome.duration_s)
            self._backpressure.flush_finished(outcome.duration_s)
            for key, offset in result.offsets.items():
                if offset > self._committed.get(key, -1):
                    self._committed[key] = offset
            self._commit_kafka(sync=False, offsets=result.offsets)
            return
        if outcome.cancelled:
            return
        error = outcome.error
        assert error is not None
        if isinstance(error, ServerUnavailable) or is_transient(error):
            message = (
                f"PostgreSQL stayed unavailable for {self.config.flush_retry_s:g} s "
                f"({redact_dsn(self.config.dsn)}): {_first_line(error)}"
            )
        else:
            message = f"a flush to PostgreSQL failed: {_first_line(error)}"
        self._fatal = FlushFailed(message, error)

    def _wait_inflight(self, deadline_s: float) -> bool:
        """Block until the in-flight flush reports, or ``deadline_s``; True when done."""
        flusher = self._flusher
        while self._inflight is not None:
            remaining = deadline_s - self.clock.monotonic()
            if remaining <= 0 or flusher is None:
                return False
            try:
                outcome = flusher.results.get(timeout=min(remaining, 0.2))
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
        if job is not None and flusher is not None:
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
            offset = self._committed.get(key, self._start_offsets.get(key, OFFSET_BEGINNING))
            try:
                self._consumer.seek(_topic_partition(key[0], key[1], offset))
            except Exception as exc:  # re-seeked after the current consume() returns
                log.debug("seek %s failed: %s", key, exc)
            self._rewound.add(key)

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
                    log.debug("pausing (%s)", self._backpressure.reason)
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
            self._paused = set()
            self._counts["resumes"] += 1

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
            if self._backpressure.paused and keys:
                consumer.pause([_topic_partition(t, p) for t, p in keys])
                self._paused |= set(keys)
            log.info("assigned %d partition(s): %s", len(keys), _describe(keys))
        except BaseException as exc:
            self._fatal = exc
            self._stop.set()

    def _start_positions(self, keys: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Where each newly assigned partition starts: the database's offset, or
        ``auto.offset.reset`` when the database has never seen the partition."""
        stored = self._load_offsets_retrying(sorted({t for t, _ in keys}))
        reset = str(self._consumer_conf.get("auto.offset.reset", "earliest")).lower()
        fallback = OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING
        known = [key for key in keys if key in stored]
        try:
            log_starts = self._watermarks(known, latest=False) if known else {}
        except Exception as exc:  # no answer: the fetcher's own reset rules still apply
            log.debug("log start offsets unavailable: %s", exc)
            log_starts = {}
        start: dict[TopicPartitionKey, int] = {}
        for key in keys:
            offset = stored.get(key)
            if offset is None:
                if reset == "error":
                    raise ConfigError(
                        f"the database has no offset for {key[0]}[{key[1]}] and "
                        "auto.offset.reset is 'error'"
                    )
                start[key] = fallback
                self._committed.pop(key, None)
            else:
                start[key] = self._check_gap(key, offset, log_starts.get(key, -1))
                self._committed[key] = offset
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
        self._counts["offset_gaps"] += 1
        log.warning(
            "%s[%d]: skipping a retention gap of %d event(s) (on_offset_gap=%s)",
            key[0],
            key[1],
            gap,
            choice,
        )
        return low if choice == "earliest" else OFFSET_END

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
        deadline = self.clock.monotonic() + self.config.effective_revoke_budget_ms / 1000.0
        delay = 0.05
        while True:
            try:
                return control.load_offsets(self.config.group_id, topics)
            except Exception as exc:
                if not is_transient(exc) or self.clock.monotonic() >= deadline:
                    raise ServerUnavailable(
                        f"cannot read offsets from PostgreSQL ({redact_dsn(self.config.dsn)}): "
                        f"{_first_line(exc)}"
                    ) from exc
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 1.0)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            keys = {(p.topic, p.partition) for p in partitions}
            self._counts["rebalances"] += 1
            self._counts["partitions_revoked"] += len(keys)
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
            log.warning("lost %d partition(s): dropping their in-flight work", len(keys))
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


def _describe(keys: Sequence[TopicPartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(keys)) or "none"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
