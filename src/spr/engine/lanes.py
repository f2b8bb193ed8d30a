"""Flush lanes: one batch written over several connections at once, by partition.

One PostgreSQL connection merges a batch on one server core; a second connection
merging the other half of the batch uses a second one
(``python -m benchmarks.flush_connections``). With ``flush_connections`` lanes, lane
``i`` owns the partitions ``p`` with ``p % lanes == i``: its connection writes the rows of
those partitions and their next offsets in its own transaction. Exactly-once holds per
partition, which is what it was always about: a partition's rows and its offset still
commit together, in one transaction on one connection.

Invariants:

* Every part of one job runs at the same time, one per lane (a thread and a connection
  per lane); the next job starts only once every part of this one committed, so jobs
  still commit in order, and a partition's flushes never overtake one another.
* A part that committed stays committed (``FlushJob.committed_parts``); a retry runs only
  the parts that failed. What a given-up job's committed parts wrote is harmless, as
  any replay is (the sequence guard and ``GREATEST`` on offsets).
* A job's attempt has one outcome (:class:`FlushOutcome`), reported once every part
  ended: committed when all parts are, else the most serious error of the attempt.
* Rows the database rejects are dead-lettered by one lane at a time.

A batch below ``flush_split_rows`` rows is not split: lane 0 writes it whole, in one
transaction, as with one lane (the batch as it is, no view in between). Below full
speed batches are small, and one commit beats two: ``spr bench --rate 10000`` measured
p99 11.2 ms over one connection and 14.0 ms with every batch split over two. Nor is a
batch that collapsed to fewer than ``flush_split_rows_per_event`` rows per event (a
backlog): the sooner its flush ends, the sooner the next batch is taken and the less
it collapses, which cost the backlog more rows than the second connection gained. Which
connection writes a partition may change from one batch to the next; the invariants
above do not depend on it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spr.classify import ErrorClass, classify
from spr.clock import Clock
from spr.engine.intake import PendingBatch
from spr.retry import RetryAttempt
from spr.sink.postgres import BatchLike, FlushResult, PostgresSink, RejectedRow

__all__ = ["BatchLane", "FlushJob", "FlushLanes", "FlushOutcome", "combine"]

log = logging.getLogger("spr.engine")

RejectedRowsHandler = Callable[[Sequence[RejectedRow]], None]


class BatchLane:
    """One lane's share of a batch: the rows and next offsets of the partitions ``p``
    with ``p % lanes == lane``. What :meth:`PostgresSink.flush` reads, nothing copied:
    the rows are rendered from the batch itself."""

    def __init__(self, batch: Any, lane: int, lanes: int) -> None:
        self.batch = batch
        self.lane = lane
        self.lanes = lanes
        self.COPY_FORMAT: str = batch.COPY_FORMAT
        self.columns: tuple[str, ...] = tuple(batch.columns)
        self.row_count: int = batch.count_rows(lane, lanes)
        self._offsets = {
            key: offset for key, offset in batch.next_offsets().items() if key[1] % lanes == lane
        }

    def next_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self._offsets)

    def copy_data(self) -> bytes:
        return bytes(self.batch.copy_data(self.lane, self.lanes))

    def copy_chunks(self, chunk_bytes: int = 1 << 20) -> Any:
        return self.batch.copy_chunks(chunk_bytes, self.lane, self.lanes)

    def rows(self) -> list[tuple[Any, ...]]:
        return list(self.batch.rows(self.lane, self.lanes))

    @property
    def empty(self) -> bool:
        """No row and no offset: nothing for this lane's connection to do."""
        return not self.row_count and not self._offsets


@dataclass(eq=False)
class FlushJob:
    """One batch on its way to the database, possibly over several attempts.

    ``running`` while the lanes have it; between attempts ``retry`` holds the backoff
    state and :meth:`Flushing.poll` resubmits it once ``retry.ready_at`` has come and
    the circuit breaker allows. ``committed_parts`` are the lanes whose part committed.
    """

    number: int
    pending: PendingBatch
    started_s: float
    cancel: threading.Event
    abandoned: bool = False
    running: bool = False
    retry: RetryAttempt | None = None
    attempt_s: float = 0.0  # when the current attempt was handed to the lanes
    span: Any = None  # the job's "apply batch" span when tracing is on
    committed_parts: dict[int, FlushResult] = field(default_factory=dict)
    parts: dict[int, BatchLike] | None = None  # lane -> its share, made on first submit


@dataclass(eq=False)
class FlushOutcome:
    job: FlushJob
    result: FlushResult | None
    error: BaseException | None
    cancelled: bool
    duration_s: float
    ended_ns: int | None = None  # wall clock when the flush returned (traced jobs only)


def combine(results: Mapping[int, FlushResult]) -> FlushResult:
    """The lanes' committed parts of one batch as one result (lane order)."""
    if len(results) == 1:
        return next(iter(results.values()))
    offsets: dict[tuple[str, int], int] = {}
    for lane in sorted(results):
        offsets.update(results[lane].offsets)
    parts = results.values()
    return FlushResult(
        rows=sum(r.rows for r in parts),
        applied=sum(r.applied for r in parts),
        stale=sum(r.stale for r in parts),
        rejected=sum(r.rejected for r in parts),
        offsets=offsets,
    )


def _severity(error: BaseException) -> int:
    # Which error of an attempt speaks for it: one that stops the pipeline before one
    # that is retried, so that a retry never hides a fatal error of another lane.
    return 0 if classify(error) is ErrorClass.TRANSIENT else 1


class _Attempt:
    """One attempt of one job: its parts still running and what the others did."""

    def __init__(self, job: FlushJob, lanes: list[int], started: float) -> None:
        self.job = job
        self.remaining = len(lanes)
        self.started = started
        self.errors: list[BaseException] = []
        self.cancelled = False
        self.ended_ns: int | None = None


class _Lane:
    """One lane: a thread with its own sink (and so its own connection)."""

    def __init__(self, index: int, sink: PostgresSink, owner: FlushLanes) -> None:
        self.index = index
        self.sink = sink
        self.owner = owner
        self.work: queue.Queue[tuple[_Attempt, BatchLike] | None] = queue.Queue()
        self.current: FlushJob | None = None
        name = "spr-flush" if index == 0 else f"spr-flush-{index}"
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            attempt, part = item
            self.current = attempt.job
            try:
                self._flush(attempt, part)
            finally:
                self.current = None

    def _flush(self, attempt: _Attempt, part: BatchLike) -> None:
        job = attempt.job
        if job.cancel.is_set():
            self.owner.part_ended(attempt, self.index, None, None, cancelled=True)
            return
        try:
            result = self.sink.flush(part)
        except Exception as exc:
            self.owner.part_ended(attempt, self.index, None, exc, job.cancel.is_set())
            return
        self.owner.part_ended(attempt, self.index, result, None, cancelled=False)


class FlushLanes:
    """The flush threads: one attempt of one job at a time, its parts one per lane.

    ``sinks`` are the lanes' sinks (one connection each); ``dead_letter`` receives rows
    the database rejects (see :meth:`PostgresSink.flush`); without it such a batch
    fails. A batch of fewer than ``split_rows`` rows, or of fewer than
    ``split_rows_per_event`` rows per event it took, is not split: lane 0 writes it
    whole. Outcomes come out of :attr:`results`, one per attempt.
    """

    def __init__(
        self,
        sinks: Sequence[PostgresSink],
        *,
        clock: Clock,
        dead_letter: RejectedRowsHandler | None = None,
        split_rows: int = 1,
        split_rows_per_event: float = 0.0,
    ) -> None:
        if not sinks:
            raise ValueError("flush lanes need at least one sink")
        self.clock = clock
        self.count = len(sinks)
        self.split_rows = split_rows
        self.split_rows_per_event = split_rows_per_event
        if dead_letter is not None:
            handler = dead_letter if self.count == 1 else _one_at_a_time(dead_letter)
            for sink in sinks:
                sink.dead_letter = handler
        self.results: queue.Queue[FlushOutcome] = queue.Queue()
        self._lock = threading.Lock()
        self._lanes = [_Lane(i, sink, self) for i, sink in enumerate(sinks)]

    @property
    def sinks(self) -> list[PostgresSink]:
        return [lane.sink for lane in self._lanes]

    def submit(self, job: FlushJob) -> None:
        """Start one attempt of ``job``: every part not committed yet, at once."""
        if job.parts is None:
            job.parts = self._split(job.pending.batch)
        todo = [lane for lane in job.parts if lane not in job.committed_parts]
        attempt = _Attempt(job, todo, self.clock.monotonic())
        if not todo:  # every part committed in an earlier attempt
            self._report(attempt)
            return
        for lane in todo:
            self._lanes[lane].work.put((attempt, job.parts[lane]))

    def cancel(self, job: FlushJob) -> None:
        """Ask ``job`` to stop: no more retries, and abort its running statements."""
        job.cancel.set()
        for lane in self._lanes:
            if lane.current is job:
                lane.sink.cancel()

    def close(self, timeout_s: float) -> None:
        """Stop the threads, waiting up to ``timeout_s`` for each part still running."""
        for lane in self._lanes:
            lane.work.put(None)
        for lane in self._lanes:
            # The parts run at once, so waiting for each in turn takes about as long
            # as waiting for the slowest.
            lane.thread.join(timeout_s)
            if lane.thread.is_alive():
                # Stuck in a statement on a dead connection: closing it from this
                # thread would race the flush thread inside libpq. The process exit
                # ends both.
                log.warning(
                    "flush thread %s did not stop within %.1f s; leaving it",
                    lane.thread.name,
                    timeout_s,
                )
                continue
            lane.sink.close()

    def _split(self, batch: Any) -> dict[int, BatchLike]:
        rows = batch.row_count
        if (
            self.count == 1
            or rows < self.split_rows
            or rows < self.split_rows_per_event * batch.events_added
        ):
            return {0: batch}
        parts = {lane: BatchLane(batch, lane, self.count) for lane in range(self.count)}
        busy: dict[int, BatchLike] = {lane: p for lane, p in parts.items() if not p.empty}
        # A batch with nothing at all still takes one (empty) transaction, as with one lane.
        return busy or {0: parts[0]}

    def part_ended(
        self,
        attempt: _Attempt,
        lane: int,
        result: FlushResult | None,
        error: BaseException | None,
        cancelled: bool,
    ) -> None:
        """Called by lane ``lane``'s thread when its part of ``attempt`` ended."""
        ended_ns = time.time_ns() if attempt.job.span is not None else None
        with self._lock:
            if result is not None:
                attempt.job.committed_parts[lane] = result
            elif error is not None:
                attempt.errors.append(error)
            attempt.cancelled = attempt.cancelled or cancelled
            attempt.ended_ns = ended_ns
            attempt.remaining -= 1
            if attempt.remaining:
                return
        self._report(attempt)

    def _report(self, attempt: _Attempt) -> None:
        job = attempt.job
        duration = self.clock.monotonic() - attempt.started
        if attempt.errors or attempt.cancelled:
            error = max(attempt.errors, key=_severity) if attempt.errors else None
            self.results.put(FlushOutcome(job, None, error, attempt.cancelled, duration))
            return
        result = combine(job.committed_parts)
        self.results.put(FlushOutcome(job, result, None, False, duration, attempt.ended_ns))


def _one_at_a_time(handler: RejectedRowsHandler) -> RejectedRowsHandler:
    lock = threading.Lock()

    def dead_letter(rows: Sequence[RejectedRow]) -> None:
        with lock:
            handler(rows)

    return dead_letter
