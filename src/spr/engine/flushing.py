"""Flushing: one batch in flight, retried with backoff, behind a circuit breaker.

A flush is one PostgreSQL transaction per flush lane (rows and offsets together,
:class:`PostgresSink`; one lane unless ``flush_connections`` says more, see
:mod:`spr.engine.lanes`). It runs on dedicated threads with their own connections, so
that the loop gathers and decodes the next batch meanwhile (design §4: fetch and write
overlap).

Invariants:

* At most one job is in flight, and jobs run in submission order, so flushes commit in
  order.
* The flush threads never retry by themselves: each attempt's outcome comes back to the
  loop's thread, which classifies the error (:func:`spr.classify.classify`), feeds the
  circuit breaker and decides when to try again, while the loop keeps polling.
* A job's outcome is reported exactly once, through ``on_committed`` for a commit; a
  job that was given up (a cancelled or stuck flush) reports nothing more: whatever it
  may still commit is harmless (the sequence guard and ``GREATEST`` on offsets).
* With a ``tracer`` (:class:`spr.tracing.otel.BatchTracer`), each job has one span,
  started before the job reaches the flush thread (so before its COPY) and ended once:
  at the time the last lane saw COMMIT return, or when the job fails or is given up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spr.classify import ErrorClass, classify
from spr.clock import Clock
from spr.config import EngineConfig
from spr.engine.failures import FirstFailure, FlushFailed, first_line
from spr.engine.intake import PendingBatch
from spr.engine.lanes import FlushJob, FlushLanes, FlushOutcome, RejectedRowsHandler
from spr.errors import CommitsLost, SprError
from spr.logs import log_event
from spr.retry import CircuitBreaker, CircuitState
from spr.sink.postgres import FlushResult, PostgresSink, redact_dsn

__all__ = ["FLUSH_WATCHDOG_MARGIN_S", "FlushJob", "Flushing"]

log = logging.getLogger("spr.engine")

#: A flush still running this long past statement_timeout is stuck (a dead connection).
FLUSH_WATCHDOG_MARGIN_S = 30.0

CommittedHandler = Callable[["FlushJob", FlushResult, float], None]


class Flushing:
    """One flush in flight: hand-off, retries, the circuit breaker, the stuck-flush watchdog.

    Counters: ``flushes`` committed, ``flush_retries`` (failed attempts retried), flush
    seconds (total, max, last), and the committed batches' ``applied``, ``stale``,
    ``rejected`` and ``collapsed`` events. ``on_committed(job, result, seconds)`` is
    called on the loop's thread once per committed flush, in commit order.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        clock: Clock,
        failure: FirstFailure,
        on_committed: CommittedHandler,
    ) -> None:
        self.config = config
        self.clock = clock
        self.failure = failure
        self.on_committed = on_committed
        self.retry_policy = config.retry_policy
        self.breaker = CircuitBreaker(config.breaker, on_change=self._on_circuit_change)
        self.lanes: FlushLanes | None = None
        self.inflight: FlushJob | None = None
        self._number = 0
        self.flushes = 0
        self.flush_retries = 0
        self.flush_seconds_total = 0.0
        self.flush_seconds_max = 0.0
        self.flush_seconds_last = 0.0
        self.applied = 0
        self.stale = 0
        self.rejected = 0
        self.collapsed = 0
        self.circuit_opens = 0
        #: Makes a span per job when set (:class:`spr.tracing.otel.BatchTracer`).
        self.tracer: Any = None

    def start(self, sinks: Sequence[PostgresSink], dead_letter: RejectedRowsHandler | None) -> None:
        """Start one flush thread per sink (each its own connection): the flush lanes
        (:mod:`spr.engine.lanes`)."""
        self.lanes = FlushLanes(
            sinks,
            clock=self.clock,
            dead_letter=dead_letter,
            split_rows=self.config.flush_split_rows,
            split_rows_per_event=self.config.flush_split_rows_per_event,
        )

    def close(self) -> None:
        """Stop the flush thread. A flush given up as stuck is not waited for (its
        connection is dead); otherwise the wait is bounded by the statement timeout."""
        lanes = self.lanes
        if lanes is None:
            return
        job = self.inflight
        stuck = job is not None and job.abandoned
        budget = 0.5 if stuck else self.config.statement_timeout_ms / 1000.0 + 1.0
        lanes.close(budget)

    def expect_durable(self, committed: Mapping[tuple[str, int], int]) -> None:
        """What the flush connections check the database against when they are new (a
        reconnect after a crash): a copy, the flush threads read it."""
        durable = dict(committed)
        for sink in self.lanes.sinks if self.lanes is not None else ():
            sink.durable_offsets = durable

    def take_lost_commits(self) -> dict[tuple[str, int], int | None]:
        """The partitions whose acknowledged commits a flush connection found lost
        (:class:`CommitsLost`), each reported once: the offsets the database holds."""
        lost: dict[tuple[str, int], int | None] = {}
        for sink in self.lanes.sinks if self.lanes is not None else ():
            found = getattr(sink, "lost_commits", None)  # None: a sink without the check
            if found is not None:
                lost.update(found.stored)
                sink.lost_commits = None
        return lost

    # -- state --------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    @property
    def holding(self) -> bool:
        """Flushing is held up by failures: a flush waits for its retry, or the circuit
        breaker is not closed. All partitions stay paused meanwhile."""
        job = self.inflight
        return (job is not None and job.retry is not None) or (
            self.breaker.state is not CircuitState.CLOSED
        )

    def hold_reason(self) -> str:
        if self.breaker.state is not CircuitState.CLOSED:
            return f"circuit {self.breaker.state.name.lower()}"
        return "flush retry"

    def inflight_age(self, now: float) -> float | None:
        job = self.inflight
        return None if job is None else now - job.started_s

    def inflight_bytes(self) -> int:
        job = self.inflight
        return 0 if job is None else job.pending.batch.nbytes

    def allows_new(self, now: float) -> bool:
        """Whether a new flush may start now: always while the breaker is closed;
        otherwise only as its probe (a flush waiting for its retry normally is that
        probe, see :meth:`poll`; this covers a batch gathered after one was dropped by
        a rebalance)."""
        return self.breaker.state is CircuitState.CLOSED or self.breaker.allow(now)

    # -- driving ------------------------------------------------------------------------

    def submit(self, pending: PendingBatch) -> None:
        """Hand ``pending`` to the flush thread; only when nothing is in flight."""
        assert self.inflight is None and self.lanes is not None
        self._number += 1
        now = self.clock.monotonic()
        job = FlushJob(
            number=self._number,
            pending=pending,
            started_s=now,
            cancel=threading.Event(),
            running=True,
            attempt_s=now,
        )
        if self.tracer is not None:
            job.span = self._start_span(pending)
        self.inflight = job
        self.lanes.submit(job)

    def poll(self) -> None:
        """Collect finished attempts, stop on a stuck flush, and resubmit a flush whose
        backoff is over. Never blocks."""
        lanes = self.lanes
        assert lanes is not None
        while True:
            try:
                outcome = lanes.results.get_nowait()
            except queue.Empty:
                break
            self._on_outcome(outcome)
        self._check_stuck()
        self._drive_retry()

    def wait(self, deadline_s: float) -> bool:
        """Block until the flush in flight has an outcome, or ``deadline_s`` (on the
        clock); True when nothing is in flight any more."""
        lanes = self.lanes
        while self.inflight is not None:
            remaining = deadline_s - self.clock.monotonic()
            if remaining <= 0 or lanes is None or self.failure.failed:
                return False
            self._drive_retry()
            waiting = not self.inflight.running
            try:
                outcome = lanes.results.get(timeout=min(remaining, 0.05 if waiting else 0.2))
            except queue.Empty:
                continue
            self._on_outcome(outcome)
        return True

    def await_outcome(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` (real time, one wait, no retry driving) for the
        running attempt's outcome and take it. The loop's wakeup: when a waiting batch
        only waits for the flush in flight, the loop waits on that flush, not on
        ``consume()``, and hands the batch off the moment the flush commits."""
        lanes = self.lanes
        if lanes is None or self.inflight is None:
            return
        # A job waiting for its retry has no outcome to come: the wait then only paces
        # the loop (as consume()'s timeout would), it never spins.
        try:
            outcome = lanes.results.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._on_outcome(outcome)

    def cancel(self, wait_s: float) -> None:
        """Give up the flush in flight: cancel its statement and wait up to ``wait_s``
        for the rollback; one that still runs then is abandoned (a harmless zombie)."""
        job = self.inflight
        if job is None:
            return
        if not job.running:
            # Waiting for a retry: nothing of it is in the database's hands.
            job.cancel.set()
            self.inflight = None
            self._end_span(job, "cancelled")
            return
        assert self.lanes is not None
        self.lanes.cancel(job)
        if not self.wait(self.clock.monotonic() + wait_s):
            job.abandoned = True
            self.inflight = None
            self._end_span(job, "abandoned")

    def _drive_retry(self) -> None:
        job = self.inflight
        if job is None or job.running or job.retry is None or self.lanes is None:
            return
        now = self.clock.monotonic()
        if not job.retry.ready(now) or not self.breaker.allow(now):
            return
        job.running = True
        job.attempt_s = now
        self.lanes.submit(job)

    def _check_stuck(self) -> None:
        """Stop when the attempt in flight has run far longer than the statement timeout
        allows: its connection is dead (a silent network drop), and waiting on it would
        hold the pipeline, uncommitted, for hours."""
        job = self.inflight
        if job is None or not job.running:
            return
        timeout_s = self.config.statement_timeout_ms / 1000.0
        age_s = self.clock.monotonic() - max(job.attempt_s, job.started_s)
        if age_s > timeout_s + FLUSH_WATCHDOG_MARGIN_S:
            # No cancel request: on a dead network it could block as long. The flush
            # thread is left behind (a daemon); whatever it may still commit is harmless.
            job.cancel.set()
            job.abandoned = True
            self._end_span(job, "abandoned")
            self.failure.fail(
                FlushFailed(
                    f"a flush to PostgreSQL ({redact_dsn(self.config.dsn)}) has not "
                    f"answered for {age_s:.0f} s (statement_timeout is {timeout_s:g} s): "
                    "the connection looks dead; nothing more was committed"
                )
            )

    def _on_outcome(self, outcome: FlushOutcome) -> None:
        job = outcome.job
        if job.abandoned:
            return
        job.running = False
        now = self.clock.monotonic()
        if outcome.result is not None:
            if job.span is not None:
                result = outcome.result
                self._end_span(
                    job,
                    "committed",
                    applied=result.applied,
                    stale=result.stale,
                    rejected=result.rejected,
                    end_ns=outcome.ended_ns,
                )
            self._committed(job, outcome.result, outcome.duration_s, now)
            return
        if outcome.cancelled:
            if job is self.inflight:
                self.inflight = None
            self._end_span(job, "cancelled")
            return
        error = outcome.error
        assert error is not None
        error_class = classify(error)
        if error_class is ErrorClass.TRANSIENT:
            if isinstance(error, CommitsLost):
                # The database answered (it holds fewer commits than acknowledged): as a
                # circuit probe that is a success. Counted as a failure it would keep
                # the circuit open after the pipeline drops the job to consume the lost
                # events again, with every partition paused and no flush left to probe.
                self.breaker.record_success(now)
            else:
                self.breaker.record_failure(now)
            if job.retry is None:
                job.retry = self.retry_policy.start(job.started_s)
            delay = job.retry.next_delay(now)
            if delay is not None:
                # The job stays in flight; poll() resubmits it, partitions paused.
                self.flush_retries += 1
                if job.span is not None:
                    self.tracer.event(
                        job.span,
                        "retry",
                        {
                            "spr.retry.attempt": job.retry.attempts,
                            "spr.retry.delay_s": delay,
                            "error.type": type(error).__qualname__,
                        },
                    )
                log.warning(
                    "flush failed (%s); retry %d in %.2f s",
                    first_line(error),
                    job.retry.attempts,
                    delay,
                )
                return
            message = (
                f"PostgreSQL stayed unavailable for {self.config.flush_retry_s:g} s "
                f"({redact_dsn(self.config.dsn)}): {first_line(error)}"
            )
        elif isinstance(error, SprError):
            # spr's own sentence (a dead-letter topic that cannot be written, a table
            # that rejects every row): already says what happened and what to do.
            if job is self.inflight:
                self.inflight = None
            self._end_span(job, "failed", error=error)
            self.failure.fail(error)
            return
        elif error_class is ErrorClass.DATA:
            message = (
                f"PostgreSQL rejected a row and dead letters are turned off: {first_line(error)}"
            )
        else:
            message = f"a flush to PostgreSQL failed: {first_line(error)}"
        if job is self.inflight:
            self.inflight = None
        self._end_span(job, "failed", error=error)
        self.failure.fail(FlushFailed(message, error))

    def _committed(self, job: FlushJob, result: FlushResult, duration_s: float, now: float) -> None:
        if job is self.inflight:
            self.inflight = None
        self.breaker.record_success(now)
        if job.retry is not None:
            log.warning("flush succeeded after %d retry(ies)", job.retry.attempts)
        self.flushes += 1
        self.applied += result.applied
        self.stale += result.stale
        self.rejected += result.rejected
        self.collapsed += job.pending.events - result.rows
        self.flush_seconds_total += duration_s
        self.flush_seconds_last = duration_s
        self.flush_seconds_max = max(self.flush_seconds_max, duration_s)
        self.on_committed(job, result, duration_s)

    # -- tracing ------------------------------------------------------------------------

    def _start_span(self, pending: PendingBatch) -> Any:
        batch = pending.batch
        return self.tracer.start(
            links=pending.links or (),
            messages=pending.messages,
            events=pending.events,
            rows=batch.row_count,
            duplicates=pending.duplicates,
            invalid=pending.invalid,
            partitions=list(batch.next_offsets()),
        )

    def _end_span(self, job: FlushJob, outcome: str, **details: Any) -> None:
        span, job.span = job.span, None
        if span is not None:
            self.tracer.end(span, outcome, **details)

    def _on_circuit_change(self, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.OPEN and old is CircuitState.CLOSED:
            self.circuit_opens += 1
        log_event(
            log,
            "circuit",
            level=logging.WARNING if new is CircuitState.OPEN else logging.INFO,
            old=old.name.lower(),
            new=new.name.lower(),
            failure_rate=round(self.breaker.failure_rate, 3),
        )
