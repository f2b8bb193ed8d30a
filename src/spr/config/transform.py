"""Everything one ``spr transform`` process needs (:class:`TransformConfig`), validated
when built (design §10)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from spr.config.defaults import DEFAULT_BOOTSTRAP
from spr.config.engine import dlq_topic_for
from spr.config.kafka import CONSUMER_DEFAULTS, connection_settings, merge_kafka_config
from spr.config.policies import positive
from spr.errors import ConfigError

__all__ = ["PRODUCER_TRANSACTION_DEFAULTS", "TransformConfig"]

#: The transactional producer's settings (user keys win, except those spr relies on).
PRODUCER_TRANSACTION_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "acks": "all",
        "enable.idempotence": "true",
        "compression.type": "lz4",
        "linger.ms": "5",
        # Output records are placed by spr (partition_for), never by the partitioner.
        "partitioner": "murmur2_random",
        "message.max.bytes": str(11 * 1024 * 1024),
        # librdkafka (2.16) "re-bootstraps" a client that lost every broker, as in a
        # broker restart, and forgets the brokers it knew; a transactional producer whose
        # cached group coordinator was forgotten then blocks in
        # send_offsets_to_transaction for good (librdkafka issues #5511 and #5456;
        # measured here at every broker restart). Reconnect to the known brokers instead.
        "metadata.recovery.strategy": "none",
    }
)

# Settings the transform decides; a user value would break exactly-once.
_FIXED_PRODUCER_KEYS = ("transactional.id", "enable.idempotence", "acks")
_FIXED_CONSUMER_KEYS = ("enable.auto.commit", "enable.auto.offset.store", "isolation.level")


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """One transform worker: sources, output, transaction policy.

    Every batch of input is one Kafka transaction that holds the output records, the
    batch's dead letters and the consumed offsets (design §10). A transaction is
    committed once it holds ``max_records`` records or is ``max_age_ms`` old (so that
    an event waits at most about that long to become visible to ``read_committed``
    readers), and on every rebalance.

    ``transaction_timeout_ms`` is how long the broker lets a transaction stay open
    before it aborts it. It bounds how long a frozen worker's open transaction blocks
    everything behind it: ``read_committed`` readers of the output (whose last stable
    offset stops there) and the worker that takes over its partitions (whose fetch of
    the committed offsets waits for the pending transaction, KIP-447). A transaction
    normally lives about ``max_age_ms`` plus a commit, so 10 s is far above that and
    well below the broker's maximum (``transaction.max.timeout.ms``, 15 minutes by
    default). ``transactional_id`` names this worker's producer: stable across restarts
    of the same worker, so that a new instance fences the old one (default
    ``spr-transform.<group>.<host>.<worker>``).
    """

    group_id: str
    topics: tuple[str, ...]
    output_topic: str
    output_partitions: int | None = None
    bootstrap: str = DEFAULT_BOOTSTRAP
    kafka: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    dead_letters: bool = True
    dlq_topic: str | None = None
    workers: int = 1
    worker: int = 0
    transactional_id: str | None = None
    max_records: int = 20_000
    max_age_ms: int = 100
    transaction_timeout_ms: int = 10_000
    consume_batch: int = 2_000
    consume_timeout_ms: int = 2
    ring_capacity: int = 262_144
    ring_ttl_ms: int = 600_000
    source_capacity: int = 262_144
    source_ttl_ms: int = 3_600_000
    connect_timeout_s: float = 5.0
    commit_timeout_s: float = 30.0
    idle_exit_s: float | None = None
    max_events: int | None = None

    def __post_init__(self) -> None:
        if not self.group_id:
            raise ConfigError("a consumer group is required (--group)")
        if isinstance(self.topics, str) or not self.topics:
            raise ConfigError("at least one source topic is required (--topic)")
        if len(set(self.topics)) != len(self.topics) or not all(self.topics):
            raise ConfigError("source topics must be non-empty and distinct")
        if not self.output_topic:
            raise ConfigError("an output topic is required (--output-topic)")
        if self.output_topic in self.topics:
            raise ConfigError(
                f"the output topic {self.output_topic} is also a source topic: every output "
                "record would be transformed again without end; choose another --output-topic"
            )
        if not self.bootstrap:
            raise ConfigError("the Kafka bootstrap address must not be empty")
        object.__setattr__(
            self, "kafka", MappingProxyType({str(k): str(v) for k, v in self.kafka.items()})
        )
        for name in (
            "workers",
            "max_records",
            "max_age_ms",
            "transaction_timeout_ms",
            "consume_batch",
            "consume_timeout_ms",
            "ring_capacity",
            "ring_ttl_ms",
            "source_capacity",
            "source_ttl_ms",
            "connect_timeout_s",
            "commit_timeout_s",
        ):
            positive(name, getattr(self, name))
        for name in ("output_partitions", "idle_exit_s", "max_events"):
            value = getattr(self, name)
            if value is not None:
                positive(name, value)
        if self.output_partitions is not None and self.output_partitions > 2**31 - 1:
            raise ConfigError(f"--output-partitions is too large: {self.output_partitions}")
        if not 0 <= self.worker < self.workers:
            raise ConfigError(f"worker {self.worker} is not one of {self.workers} worker(s)")
        for key in (*_FIXED_PRODUCER_KEYS, *_FIXED_CONSUMER_KEYS):
            if key in self.kafka:
                raise ConfigError(
                    f"{key} is set by spr transform for exactly-once processing; remove -X {key}"
                )
        if "group.id" in self.kafka and self.kafka["group.id"] != self.group_id:
            raise ConfigError("set the group with --group, not with group.id")
        if self.dead_letters:
            for topic in self.topics:
                target = dlq_topic_for(topic, self.dlq_topic)
                if target in self.topics or target == self.output_topic:
                    raise ConfigError(
                        f"the dead-letter topic of {topic!r} is {target!r}, which this "
                        "transform reads or writes; choose another --dlq-topic"
                    )

    @property
    def transaction_id(self) -> str:
        """This worker's ``transactional.id``."""
        if self.transactional_id:
            return self.transactional_id
        host = os.environ.get("SPR_HOSTNAME") or socket.gethostname()
        return f"spr-transform.{self.group_id}.{host}.{self.worker}"

    def consumer_config(self) -> dict[str, Any]:
        """The source consumer's librdkafka settings (user keys win, except that offsets
        are never committed by the consumer and only committed transactions are read)."""
        conf = merge_kafka_config(
            CONSUMER_DEFAULTS,
            {"bootstrap.servers": self.bootstrap, "group.id": self.group_id, **self.kafka},
        )
        conf["enable.auto.commit"] = "false"
        conf["enable.auto.offset.store"] = "false"
        conf["isolation.level"] = "read_committed"
        return conf

    def producer_config(self) -> dict[str, Any]:
        """The transactional producer's settings: connected like the consumer (the
        connection part of ``kafka``: ``-X`` settings tune the consumer), with spr's
        transaction settings."""
        conf = merge_kafka_config(
            {**PRODUCER_TRANSACTION_DEFAULTS, "bootstrap.servers": self.bootstrap},
            connection_settings(self.kafka),
        )
        conf["transactional.id"] = self.transaction_id
        conf["transaction.timeout.ms"] = str(self.transaction_timeout_ms)
        # A record not delivered within the transaction's life fails the transaction.
        conf["message.timeout.ms"] = str(self.transaction_timeout_ms)
        return conf
