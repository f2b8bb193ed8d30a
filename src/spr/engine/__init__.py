"""The consumer engine: Kafka to PostgreSQL, exactly once, rebalance-safe, bounded.

Flow (design §4), one stage per module::

    consume() -> positions (screen) -> intake (decode, key check, ring, collapse)
              -> deadletters (invalid events) -> flushing (one transaction: state +
              offsets, on its own thread) -> positions (durable offsets, Kafka commit
              mirror for lag tools only)

:class:`StatePipeline` (``pipeline``) chains the stages behind ``submit / poll / join /
close``; :class:`Engine` (``processor``) is the short loop around it that ``spr run``
runs, with ``pausing`` (backpressure) and ``telemetry`` (stats and metrics). The
rebalance callbacks only orchestrate. ``docs/architecture.md`` draws the parts and the
path of one batch and of one rebalance.

Invariants this module keeps, and why they give exactly-once effects:

* An offset reaches the database only in the transaction that writes the rows of every
  event below it (the batch carries both), and Kafka is committed only after that
  transaction. The database is the truth: on assignment the engine seeks to the stored
  offsets, never to Kafka's.
* One flush is in flight at a time, on one thread, so flushes commit in order; the
  consumer's thread gathers and decodes the next batch meanwhile.
* Whenever consumed-but-uncommitted work is dropped (a lost assignment, a revoke whose
  budget ran out, a failed flush), the ring is cleared, since a "seen" fingerprint
  of an event that was never written would turn its redelivery into a loss, and
  every partition still owned is rewound to its last committed offset.
* The sequence guard and ``GREATEST`` on offsets make every flush idempotent, so a
  replay, a retried ambiguous commit or a zombie's late flush is harmless.
* Memory is bounded: the waiting batch is capped by :class:`~spr.config.BatchPolicy`,
  one batch is in flight, and partitions are paused (:class:`Backpressure`) while the
  sink is slow or the buffers are full; ``consume`` keeps being called while paused, so
  the member stays in its group. A partition is paused in librdkafka exactly when spr
  holds it paused, after every rebalance too.
* The first failure stops everything, and nothing is committed after it.
"""

from __future__ import annotations

from spr.engine.deadletters import DeadLetterSink
from spr.engine.failures import FlushFailed
from spr.engine.pausing import Backpressure
from spr.engine.pipeline import StatePipeline
from spr.engine.processor import Engine
from spr.engine.telemetry import EngineStats

__all__ = [
    "Backpressure",
    "DeadLetterSink",
    "Engine",
    "EngineStats",
    "FlushFailed",
    "StatePipeline",
]
