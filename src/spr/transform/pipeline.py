"""The routing stage as a pipeline: any producer's events in, canonical events out,
exactly once with Kafka transactions (design §10).

Per ``consume()`` result (:meth:`TransformPipeline.submit`): the core's ``rekey`` decodes
every event with the canonical decoder, drops ring duplicates, holds back unorderable
events, and turns the rest into output records (partition key, canonical JSON,
``partition_for(key, N)``, the design's headers), which are produced at once into the
open transaction, with the batch's dead letters. :meth:`poll` commits the transaction
once it is big or old enough: the consumed offsets go into it
(``send_offsets_to_transaction`` with the consumer's group metadata, KIP-447), so the
output, the dead letters and the input position commit or abort together.

Invariants:

* A transaction holds the records of every input offset it commits, and nothing else
  moves the group's offsets (the consumer never commits by itself).
* Rebalances commit the open transaction before partitions are released (or abort it);
  a lost assignment aborts it. After an abort every owned partition is sought back to
  its committed offset and the ring forgets, so the records are produced again.
* The first failure stops the pipeline; a producer fenced by a newer instance (the same
  ``transactional.id``) stops it with one sentence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from spr._impl import core
from spr.classify import ErrorClass, classify_kafka_error
from spr.clock import Clock, SystemClock
from spr.config.transform import TransformConfig
from spr.decode import DEFAULT_LIMITS, DecodeLimits
from spr.engine.failures import FirstFailure, first_line
from spr.errors import ConfigError, ServerUnavailable, SprError
from spr.kafka.clients import topic_partition
from spr.logs import log_event

__all__ = ["TransformPipeline", "TransformStats"]

log = logging.getLogger("spr.transform")

TopicPartitionKey = tuple[str, int]

OFFSET_BEGINNING = -2
OFFSET_END = -1
_ERR_PARTITION_EOF = -191
_ERR_UNKNOWN_TOPIC = -188
_ERR_UNKNOWN_TOPIC_OR_PART = 3
_ERR_OFFSET_OUT_OF_RANGE = 1
_ERR_AUTO_OFFSET_RESET = -140
# How long past its own timeout a transaction API call may block before it counts as hung.
_STUCK_GRACE_S = 5.0
_RETRY_PAUSE_S = 0.2


@dataclass(kw_only=True)
class TransformStats:
    """The transform's counters: ``consumed`` data messages, each ``produced`` as an
    output record, a ``duplicate`` (ring), ``invalid`` or ``unorderable`` (both
    dead-lettered); ``transactions`` committed and ``aborts``; ``rebalances``."""

    consumed: int = 0
    produced: int = 0
    duplicate: int = 0
    invalid: int = 0
    unorderable: int = 0
    transactions: int = 0
    aborts: int = 0
    rebalances: int = 0
    kafka_errors: int = 0
    active_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The counters, with the names :func:`spr.metrics.fold_engine_counters` reads."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        # For the metrics: produced records count as applied, and unorderable events
        # with the other dead letters.
        data.update(
            applied=self.produced, rejected=self.unorderable, circuit_state=0, paused_partitions=0
        )
        return data


class TransformPipeline:
    """Re-keys one consumer's messages into ``config.output_topic``, exactly once.

    ``consumer`` is built with ``config.consumer_config()`` and subscribed with this
    pipeline's rebalance callbacks; ``producer`` is a transactional producer built with
    ``config.producer_config()``; ``dead_letters`` writes through that producer (a
    :class:`spr.dlq.DeadLetterWriter` given it), or None to stop at the first invalid
    event. Not thread-safe: call everything from the consumer's thread. Blocks on Kafka
    in :meth:`open`, :meth:`poll` (when committing) and the rebalance callbacks.
    """

    def __init__(
        self,
        config: TransformConfig,
        consumer: Any,
        producer: Any,
        *,
        dead_letters: Any | None,
        output_partitions: int,
        clock: Clock | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.producer = producer
        self.dead_letters = dead_letters
        self.output_partitions = output_partitions
        self.clock: Clock = clock or SystemClock()
        self.limits = limits
        self.failure = FirstFailure()
        self.ring = core.IdempotencyRing(config.ring_capacity, config.ring_ttl_ms)
        self.sources = core.SourceTable(config.source_capacity, config.source_ttl_ms)
        self.source_names: dict[int, str] = {}
        self.stats = TransformStats()
        self.assigned: set[TopicPartitionKey] = set()
        #: Per owned partition, the input offset the group has committed (or where the
        #: partition started): where an abort rewinds it to.
        self.committed: dict[TopicPartitionKey, int] = {}
        #: Per partition, the next input offset taken into the open transaction.
        self.pending: dict[TopicPartitionKey, int] = {}
        self.rewound: set[TopicPartitionKey] = set()
        self.in_transaction = False
        self.transaction_records = 0
        self._transaction_started_s = 0.0
        self.last_message_s = 0.0
        self._first_message_s: float | None = None
        self._last_commit_s: float | None = None
        #: Called with the number of records of each committed transaction.
        self.commit_listeners: list[Callable[[int], None]] = []
        #: Continues sampled traces into the output (:class:`spr.tracing.otel.TransformTracer`).
        self.tracer: Any = None

    def open(self) -> None:
        """Register the transactional producer with its coordinator (fencing any older
        instance with the same ``transactional.id``). Blocks; raises SprError."""
        try:
            self.producer.init_transactions(self.config.commit_timeout_s)
        except Exception as exc:
            raise _transaction_error("start transactions", exc, self.config) from exc

    # -- the data path --------------------------------------------------------------------

    def submit(self, messages: list[Any]) -> None:
        """Take one ``consume()`` result: produce its records and dead letters into the
        open transaction (beginning one when needed). Raises the first failure."""
        self.failure.raise_if_failed()
        messages = self._screen(messages)
        if not messages:
            return
        now = self.clock.monotonic()
        result = core.rekey(
            messages,
            self.ring,
            self.sources,
            self.source_names,
            int(self.clock.time() * 1000),
            self.output_partitions,
            self.assigned,
            self.limits,
        )
        stats = self.stats
        if result.consumed:
            self.last_message_s = now
            if self._first_message_s is None:
                self._first_message_s = now
        stats.consumed += result.consumed
        stats.duplicate += result.duplicates
        if result.records or result.invalid or result.unorderable or result.positions:
            self._begin()
        produce = self.producer.produce
        topic = self.config.output_topic
        if self.tracer is not None:
            self.tracer.produce_all(
                produce, self._produce_when_room, topic, messages, result.records
            )
        else:
            for key, value, partition, headers in result.records:
                try:
                    produce(topic, value, key, partition=partition, headers=headers)
                except BufferError:
                    self._produce_when_room(topic, value, key, partition, headers)
        stats.produced += len(result.records)
        self.transaction_records += len(result.records)
        for message, reason in result.invalid:
            stats.invalid += 1
            self._dead_letter(message, ErrorClass.INVALID, reason)
        for message, reason in result.unorderable:
            stats.unorderable += 1
            self._dead_letter(message, ErrorClass.UNORDERABLE, reason)
        pending = self.pending
        for key, offset in result.positions.items():
            if offset > pending.get(key, -1):
                pending[key] = offset
        for message in result.errors:
            self._kafka_error(message)
        self.producer.poll(0)

    def poll(self) -> None:
        """Commit the open transaction once it holds ``max_records`` records or is
        ``max_age_ms`` old. Raises the first failure."""
        self.failure.raise_if_failed()
        if not self.in_transaction:
            return
        age_ms = (self.clock.monotonic() - self._transaction_started_s) * 1000.0
        if self.transaction_records >= self.config.max_records or age_ms >= self.config.max_age_ms:
            self.commit()
        self.failure.raise_if_failed()

    def join(self) -> bool:
        """Commit what is open; False when it could not be committed (it was aborted,
        or the pipeline failed)."""
        if self.failure.failed:
            return False
        if self.in_transaction:
            return self.commit()
        return True

    def close(self) -> None:
        """Abort a transaction still open (nothing of it becomes visible); never raises."""
        if self.in_transaction:
            try:
                self.producer.abort_transaction(self.config.commit_timeout_s)
            except Exception as exc:
                log.debug("aborting at close failed: %s", exc)
            self.in_transaction = False

    @property
    def busy(self) -> bool:
        return self.in_transaction

    def active_s(self) -> float | None:
        first, last = self._first_message_s, self._last_commit_s
        return None if first is None or last is None or last < first else last - first

    # -- transactions ---------------------------------------------------------------------

    def _begin(self) -> None:
        if self.in_transaction:
            return
        try:
            self.producer.begin_transaction()
        except Exception as exc:
            raise _transaction_error("begin a transaction", exc, self.config) from exc
        self.in_transaction = True
        self.transaction_records = 0
        self._transaction_started_s = self.clock.monotonic()

    def commit(self) -> bool:
        """Commit the open transaction with the consumed offsets of owned partitions.
        Returns False when it had to be aborted (its input is read again); a fenced or
        otherwise fatal producer stops the pipeline."""
        if not self.in_transaction:
            return True
        offsets = [
            topic_partition(t, p, o)
            for (t, p), o in self.pending.items()
            if (t, p) in self.assigned
        ]
        timeout = self.config.commit_timeout_s
        deadline = self.clock.monotonic() + timeout
        try:
            if offsets:
                # The group metadata is read now, never cached: after a rebalance a stale
                # generation is refused (the zombie fencing of KIP-447).
                metadata = self.consumer.consumer_group_metadata()
                cap_s = self.config.transaction_timeout_ms / 1000.0
                _retrying(
                    self.clock,
                    deadline,
                    lambda left: _bounded(
                        "send_offsets_to_transaction",
                        lambda: self.producer.send_offsets_to_transaction(offsets, metadata, left),
                        min(left, cap_s) + _STUCK_GRACE_S,
                    ),
                )
            _retrying(self.clock, deadline, self.producer.commit_transaction)
        except Exception as exc:
            error = _kafka_error_of(exc)
            if error is not None and error.txn_requires_abort() and not error.fatal():
                log.warning("transaction aborted (%s); its input is read again", first_line(exc))
                self.abort()
                return False
            self.failure.fail(_transaction_error("commit a transaction", exc, self.config))
            return False
        records = self.transaction_records
        self.committed.update({k: o for k, o in self.pending.items() if k in self.assigned})
        self.pending.clear()
        self.in_transaction = False
        self.transaction_records = 0
        self.stats.transactions += 1
        self._last_commit_s = self.clock.monotonic()
        for listener in self.commit_listeners:
            listener(records)
        return True

    def abort(self) -> None:
        """Abort the open transaction and rewind every owned partition to its committed
        offset; the ring forgets what it saw since (it is read again)."""
        if self.in_transaction:
            deadline = self.clock.monotonic() + self.config.commit_timeout_s
            try:
                _retrying(self.clock, deadline, self.producer.abort_transaction)
            except Exception as exc:
                self.failure.fail(_transaction_error("abort a transaction", exc, self.config))
                return
        self.in_transaction = False
        self.transaction_records = 0
        self.pending.clear()
        self.ring.clear()
        self.stats.aborts += 1
        for key in self.assigned:
            self.rewound.add(key)
            offset = self.committed.get(key)
            if offset is not None and offset >= 0:
                try:
                    self.consumer.seek(topic_partition(key[0], key[1], offset))
                except Exception as exc:  # sought again after this consume() returns
                    log.debug("seek %s failed: %s", key, exc)

    def _screen(self, messages: list[Any]) -> list[Any]:
        # After an abort inside a callback: drop what this consume() returned for the
        # rewound partitions, and seek them again now, outside the callback.
        if not self.rewound:
            return messages
        rewound, self.rewound = self.rewound, set()
        kept = [
            m
            for m in messages
            if m.error() is not None or (m.topic(), m.partition()) not in rewound
        ]
        for key in rewound & self.assigned:
            offset = self.committed.get(key)
            if offset is not None and offset >= 0:
                self.consumer.seek(topic_partition(key[0], key[1], offset))
        return kept

    def _produce_when_room(self, topic: str, value: bytes, key: bytes, partition: int,
                           headers: Any) -> None:  # fmt: skip
        deadline = self.clock.monotonic() + self.config.transaction_timeout_ms / 1000.0
        while True:
            self.producer.poll(0.05)
            try:
                self.producer.produce(topic, value, key, partition=partition, headers=headers)
                return
            except BufferError:
                if self.clock.monotonic() > deadline:
                    raise ServerUnavailable(
                        f"the producer's queue to {topic} stayed full for "
                        f"{self.config.transaction_timeout_ms / 1000.0:g} s: is Kafka at "
                        f"{self.config.bootstrap} writable?"
                    ) from None

    def _dead_letter(self, message: Any, error_class: ErrorClass, reason: str) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        log_event(log, "dlq", level=logging.WARNING, error_class=str(error_class), topic=topic,
                  partition=partition, offset=offset, reason=reason)  # fmt: skip
        if self.dead_letters is None:
            self.failure.fail(
                SprError(
                    f"{topic}[{partition}]@{offset} is {error_class}: {reason}; dead letters "
                    "are turned off, so spr stops instead of skipping it"
                )
            )
            return
        try:
            self.dead_letters.send(message, error_class, reason, 1)
        except SprError as exc:
            self.failure.fail(exc)

    def _kafka_error(self, message: Any) -> None:
        error = message.error()
        code = error.code()
        if code == _ERR_PARTITION_EOF:
            self._end_of_partition(message)
            return
        self.stats.kafka_errors += 1
        where = f"{message.topic()}[{message.partition()}]"
        if code in (_ERR_AUTO_OFFSET_RESET, _ERR_OFFSET_OUT_OF_RANGE):
            self.failure.fail(
                ConfigError(
                    f"{where}: the committed offset is below the log start (retention "
                    f"deleted events not transformed yet): {error.str()}; reset the group's "
                    "offsets deliberately (spr replay --to-offset / --to-timestamp)"
                )
            )
            return
        error_class = classify_kafka_error(error)
        if error_class is ErrorClass.FATAL:
            self.failure.fail(
                ServerUnavailable(f"Kafka reported an error spr cannot recover from: {error.str()}")
            )
        elif code not in (_ERR_UNKNOWN_TOPIC, _ERR_UNKNOWN_TOPIC_OR_PART):
            log.warning("Kafka error (%s) on %s: %s", error_class, where, error.str())

    def _end_of_partition(self, message: Any) -> None:
        # The end: past trailing control records (a transactional source's commit
        # marker), the next offset is the end; trusted only at the consumer's position.
        key = (message.topic(), message.partition())
        end = message.offset()
        if key not in self.assigned or end <= max(self.pending.get(key, -1),
                                                  self.committed.get(key, -1)):  # fmt: skip
            return
        (at,) = self.consumer.position([topic_partition(key[0], key[1])])
        if at.offset == end:
            self._begin()
            self.pending[key] = end

    # -- rebalance callbacks ----------------------------------------------------------------

    def on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Take ``partitions`` at the group's committed offsets (where none is committed,
        where ``auto.offset.reset`` says)."""
        keys = [(p.topic, p.partition) for p in partitions]
        try:
            self.stats.rebalances += 1
            committed = consumer.committed(
                [topic_partition(t, p) for t, p in keys], timeout=self.config.commit_timeout_s
            )
            reset = str(self.config.consumer_config().get("auto.offset.reset", "earliest"))
            fallback = OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING
            assignment = []
            for tp in committed:
                key = (tp.topic, tp.partition)
                offset = tp.offset if tp.offset is not None and tp.offset >= 0 else fallback
                if offset >= 0:
                    self.committed[key] = offset
                assignment.append(topic_partition(key[0], key[1], offset))
            if _cooperative(self.config):
                consumer.incremental_assign(assignment)
                self.assigned |= set(keys)
            else:
                consumer.assign(assignment)
                self.assigned = set(keys)
            log_event(log, "rebalance", change="assign", partitions=len(keys))
        except BaseException as exc:
            self.failure.fail(exc)

    def on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Commit the open transaction before ``partitions`` go (or abort it), then let
        them go."""
        keys = {(p.topic, p.partition) for p in partitions}
        try:
            self.stats.rebalances += 1
            if self.in_transaction and not self.failure.failed:
                self.commit()
            self._release(consumer, keys)
            log_event(log, "rebalance", change="revoke", partitions=len(keys))
        except BaseException as exc:
            self.failure.fail(exc)

    def on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        """``partitions`` were taken away: abort the open transaction (its offsets are no
        longer ours to commit) and let them go."""
        keys = {(p.topic, p.partition) for p in partitions}
        try:
            self.stats.rebalances += 1
            if self.in_transaction:
                self.abort()
            self._release(consumer, keys)
            log_event(log, "rebalance", level=logging.WARNING, change="lost", partitions=len(keys))
        except BaseException as exc:
            self.failure.fail(exc)

    def _release(self, consumer: Any, keys: set[TopicPartitionKey]) -> None:
        try:
            if _cooperative(self.config):
                consumer.incremental_unassign([topic_partition(t, p) for t, p in sorted(keys)])
            else:
                consumer.unassign()
        except Exception as exc:
            log.debug("unassign failed: %s", exc)
        self.assigned -= keys
        for key in keys:
            self.committed.pop(key, None)
            self.pending.pop(key, None)


def _retrying(clock: Clock, deadline: float, call: Callable[[float], Any]) -> None:
    """``call(seconds left)`` again after a retriable Kafka error (a broker restart
    gives ``_TRANSPORT``), until ``deadline``; anything else is raised."""
    while True:
        try:
            call(max(1.0, deadline - clock.monotonic()))
            return
        except Exception as exc:
            error = _kafka_error_of(exc)
            if error is None or not error.retriable() or clock.monotonic() > deadline:
                raise
            log.debug("retrying a retriable transaction error: %s", first_line(exc))
            time.sleep(_RETRY_PAUSE_S)


def _bounded(what: str, call: Callable[[], None], limit_s: float) -> None:
    """Run ``call`` (a blocking librdkafka transaction API) and raise what it raises,
    or SprError when it has not returned after ``limit_s``.

    librdkafka (2.16) does not always honour these calls' own timeouts:
    ``send_offsets_to_transaction`` blocks forever when the group coordinator it cached
    was decommissioned, as after a broker restart (librdkafka issues #5456 and #5511),
    and the loop would hang, deaf to SIGTERM. The call runs on a daemon thread instead;
    one that never returns is left behind and the pipeline stops, with nothing of the
    open transaction committed, so that a restarted transform reads its input again."""
    outcome: list[BaseException | None] = []

    def _run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=_run, name=f"spr-{what}", daemon=True)
    thread.start()
    thread.join(limit_s)
    if not outcome:
        raise SprError(
            f"librdkafka's {what} did not return within {limit_s:g} s, past its own "
            "timeout (a known librdkafka hang after a broker restart); restart the transform"
        )
    if outcome[0] is not None:
        raise outcome[0]


def _cooperative(config: TransformConfig) -> bool:
    from spr.config import uses_cooperative_rebalance

    return uses_cooperative_rebalance(config.consumer_config())


def _kafka_error_of(exc: BaseException) -> Any:
    error = exc.args[0] if exc.args else None
    return error if hasattr(error, "txn_requires_abort") else None


def _transaction_error(what: str, exc: BaseException, config: TransformConfig) -> SprError:
    """The one sentence for a transaction that cannot go on."""
    error = _kafka_error_of(exc)
    text = error.str() if error is not None else first_line(exc)
    name = error.name() if error is not None else ""
    if name in ("_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH") or "fenced" in text.lower():
        return SprError(
            f"this transform was fenced: a newer instance with transactional.id "
            f"{config.transaction_id} took over (or the broker aborted a transaction open "
            f"longer than {config.transaction_timeout_ms / 1000:g} s); it stops here, and "
            "nothing of its open transaction was committed"
        )
    return SprError(f"Kafka at {config.bootstrap} could not {what}: {text}")
