"""A partition stalled on purpose, on the real broker: spr notices and recovers it.

A pause flag that librdkafka keeps but spr did not set (what a member that froze and
came back used to be left with) stops a partition without any error. The engine's
stall detector must find it, warn once, seek it to its committed offset, resume it,
and the run must still end with the exact state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from helpers import assert_exact, expected_for, produce_load

from spr.config import EngineConfig, TableMapping
from spr.dev.loadgen import LoadSpec
from spr.engine import Engine
from spr.kafka import clients


class PausedBehindSparsBack:
    """The real consumer, except that partition ``victim`` is paused right after each
    assignment, without spr's knowledge."""

    def __init__(self, consumer: Any, topic: str, victim: int) -> None:
        self._consumer = consumer
        self._victim = TopicPartition(topic, victim)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        on_assign = callbacks["on_assign"]

        def assigned(consumer: Any, partitions: list[Any]) -> None:
            on_assign(consumer, partitions)
            if any(p.partition == self._victim.partition for p in partitions):
                self._consumer.pause([self._victim])

        self._consumer.subscribe(topics, **{**callbacks, "on_assign": assigned})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


@pytest.mark.timeout(180)
def test_a_partition_paused_behind_spr_s_back_is_found_and_recovered(
    bootstrap: str,
    dsn: str,
    make_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = make_topic(partitions=3)
    spec = LoadSpec(count=3_000, entities=300, seed=12)
    produce_load(bootstrap, topic, spec)
    table, group = unique_name("stall"), unique_name("g")
    config = EngineConfig(
        group_id=group,
        topics=(topic,),
        bootstrap=bootstrap,
        dsn=dsn,
        mapping=TableMapping(table=table),
        auto_create_schema=True,
        idle_exit_s=2.0,
        stall_after_s=2.0,
        dead_letters=False,
    )
    engine = Engine(
        config,
        consumer_factory=lambda conf: PausedBehindSparsBack(clients.consumer(conf), topic, 1),
    )
    caplog.set_level(logging.WARNING, "spr.engine")
    stats = engine.run()  # without the detector this never ends: partition 1 keeps lag
    assert stats.stall_recoveries >= 1 and stats.stalled_partitions == 0
    stalls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stall")]
    assert len(stalls) == 1 and f"topic={topic}" in stalls[0] and "partition=1" in stalls[0]
    assert_exact(dsn=dsn, bootstrap=bootstrap, table=table, group=group, topics=[topic],
                 expected=expected_for(spec))  # fmt: skip
