"""Positions: which partitions this member owns, where each starts, what is durable.

Invariants:

* The database, not Kafka's committed offset, is the truth: a partition starts at the
  offset stored with its rows (:func:`start_offset`, the one start rule), or where
  ``auto.offset.reset`` says when the database has never seen it.
* A stored offset below the log start (retention deleted unapplied events) is never
  skipped silently (:meth:`Positions.check_gap`).
* ``committed`` holds, per owned partition, the next offset durable in the database;
  a rollback rewinds every owned partition there (or to where it started), never to
  the logical end: a partition assigned at "latest" is resolved to a real offset.
* Kafka's committed offsets only mirror the database, after it, for lag tools.
* When the database lost commits it acknowledged (a crash under
  ``synchronous_commit=off``), its lower offsets are the truth again
  (:meth:`Positions.lower`): ``committed`` never stays above what it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from spr.classify import ErrorClass, classify
from spr.clock import SystemClock
from spr.config import EngineConfig
from spr.engine.failures import first_line
from spr.errors import ConfigError, ServerUnavailable
from spr.kafka.admin import KafkaAdmin
from spr.kafka.clients import topic_partition
from spr.logs import log_event
from spr.sink.postgres import PostgresSink, lost_offsets, redact_dsn

__all__ = ["OFFSET_BEGINNING", "OFFSET_END", "Positions", "start_offset"]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]

# librdkafka's logical offsets (confluent_kafka.OFFSET_BEGINNING / OFFSET_END), spelled
# out so that this module imports without the client for pure-logic tests.
OFFSET_BEGINNING = -2
OFFSET_END = -1
_EARLIEST = ("earliest", "smallest", "beginning")
_LATEST = ("latest", "largest", "end")


def start_offset(stored: int | None, reset: str, key: TopicPartitionKey) -> int:
    """Where a partition starts: its ``stored`` next offset; else ``OFFSET_BEGINNING``
    or ``OFFSET_END`` as ``reset`` (``auto.offset.reset``) says. Raises ConfigError for
    an unknown reset, or for ``error`` when nothing is stored."""
    if stored is not None:
        return stored
    reset = reset.lower()
    if reset == "error":
        raise ConfigError(
            f"the database has no offset for {key[0]}[{key[1]}] and auto.offset.reset is 'error'"
        )
    if reset in _LATEST:
        return OFFSET_END
    if reset in _EARLIEST:
        return OFFSET_BEGINNING
    raise ConfigError(f"unknown auto.offset.reset {reset!r}")


class Positions:
    """The assignment and its offsets, for one consumer.

    ``control`` is the sink used for offsets and gap records (not the flush thread's);
    ``admin`` answers offset look-ups (an AdminClient: the consumer's own connection
    would queue them behind its long-poll fetch). Counters: ``offset_gaps`` skipped and
    ``offset_gap_events`` lost in them. Runs on the loop's thread, mostly inside
    rebalance callbacks; blocks on the database and Kafka there.
    """

    def __init__(
        self,
        config: EngineConfig,
        consumer: Any,
        control: PostgresSink,
        admin_factory: Callable[[], KafkaAdmin],
        *,
        offset_reset: str,
        cooperative: bool,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.control = control
        self._admin_factory = admin_factory
        self._admin: KafkaAdmin | None = None
        self.offset_reset = offset_reset
        self.cooperative = cooperative
        self.assigned: set[TopicPartitionKey] = set()
        self.committed: dict[TopicPartitionKey, int] = {}
        self.start_offsets: dict[TopicPartitionKey, int] = {}
        self.rewound: set[TopicPartitionKey] = set()
        # Assigned at the logical OFFSET_END, not yet resolved to a real offset: the
        # first offset consumed resolves it (a rewind must not jump to the end again).
        self.unresolved: set[TopicPartitionKey] = set()
        self.offset_gaps = 0
        self.offset_gap_events = 0

    @property
    def admin(self) -> KafkaAdmin:
        if self._admin is None:
            self._admin = self._admin_factory()
        return self._admin

    # -- assignment ---------------------------------------------------------------------

    def assign(self, keys: Sequence[TopicPartitionKey]) -> None:
        """Take ``keys`` at their start offsets (:meth:`starts`)."""
        start = self.starts(keys)
        assignment = [topic_partition(t, p, start[(t, p)]) for t, p in keys]
        if self.cooperative:
            self.consumer.incremental_assign(assignment)
            self.assigned |= set(keys)
        else:
            self.consumer.assign(assignment)
            self.assigned = set(keys)

    def partition_counts(self) -> dict[str, int]:
        """How many partitions each topic has now (one metadata request per topic)."""
        counts: dict[str, int] = {}
        for topic, _ in self.admin.partitions(self.config.topics):
            counts[topic] = counts.get(topic, 0) + 1
        return counts

    def release(self, keys: set[TopicPartitionKey]) -> None:
        """Give up ``keys``: unassign them and forget their offsets."""
        try:
            if self.cooperative:
                self.consumer.incremental_unassign([topic_partition(t, p) for t, p in sorted(keys)])
            else:
                self.consumer.unassign()
        except Exception as exc:  # e.g. during close(): the client unassigns itself
            log.debug("unassign failed: %s", exc)
        self.assigned -= keys
        for key in keys:
            self.committed.pop(key, None)
            self.start_offsets.pop(key, None)
            self.unresolved.discard(key)

    def starts(self, keys: Sequence[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Where each newly assigned partition starts: the database's offset, past a
        retention gap when allowed (:meth:`check_gap`), or ``auto.offset.reset``."""
        stored = self._load_offsets(sorted({t for t, _ in keys}))
        known = [key for key in keys if key in stored]
        try:
            log_starts = self.admin.log_start_offsets(known) if known else {}
        except Exception as exc:  # no answer: the fetcher reports a gap (out of range)
            log.debug("log start offsets unavailable: %s", exc)
            log_starts = {}
        unknown = [key for key in keys if key not in stored]
        ends: dict[TopicPartitionKey, int] = {}
        if unknown and start_offset(None, self.offset_reset, unknown[0]) == OFFSET_END:
            # A real offset, so that a rollback rewinds to where this owner started, not
            # to a later end of the log (which would skip what it consumed meanwhile).
            try:
                ends = self.admin.end_offsets(unknown)
            except Exception as exc:
                log.debug("end offsets unavailable: %s", exc)
        start: dict[TopicPartitionKey, int] = {}
        for key in keys:
            offset = stored.get(key)
            if offset is None:
                logical = start_offset(None, self.offset_reset, key)
                resolved = ends.get(key, -1) if logical == OFFSET_END else -1
                start[key] = resolved if resolved >= 0 else logical
                if start[key] == OFFSET_END:
                    self.unresolved.add(key)
                else:
                    self.unresolved.discard(key)
                self.committed.pop(key, None)
            else:
                start[key] = self.check_gap(key, offset, log_starts.get(key, -1))
                # A skipped gap moved the stored offset forward (see check_gap).
                self.committed[key] = max(offset, start[key])
                self.unresolved.discard(key)
            self.start_offsets[key] = start[key]
        return start

    def _load_offsets(self, topics: list[str]) -> dict[TopicPartitionKey, int]:
        budget = self.config.effective_revoke_budget_ms / 1000.0
        policy = replace(self.config.retry_policy, max_delay=1.0, max_elapsed=budget)
        try:
            # Blocking is fine here: this runs inside a rebalance callback, within budget.
            return policy.call(
                lambda: self.control.load_offsets(self.config.group_id, topics),
                should_retry=lambda exc: classify(exc) is ErrorClass.TRANSIENT,
                clock=SystemClock(),
            )
        except Exception as exc:
            raise ServerUnavailable(
                f"cannot read offsets from PostgreSQL ({redact_dsn(self.config.dsn)}): "
                f"{first_line(exc)}"
            ) from exc

    def check_gap(self, key: TopicPartitionKey, offset: int, low: int) -> int:
        """Refuse to skip events deleted by retention, unless ``on_offset_gap`` allows
        it; then log, count and record the gap and return where to resume."""
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
        resume = low if choice == "earliest" else max(low, self.admin.end_offsets([key])[key])
        self.offset_gaps += 1
        self.offset_gap_events += gap
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
        # Recorded, and the stored offset moved past the gap, before anything after it
        # can be applied; a failure stops the engine (nothing is skipped unseen).
        self.control.record_offset_gap(
            self.config.group_id,
            key[0],
            key[1],
            stored_offset=offset,
            log_start=low,
            resumed_at=choice,
            resume_offset=resume,
        )
        return resume

    # -- rewinding ----------------------------------------------------------------------

    def _rewind_target(self, key: TopicPartitionKey) -> int | None:
        if key not in self.committed and key in self.unresolved:
            # Nothing consumed from it yet (it would be resolved): its position is still
            # where it started; a seek to the logical end would skip ahead.
            return None
        return self.committed.get(key, self.start_offsets.get(key, OFFSET_BEGINNING))

    def rewind(self) -> None:
        """After uncommitted work was dropped: seek every owned partition back to its
        committed offset now, and mark it ``rewound``, so that what the current
        ``consume()`` returns for it (possibly fetched before this) is discarded and it
        is sought again once that call returns (:meth:`screen`). That covers an eager
        rebalance, which revokes and re-assigns in one ``consume()`` call."""
        for key in self.assigned:
            self.rewound.add(key)
            offset = self._rewind_target(key)
            if offset is None:
                continue
            try:
                self.consumer.seek(topic_partition(key[0], key[1], offset))
            except Exception as exc:  # sought again after the current consume() returns
                log.debug("seek %s failed: %s", key, exc)

    def screen(self, messages: list[Any]) -> list[Any]:
        """What a ``consume()`` result may carry into the batch: resolve partitions that
        started at the logical end, and drop what came for rewound partitions (then seek
        them again, now outside any callback, so their next message is the committed
        offset)."""
        if self.unresolved and messages:
            self._resolve_starts(messages)
        if not self.rewound:
            return messages
        rewound, self.rewound = self.rewound, set()
        kept = [
            m
            for m in messages
            if m.error() is not None or (m.topic(), m.partition()) not in rewound
        ]
        for key in rewound:
            if key not in self.assigned:
                continue
            offset = self._rewind_target(key)
            if offset is None:
                continue
            try:
                self.consumer.seek(topic_partition(key[0], key[1], offset))
            except Exception as exc:
                raise ServerUnavailable(f"cannot rewind {key[0]}[{key[1]}]: {exc}") from exc
        return kept

    def _resolve_starts(self, messages: Sequence[Any]) -> None:
        unresolved = self.unresolved
        for message in messages:
            if message.error() is not None:
                continue
            key = (message.topic(), message.partition())
            if key in unresolved:
                unresolved.discard(key)
                self.start_offsets[key] = message.offset()
                if not unresolved:
                    return

    # -- durable offsets ----------------------------------------------------------------

    def record(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """``offsets`` are now durable in the database."""
        committed = self.committed
        for key, offset in offsets.items():
            if offset > committed.get(key, -1):
                committed[key] = offset

    def commit_kafka(
        self, offsets: Mapping[TopicPartitionKey, int] | None = None, *, sync: bool = False
    ) -> None:
        """Mirror durable offsets of owned partitions to Kafka for lag tools; never
        authoritative, so a failure is only logged."""
        source = self.committed if offsets is None else offsets
        owned = [
            topic_partition(t, p, o) for (t, p), o in source.items() if (t, p) in self.assigned
        ]
        if not owned:
            return
        try:
            self.consumer.commit(offsets=owned, asynchronous=not sync)
        except Exception as exc:
            log.debug("Kafka offset commit failed: %s", exc)

    def lost_commits(self) -> dict[TopicPartitionKey, int | None]:
        """The owned partitions whose offset the database holds below ``committed``
        (None: no row any more), read now through the control connection: what a crash
        under ``synchronous_commit=off`` lost. Blocks; raises on database errors."""
        if not self.committed:
            return {}
        stored = self.control.load_offsets(self.config.group_id, self.config.topics)
        return lost_offsets(self.committed, stored)

    def lower(self, stored: Mapping[TopicPartitionKey, int | None]) -> None:
        """The database lost commits: take its ``stored`` offsets as committed again (a
        partition without a row restarts where it started, from the beginning under
        ``auto.offset.reset=earliest``). A :meth:`rewind` then seeks there."""
        for key, offset in stored.items():
            if key not in self.assigned:
                continue
            if offset is not None:
                self.committed[key] = min(offset, self.committed.get(key, offset))
                continue
            self.committed.pop(key, None)
            if self.offset_reset.lower() in _EARLIEST:
                self.start_offsets[key] = OFFSET_BEGINNING

    # -- a retention gap found by the fetcher ---------------------------------------------

    def out_of_range(self, message: Any, drain: Callable[[], bool]) -> TopicPartitionKey | None:
        """librdkafka found a fetch position below the log start (retention deleted
        events not applied yet) and, told ``auto.offset.reset=error``, stopped fetching
        the partition: apply ``on_offset_gap``, as at assignment. ``drain`` flushes
        everything consumed so far first. Returns the partition re-assigned (its pause
        state must be re-applied), or None when it is not ours."""
        error = message.error()
        try:
            key = (message.topic(), message.partition())
            position = int(message.offset())
        except Exception:
            key, position = None, -1
        if key is None or key[0] is None:
            raise ServerUnavailable(f"Kafka reported an offset out of range: {error.str()}")
        if key not in self.assigned:
            return None
        if position < 0:
            position = self.committed.get(key, -1)
        try:
            low = self.admin.log_start_offsets([key])[key]
        except Exception as exc:
            raise ServerUnavailable(
                f"{key[0]}[{key[1]}]: the fetch position {position} is out of range and "
                f"the log start cannot be read: {first_line(exc)}"
            ) from exc
        if position < 0 or position >= low:
            # Not a retention gap (e.g. the end moved back): nothing was skipped yet.
            raise ServerUnavailable(
                f"{key[0]}[{key[1]}]: Kafka reported the fetch position {position} out of "
                f"range (log start {low}): {error.str()}"
            )
        if self.config.on_offset_gap != "fail" and not drain():
            from spr.engine.failures import FlushFailed

            raise FlushFailed(
                f"{key[0]}[{key[1]}]: could not flush before skipping a retention gap"
            )
        resume = self.check_gap(key, position, low)
        self.committed[key] = max(self.committed.get(key, -1), resume)
        self.start_offsets[key] = resume
        self.unresolved.discard(key)
        self._restart_fetch(key, resume)
        return key

    def _restart_fetch(self, key: TopicPartitionKey, offset: int) -> None:
        """Fetch ``key`` from ``offset`` again after librdkafka stopped it (a seek is
        refused in that state): re-assign it."""
        consumer = self.consumer
        part = topic_partition(key[0], key[1], offset)
        if self.cooperative:
            consumer.incremental_unassign([topic_partition(*key)])
            consumer.incremental_assign([part])
            return
        keys = sorted(self.assigned)
        positions = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.position([topic_partition(t, p) for t, p in keys])
        }
        assignment = []
        for other in keys:
            if other == key:
                assignment.append(part)
                continue
            at = positions.get(other, -1)
            if at is None or at < 0:
                at = self.committed.get(other, self.start_offsets.get(other, OFFSET_BEGINNING))
            assignment.append(topic_partition(other[0], other[1], at))
        consumer.assign(assignment)

    # -- lag of the whole group ---------------------------------------------------------

    def group_caught_up(self) -> bool:
        """Whether the whole group is done with what its topics hold: every partition
        applied up to its end (the database's offsets, whoever applied them), and the
        group settled, stable with every partition owned, so that a member still
        waiting for its share of a rebalance does not leave early (and make the others
        wait for its session to time out).

        The end is the last stable offset under ``read_committed``; a stored offset past
        trailing control records is written when the consumer reaches the end
        (``enable.partition.eof``)."""
        topics = self.config.topics
        keys = self.admin.partitions(topics)
        committed_only = (
            str(self.config.consumer_config().get("isolation.level")) == "read_committed"
        )
        ends = self.admin.end_offsets(keys, committed_only=committed_only)
        starts = self.admin.log_start_offsets(keys)
        stored = self.control.load_offsets(self.config.group_id, topics)
        if any(ends[key] > stored.get(key, starts[key]) for key in keys):
            return False
        return self.admin.group_settled(self.config.group_id, keys)
