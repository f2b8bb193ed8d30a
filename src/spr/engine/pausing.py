"""Pausing: backpressure, and spr's pause set kept equal to librdkafka's.

:class:`Backpressure` is the pure policy (when to pause, when to resume, with
hysteresis); :class:`Pausing` applies it to the consumer.

Invariant: after every call here, and after every rebalance, a partition is paused in
librdkafka exactly when it is in ``paused``. librdkafka keeps a partition's pause flag
across an incremental unassign and a later assign, and does not carry it across an
eager re-assignment, so on every assignment spr states each new partition's state
explicitly: paused when it holds the partitions, resumed otherwise (:meth:`assigned`).
``consume()`` keeps being called while paused, so the member stays in its group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from spr.clock import Clock
from spr.config import BackpressurePolicy
from spr.kafka.clients import topic_partition
from spr.logs import log_event

__all__ = ["Backpressure", "Pausing"]

log = logging.getLogger("spr.engine")

TopicPartitionKey = tuple[str, int]


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


class Pausing:
    """Pauses and resumes the consumer's partitions; counts ``pauses`` and ``resumes``.

    ``wake_topic`` is any topic of the consumer: librdkafka does not wake its broker
    threads on resume, so a metadata request for it nudges them (they would otherwise
    notice up to a second later).
    """

    def __init__(self, consumer: Any, wake_topic: str) -> None:
        self.consumer = consumer
        self.wake_topic = wake_topic
        self.paused: set[TopicPartitionKey] = set()
        self.pauses = 0
        self.resumes = 0
        self._level = logging.DEBUG

    def update(
        self, assigned: set[TopicPartitionKey], *, pause: bool, reason: str, held: bool
    ) -> None:
        """Pause every assigned partition when ``pause``, else resume the paused ones.
        ``held`` says the pause is held by failures (worth an INFO line), not by
        backpressure, which comes and goes many times a second under load."""
        if pause:
            todo = assigned - self.paused
            if not todo:
                return
            if not self.paused:
                self.pauses += 1
                self._level = logging.INFO if held else logging.DEBUG
                log_event(log, "pause", level=self._level, reason=reason, partitions=len(todo))
            try:
                self.consumer.pause(_parts(sorted(todo)))
                self.paused |= todo
            except Exception as exc:
                log.debug("pause failed: %s", exc)
        elif self.paused:
            todo = self.paused & assigned
            try:
                if todo:
                    self.consumer.resume(_parts(sorted(todo)))
                    self.consumer.list_topics(self.wake_topic, timeout=1.0)
            except Exception as exc:
                log.debug("resume failed: %s", exc)
            log_event(log, "resume", level=self._level, partitions=len(todo))
            self.paused = set()
            self.resumes += 1

    def assigned(self, keys: Sequence[TopicPartitionKey], *, hold: bool) -> None:
        """State the pause flag of newly assigned ``keys`` in librdkafka explicitly:
        paused when spr holds its partitions (``hold``), resumed otherwise, whatever
        flag librdkafka kept from an earlier assignment."""
        if not keys:
            return
        try:
            if hold:
                self.consumer.pause(_parts(keys))
                self.paused |= set(keys)
            else:
                self.consumer.resume(_parts(keys))
                self.paused -= set(keys)
        except Exception as exc:
            log.debug("stating the pause flag of %s failed: %s", keys, exc)

    def released(self, keys: Iterable[TopicPartitionKey]) -> None:
        self.paused -= set(keys)

    def forget(self) -> None:
        """The whole assignment was replaced (an eager rebalance)."""
        self.paused.clear()


def _parts(keys: Iterable[TopicPartitionKey]) -> list[Any]:
    return [topic_partition(t, p) for t, p in keys]
