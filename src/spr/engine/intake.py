"""Intake: consume() results into the waiting batch (design §4).

One :meth:`Intake.ingest` call per ``consume()`` result hands every message to the core's
fused ``Batch.ingest`` (decode, key check, idempotency ring, collapse to the newest
sequence per entity; no Python object per row). What comes back is counted here; the
invalid events and Kafka errors it hands back are the caller's to route.

Invariants:

* The waiting batch, its age, its message counts and its latency samples change
  together: :meth:`take` hands all of them off at once and :meth:`drop` forgets all of
  them at once (one ``_reset``), so nothing of a dropped batch rides on the next one.
* Dropping a batch clears the ring too: a fingerprint remembered for an event that was
  never written would turn its redelivery into a loss.
* Tracing off (``trace_links`` None, the default) reads no header at all; on, the
  headers are read only until the batch holds ``cap`` sampled trace contexts
  (:class:`spr.tracing.TraceLinks`), which ride with the batch like its counts.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from spr.batch import STATE_COLUMNS, Batch
from spr.config import BatchPolicy
from spr.decode import DecodeLimits
from spr.dedup import IdempotencyRing
from spr.tracing import TraceLink, TraceLinks

__all__ = ["Intake", "PendingBatch"]

TopicPartitionKey = tuple[str, int]


@dataclass(eq=False)
class PendingBatch:
    """A batch on its way to the database, with what the flush and the metrics need.

    ``events`` were collapsed into ``batch.row_count`` rows; ``messages`` counts every
    message whose offset the batch moves (valid, duplicate and invalid ones), and
    ``invalid`` those among them that were dead-lettered. ``timestamps``/``weights``
    are broker timestamps sampled per ``consume()`` result, for the latency histogram.
    """

    batch: Batch
    events: int
    messages: int
    invalid: int
    timestamps: array[int]
    weights: array[int]
    duplicates: int = 0
    links: list[TraceLink] | None = None


class Intake:
    """The waiting batch, the idempotency ring, and the latency samples of what it holds.

    Not thread-safe: the loop's thread owns it. Nothing here blocks.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        ring: IdempotencyRing,
        limits: DecodeLimits,
        *,
        sample_latency: bool = False,
        on_misrouted: int = 0,
    ) -> None:
        self.policy = policy
        self.ring = ring
        self.limits = limits
        self.sample_latency = sample_latency
        #: Topic -> partition count, for the misrouting check (None: no check).
        self.partitions: dict[str, int] | None = None
        self.on_misrouted = on_misrouted
        self.consumed = 0
        self.duplicate = 0
        #: Misrouted events per topic (design §10), whatever became of them.
        self.misrouted: dict[str, int] = {}
        #: Events per partition since the metrics last took them (see take_partition_events).
        self.partition_events: dict[TopicPartitionKey, int] = {}
        self.last_message_s = 0.0
        self.first_message_s: float | None = None
        #: The sampled events' trace contexts of the waiting batch (None: tracing off).
        self.trace_links: TraceLinks | None = None
        self._reset()

    def _reset(self) -> None:
        self.batch = Batch(STATE_COLUMNS)
        self.since_s: float | None = None
        self.messages = 0
        self.invalid = 0
        self.duplicates = 0
        if self.trace_links is not None:
            self.trace_links.take()
        self._timestamps: array[int] = array("q")
        self._weights: array[int] = array("q")

    # -- taking messages ----------------------------------------------------------------

    def ingest(self, messages: list[Any], now_s: float, assigned: set[TopicPartitionKey]) -> Any:
        """Take one ``consume()`` result; returns the core's ``IngestResult`` (its
        ``invalid`` events, ``misrouted_letters`` and ``errors`` are for the caller to
        route; their offsets are already advanced in the batch)."""
        result = self.batch.ingest(
            messages,
            self.ring,
            int(now_s * 1000),
            assigned,
            self.limits,
            True,
            self.partitions,
            self.on_misrouted,
        )
        for topic, events in result.misrouted.items():
            self.misrouted[topic] = self.misrouted.get(topic, 0) + events
        consumed = result.consumed
        if not consumed:
            return result
        self.last_message_s = now_s
        if self.first_message_s is None:
            self.first_message_s = now_s
        if self.since_s is None:
            self.since_s = now_s
        self.consumed += consumed
        self.duplicate += result.duplicates
        self.duplicates += result.duplicates
        self.messages += consumed
        self.invalid += len(result.invalid) + len(result.misrouted_letters)
        counts = self.partition_events
        for key, events in result.partition_counts.items():
            counts[key] = counts.get(key, 0) + events
        if self.sample_latency:
            self._sample(messages, consumed)
        links = self.trace_links
        if links is not None and not links.full:
            links.collect(messages)
        return result

    def advance(self, topic: str, partition: int, offset: int, now_s: float) -> None:
        """Move a partition's next offset past ``offset`` without a row: a record that
        was dead-lettered without being decoded (the client could not read it)."""
        self.batch.advance(topic, partition, offset)
        self.messages += 1
        self.invalid += 1
        if self.since_s is None:
            self.since_s = now_s

    def reach_end(self, topic: str, partition: int, end: int, now_s: float) -> bool:
        """The consumer reached the end of a partition at offset ``end``: move its next
        offset there when the batch would store less (the records between were control
        records, a transaction's commit marker, which are never returned). Returns
        whether the batch changed."""
        if self.batch.next_offsets().get((topic, partition), -1) >= end:
            return False
        self.batch.advance(topic, partition, end - 1)
        self.messages += 1
        if self.since_s is None:
            self.since_s = now_s
        return True

    def _sample(self, messages: list[Any], added: int) -> None:
        # The first, middle and last message stand for the ``added`` events of one
        # consume() result (weights split evenly): three calls per batch, not one per event.
        samples = (messages[0], messages[len(messages) // 2], messages[-1])
        share, extra = divmod(added, len(samples))
        for i, message in enumerate(samples):
            weight = share + (1 if i < extra else 0)
            if weight and message.error() is None:
                timestamp = message.timestamp()[1]
                if timestamp > 0:
                    self._timestamps.append(timestamp)
                    self._weights.append(weight)

    # -- what the scheduler asks ----------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.batch.nbytes

    @property
    def full(self) -> bool:
        """The batch reached the policy's rows or bytes."""
        policy = self.policy
        batch = self.batch
        return batch.row_count >= policy.max_rows or batch.nbytes >= policy.max_bytes

    # -- handing off ----------------------------------------------------------------------

    def take(self) -> PendingBatch:
        """Hand off the waiting batch with its counts and samples; a new one starts."""
        pending = PendingBatch(
            batch=self.batch,
            events=self.batch.events_added,
            messages=self.messages,
            invalid=self.invalid,
            timestamps=self._timestamps,
            weights=self._weights,
            duplicates=self.duplicates,
            links=None if self.trace_links is None else self.trace_links.take(),
        )
        self._reset()
        return pending

    def drop(self) -> None:
        """Forget the waiting batch, its samples and the ring (its work is abandoned)."""
        self._reset()
        self.ring.clear()

    def take_partition_events(self) -> dict[TopicPartitionKey, int]:
        """Events per partition since the last call (for the distribution metric)."""
        counts, self.partition_events = self.partition_events, {}
        return counts
