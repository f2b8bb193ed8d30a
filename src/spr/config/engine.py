"""Everything one engine process needs (:class:`EngineConfig`), validated when built."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from spr.config.defaults import DEFAULT_BOOTSTRAP, DEFAULT_DSN
from spr.config.kafka import CONSUMER_DEFAULTS, merge_kafka_config
from spr.config.mapping import DEFAULT_MAPPING, TableMapping
from spr.config.policies import BackpressurePolicy, BatchPolicy, positive
from spr.errors import ConfigError
from spr.retry import BreakerPolicy, RetryPolicy

__all__ = [
    "DLQ_SUFFIX",
    "MAX_FLUSH_CONNECTIONS",
    "ON_MISROUTED",
    "SYNCHRONOUS_COMMIT",
    "EngineConfig",
    "default_flush_connections",
    "dlq_topic_for",
]

_ON_OFFSET_GAP = ("fail", "earliest", "latest")
ON_MISROUTED = ("auto", "apply", "dead-letter", "stop")
#: PostgreSQL's ``synchronous_commit`` levels a flush connection may use; "on" first, the
#: default. Offsets commit with their rows, so every level keeps effects exactly-once.
SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")

DLQ_SUFFIX = ".dlq"


def dlq_topic_for(source_topic: str, dlq_topic: str | None = None) -> str:
    """The dead-letter topic of ``source_topic``: ``dlq_topic`` when given (``{topic}`` in
    it is replaced by the source topic), else ``<source_topic>.dlq``.

    The one naming rule, kept here (not in :mod:`spr.dlq`) so that :class:`EngineConfig`
    can check it without loading a Kafka client; :mod:`spr.dlq` re-exports it.
    """
    if dlq_topic is None:
        return source_topic + DLQ_SUFFIX
    return dlq_topic.replace("{topic}", source_topic)


#: More flush connections than this only take connection slots from the server.
MAX_FLUSH_CONNECTIONS = 64


def default_flush_connections() -> int:
    """Two flush connections where this process may run on two cores or more, else one:
    a second connection only pays when the server can merge on a second core, and the
    batches it splits are the large ones of full speed (``flush_split_rows``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything one engine process needs; validated when built.

    ``kafka`` holds the user's librdkafka overrides only; :meth:`consumer_config` merges
    them over :data:`CONSUMER_DEFAULTS`. ``revoke_budget_ms`` defaults to a fifth of
    ``max.poll.interval.ms``. ``flush_retry_s`` bounds how long one flush is retried on
    transient database errors before the engine stops (:attr:`retry_policy`);
    ``breaker`` says when the circuit breaker opens (all partitions paused) and probes.

    ``dead_letters`` (on by default) sends invalid events and rows the database rejects
    to ``dlq_topic`` (default ``<topic>.dlq``; ``{topic}`` in it is replaced by the
    source topic). Turned off, an invalid event is only counted and logged, and a row
    the database rejects stops the engine. A dead-letter topic that this run consumes
    (a source topic, directly or through ``{topic}``) is refused here, before any server
    is touched (design §6: fatal): its dead letters would be read back as events, and a
    dead letter of an invalid event is invalid again, so one bad message would loop
    without end.

    ``synchronous_commit`` is PostgreSQL's setting of the same name for the flush
    connections only (default ``"on"``). ``"off"`` lets a commit return before its WAL
    is flushed: faster flushes, and a database crash loses the last few hundred
    milliseconds of commits, rows and offsets together, which the engine then consumes
    again from Kafka (the topics must still hold them). Never the default.
    """

    group_id: str
    topics: tuple[str, ...]
    bootstrap: str = DEFAULT_BOOTSTRAP
    dsn: str = DEFAULT_DSN
    mapping: TableMapping = DEFAULT_MAPPING
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    backpressure: BackpressurePolicy = field(default_factory=BackpressurePolicy)
    kafka: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    statement_timeout_ms: int = 30_000
    synchronous_commit: str = "on"
    # Connections (and threads) a batch is flushed over at once, each writing the rows
    # and offsets of its share of the partitions in its own transaction
    # (spr.engine.lanes): one server core merges per connection. None: two where this
    # process may run on two cores or more, else one.
    flush_connections: int | None = None
    # A batch of fewer rows goes over one connection, in one transaction: below full
    # speed batches are small, and one commit (one WAL flush) beats two for latency.
    flush_split_rows: int = 5_000
    # Nor is a batch with fewer rows than this per event it took (one that collapses
    # well): split, it would finish sooner, the next batch would be taken sooner and
    # collapse less, and a backlog then costs more rows than the second connection
    # gains (spr bench --scenario backlog: 392,717 events/s split, 425,789 not).
    flush_split_rows_per_event: float = 0.5
    connect_timeout_s: float = 5.0
    flush_retry_s: float = 60.0
    revoke_budget_ms: int | None = None
    auto_create_schema: bool = False
    consume_batch: int = 2_000
    # consume(n, timeout) returns when it has n messages *or* the timeout passed, so
    # below full speed this is a floor on latency. At 10k events/s (spr bench --rate):
    # 50 ms gave p50 37 / p99 66 ms, 5 ms 8.2 / 17.5 ms, 2 ms 7.2 / 13.0 ms. At full
    # speed n arrive first and it does not matter; idle, it costs ~500 cheap calls/s.
    consume_timeout_ms: int = 2
    ring_capacity: int = 262_144
    ring_ttl_ms: int = 600_000
    idle_exit_s: float | None = None
    max_events: int | None = None
    on_offset_gap: str = "fail"
    # An event on a partition its key does not map to (design §10): "auto" applies it
    # when it carries a sequence (the guard orders it) and dead-letters it without one;
    # "apply", "dead-letter" and "stop" decide for every misrouted event.
    on_misrouted: str = "auto"
    workers: int = 1
    # A partition with lag whose position has not moved for this long, while spr does
    # not hold it, is stalled (a bug or a broker problem): warned about, counted, and
    # sought back to its committed offset and resumed (spr.engine.stalls).
    stall_after_s: float = 10.0
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    dead_letters: bool = True
    dlq_topic: str | None = None

    @property
    def lanes(self) -> int:
        """``flush_connections`` as resolved (never None once built)."""
        assert self.flush_connections is not None
        return self.flush_connections

    def __post_init__(self) -> None:
        if not self.group_id:
            raise ConfigError("a consumer group is required (--group)")
        if isinstance(self.topics, str) or not self.topics:
            raise ConfigError("at least one topic is required (--topic)")
        if len(set(self.topics)) != len(self.topics) or not all(self.topics):
            raise ConfigError("topics must be non-empty and distinct")
        if not self.bootstrap:
            raise ConfigError("the Kafka bootstrap address must not be empty")
        if not self.dsn:
            raise ConfigError("the PostgreSQL DSN must not be empty")
        object.__setattr__(
            self, "kafka", MappingProxyType({str(k): str(v) for k, v in self.kafka.items()})
        )
        if self.flush_connections is None:
            object.__setattr__(self, "flush_connections", default_flush_connections())
        for name in (
            "statement_timeout_ms",
            "connect_timeout_s",
            "flush_retry_s",
            "consume_batch",
            "consume_timeout_ms",
            "ring_capacity",
            "ring_ttl_ms",
            "workers",
            "stall_after_s",
            "flush_connections",
            "flush_split_rows",
        ):
            positive(name, getattr(self, name))
        if not 0.0 <= self.flush_split_rows_per_event <= 1.0:
            raise ConfigError(
                "flush_split_rows_per_event must be between 0 and 1, "
                f"got {self.flush_split_rows_per_event}"
            )
        if self.lanes > MAX_FLUSH_CONNECTIONS:
            raise ConfigError(
                f"flush_connections must be at most {MAX_FLUSH_CONNECTIONS}, "
                f"got {self.flush_connections}"
            )
        for name in ("revoke_budget_ms", "idle_exit_s", "max_events"):
            value = getattr(self, name)
            if value is not None:
                positive(name, value)
        if self.on_misrouted not in ON_MISROUTED:
            raise ConfigError(
                f"on_misrouted must be one of {', '.join(ON_MISROUTED)}, got {self.on_misrouted!r}"
            )
        if self.synchronous_commit not in SYNCHRONOUS_COMMIT:
            raise ConfigError(
                f"synchronous_commit must be one of {', '.join(SYNCHRONOUS_COMMIT)}, "
                f"got {self.synchronous_commit!r}"
            )
        if self.on_offset_gap not in _ON_OFFSET_GAP:
            raise ConfigError(
                f"on_offset_gap must be one of {', '.join(_ON_OFFSET_GAP)}, got {self.on_offset_gap!r}"
            )
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(self.kafka.get(key, "false")).lower() not in ("false", "0"):
                raise ConfigError(f"{key} must stay false: offsets are stored in PostgreSQL")
        if "group.id" in self.kafka and self.kafka["group.id"] != self.group_id:
            raise ConfigError("set the group with --group, not with group.id")
        try:
            poll_ms = int(self.consumer_config()["max.poll.interval.ms"])
        except (KeyError, ValueError):
            poll_ms = 300_000
        if self.revoke_budget_ms is None:
            object.__setattr__(self, "revoke_budget_ms", max(1_000, poll_ms // 5))
        if self.dead_letters:
            self._check_dead_letter_topics()

    def _check_dead_letter_topics(self) -> None:
        if self.dlq_topic is not None and (
            not isinstance(self.dlq_topic, str) or not self.dlq_topic
        ):
            raise ConfigError(
                f"--dlq-topic must name a topic (the default is <topic>.dlq), got {self.dlq_topic!r}"
            )
        for topic, target in self.dead_letter_topics().items():
            if target == topic:
                raise ConfigError(
                    f"the dead-letter topic of '{topic}' is '{topic}' itself, so every dead "
                    "letter would be consumed and dead-lettered again without end; choose "
                    f"another --dlq-topic (the default is '{topic}{DLQ_SUFFIX}')"
                )
            if target in self.topics:
                raise ConfigError(
                    f"the dead-letter topic of '{topic}' is '{target}', which this run also "
                    "consumes, so its dead letters would be read back as events; choose a "
                    "--dlq-topic that is not a source topic"
                )

    def dead_letter_topics(self) -> dict[str, str]:
        """Each source topic's dead-letter topic (see :func:`dlq_topic_for`)."""
        return {topic: dlq_topic_for(topic, self.dlq_topic) for topic in self.topics}

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka configuration for the engine's consumer (user keys win)."""
        return merge_kafka_config(
            CONSUMER_DEFAULTS,
            {"bootstrap.servers": self.bootstrap, "group.id": self.group_id, **self.kafka},
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        """How a failed flush is retried: full-jitter backoff from 50 ms up to 2 s, for
        at most ``flush_retry_s`` seconds (attempts are bounded by that time only)."""
        return RetryPolicy(
            base_delay=0.05, max_delay=2.0, max_attempts=1_000_000, max_elapsed=self.flush_retry_s
        )

    @property
    def effective_revoke_budget_ms(self) -> int:
        """The revoke budget after defaulting (always set once the config is built)."""
        assert self.revoke_budget_ms is not None
        return self.revoke_budget_ms
