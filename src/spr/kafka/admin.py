"""The one Kafka administrative wrapper: offsets, topics, groups, retention.

:class:`KafkaAdmin` is used by the engine (start positions, retention gaps, lag), by
``spr lag``, ``spr replay`` and ``spr plan``. It is built from the same librdkafka
settings as the consumer, so it connects the same way (SASL, SSL, ...). Every call
blocks for at most ``timeout_s``; a broker that does not answer raises
:class:`ServerUnavailable` with one sentence that names the address it tried and whether
the problem is reaching it, authenticating or TLS; a refusal (unknown topic, active
group) raises :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from spr.config.kafka import connection_settings
from spr.errors import ConfigError, ServerUnavailable
from spr.kafka.clients import (
    admin_client,
    cluster_problem,
    read_positions,
    topic_partition,
)

__all__ = ["DEFAULT_TIMEOUT_S", "KafkaAdmin", "unreachable"]

DEFAULT_TIMEOUT_S = 10.0
TopicPartitionKey = tuple[str, int]

# librdkafka's codes for a broker that was reached but refused us (KafkaError._*).
_ERR_AUTHENTICATION = -169
_ERR_SSL = -181
_ERR_TOPIC_AUTHORIZATION = 29
_ERR_GROUP_AUTHORIZATION = 30
_ERR_SASL_AUTHENTICATION = 58
# ... and for one that could not be reached at all.
_UNREACHABLE_CODES = frozenset(
    (-195, -187, -185, -193, _ERR_AUTHENTICATION, _ERR_SSL, _ERR_SASL_AUTHENTICATION)
)  # _TRANSPORT, _ALL_BROKERS_DOWN, _TIMED_OUT, _RESOLVE, and the three above


def unreachable(bootstrap: str, error: BaseException | Any | None = None) -> ServerUnavailable:
    """The one sentence for a broker spr cannot use: not reachable, refusing the
    credentials, or failing TLS, with the address that was tried."""
    kafka_error: Any = error.args[0] if isinstance(error, BaseException) and error.args else error
    code = kafka_error.code() if hasattr(kafka_error, "code") else None
    text = kafka_error.str() if hasattr(kafka_error, "str") else str(kafka_error or "")
    if code in (_ERR_AUTHENTICATION, _ERR_SASL_AUTHENTICATION) or "SASL" in text:
        return ServerUnavailable(
            f"Kafka at {bootstrap} refused to authenticate spr ({text}); check the "
            "sasl.* and security.protocol settings"
        )
    if code == _ERR_SSL or "SSL" in text:
        return ServerUnavailable(
            f"the TLS handshake with Kafka at {bootstrap} failed ({text}); check the ssl.* "
            "and security.protocol settings"
        )
    if code in (_ERR_TOPIC_AUTHORIZATION, _ERR_GROUP_AUTHORIZATION):
        return ServerUnavailable(f"Kafka at {bootstrap} denied spr access ({text})")
    return ServerUnavailable(
        f"Kafka is not reachable at {bootstrap}; start it (spr dev up) or pass the right "
        "--bootstrap"
    )


def _bootstrap_of(conf: Mapping[str, Any]) -> str:
    return str(conf.get("bootstrap.servers", ""))


class KafkaAdmin:
    """Blocking administrative reads and writes, connected like ``conf`` (a librdkafka
    configuration; only its connection settings are used)."""

    def __init__(self, conf: Mapping[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.conf = connection_settings(conf)
        self.conf.setdefault("socket.timeout.ms", int(timeout_s * 1000))
        self.bootstrap = _bootstrap_of(self.conf)
        self.timeout_s = timeout_s
        self.admin = admin_client(self.conf)

    @classmethod
    def for_bootstrap(
        cls, bootstrap: str, *, kafka: Mapping[str, Any] | None = None, timeout_s: float = 10.0
    ) -> KafkaAdmin:
        """An admin for ``bootstrap``, with the user's librdkafka settings ``kafka``
        (their connection part: security protocol, SASL, SSL)."""
        return cls({**(kafka or {}), "bootstrap.servers": bootstrap}, timeout_s=timeout_s)

    def _wait(self, future: Future[Any], what: str) -> Any:
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError as exc:
            raise ServerUnavailable(
                f"Kafka at {self.bootstrap} did not answer within {self.timeout_s:g} s ({what})"
            ) from exc
        except Exception as exc:
            err = exc.args[0] if exc.args else exc
            code = err.code() if hasattr(err, "code") else None
            if code in _UNREACHABLE_CODES:
                raise unreachable(self.bootstrap, err) from exc
            raise ConfigError(
                f"Kafka refused to {what}: {getattr(err, 'str', lambda: err)()}"
            ) from exc

    def _metadata(self, topic: str | None = None) -> Any:
        try:
            if topic is None:
                return self.admin.list_topics(timeout=self.timeout_s)
            return self.admin.list_topics(topic, timeout=self.timeout_s)
        except Exception as exc:
            raise unreachable(self.bootstrap, exc) from exc

    def check_reachable(self) -> None:
        """Raise ServerUnavailable (one sentence) unless the cluster answers: within a
        fraction of a second when the connection is refused, the credentials are
        refused or TLS fails (:func:`spr.kafka.clients.cluster_problem`), else after
        ``timeout_s``."""
        problem = cluster_problem(self.conf, timeout_s=self.timeout_s)
        if problem is not None:
            raise unreachable(self.bootstrap, problem)

    def partition_count(self, topic: str) -> int | None:
        """How many partitions ``topic`` has; None when it does not exist."""
        md = self._metadata(topic).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return None
        return len(md.partitions)

    def partitions(self, topics: Iterable[str]) -> list[TopicPartitionKey]:
        """Every partition of ``topics``; ConfigError naming a topic that does not exist."""
        result: list[TopicPartitionKey] = []
        for topic in topics:
            md = self._metadata(topic).topics.get(topic)
            if md is None or md.error is not None or not md.partitions:
                raise ConfigError(f"topic {topic} does not exist on {self.bootstrap}")
            result.extend((topic, p) for p in sorted(md.partitions))
        return result

    def group_offsets(self, group: str) -> dict[TopicPartitionKey, int]:
        """The group's committed offsets in Kafka (partitions without one are absent)."""
        from confluent_kafka import ConsumerGroupTopicPartitions

        futures = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        result = self._wait(futures[group], f"list the offsets of group {group}")
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions or []
            if tp.offset >= 0
        }

    def _list_offsets(self, specs: Mapping[TopicPartitionKey, Any], what: str) -> dict[Any, int]:
        if not specs:
            return {}
        futures = self.admin.list_offsets(
            {topic_partition(t, p): spec for (t, p), spec in specs.items()},
            request_timeout=self.timeout_s,
        )
        return {
            (tp.topic, tp.partition): int(self._wait(f, what).offset) for tp, f in futures.items()
        }

    def end_offsets(
        self, partitions: Sequence[TopicPartitionKey], *, committed_only: bool = False
    ) -> dict[TopicPartitionKey, int]:
        """Each partition's end offset: the high watermark, or with ``committed_only``
        the last stable offset (what a ``read_committed`` consumer can reach: the first
        offset of the oldest open transaction, else the high watermark)."""
        from confluent_kafka import IsolationLevel
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        spec = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        if not committed_only:
            return self._list_offsets(dict.fromkeys(partitions, spec), "list end offsets")
        futures = self.admin.list_offsets(
            {topic_partition(t, p): spec for t, p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=self.timeout_s,
        )
        return {
            (tp.topic, tp.partition): int(self._wait(f, "list end offsets").offset)
            for tp, f in futures.items()
        }

    def log_start_offsets(self, partitions: Sequence[TopicPartitionKey]) -> dict[Any, int]:
        """Each partition's log start offset (the oldest offset retention kept)."""
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        spec = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        return self._list_offsets(dict.fromkeys(partitions, spec), "list log start offsets")

    def watermarks(
        self, partitions: Sequence[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``(log start, end)`` offsets of each partition."""
        low = self.log_start_offsets(partitions)
        high = self.end_offsets(partitions)
        return {k: (low[k], high[k]) for k in partitions}

    def offsets_for_timestamp(
        self, partitions: Sequence[TopicPartitionKey], timestamp_ms: int
    ) -> dict[TopicPartitionKey, int]:
        """The first offset whose timestamp is >= ``timestamp_ms`` per partition; the end
        offset when every message is older (Kafka answers -1 then)."""
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        found = self._list_offsets(
            {k: OffsetSpec.for_timestamp(timestamp_ms) for k in partitions}, "look up a timestamp"
        )
        missing = [k for k, v in found.items() if v < 0]
        if missing:
            found.update(self.end_offsets(missing))
        return found

    def retention_ms(self, topic: str) -> int | None:
        """The topic's effective ``retention.ms``; None when retention is infinite."""
        from confluent_kafka.admin import (  # type: ignore[attr-defined]
            ConfigResource,
            ResourceType,
        )

        resource = ConfigResource(ResourceType.TOPIC, topic)
        futures = self.admin.describe_configs([resource], request_timeout=self.timeout_s)
        entries = self._wait(futures[resource], f"describe topic {topic}")
        entry = entries.get("retention.ms")
        value = int(entry.value) if entry is not None and entry.value is not None else -1
        return value if value >= 0 else None

    def group_members(self, group: str) -> int:
        """How many members the group has now (0 for an empty or unknown group)."""
        futures = self.admin.describe_consumer_groups([group], request_timeout=self.timeout_s)
        description = self._wait(futures[group], f"describe group {group}")
        return len(description.members or [])

    def group_settled(self, group: str, partitions: Sequence[TopicPartitionKey]) -> bool:
        """Whether ``group`` is stable (no rebalance under way) with every one of
        ``partitions`` assigned to some member."""
        from confluent_kafka import ConsumerGroupState

        futures = self.admin.describe_consumer_groups([group], request_timeout=self.timeout_s)
        description = self._wait(futures[group], f"describe group {group}")
        if description.state != ConsumerGroupState.STABLE:
            return False
        owned = {
            (tp.topic, tp.partition)
            for member in description.members or []
            for tp in (member.assignment.topic_partitions if member.assignment else [])
        }
        return set(partitions) <= owned

    def commit_group_offsets(self, group: str, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Set the group's committed offsets in Kafka. Kafka refuses while the group has
        members (ConfigError)."""
        from confluent_kafka import ConsumerGroupTopicPartitions

        if not offsets:
            return
        request = ConsumerGroupTopicPartitions(
            group, [topic_partition(t, p, o) for (t, p), o in sorted(offsets.items())]
        )
        futures = self.admin.alter_consumer_group_offsets([request])
        result = self._wait(futures[group], f"set the offsets of group {group}")
        for tp in result.topic_partitions or []:
            if tp.error is not None:
                raise ConfigError(
                    f"Kafka refused the offset of {tp.topic}[{tp.partition}] for group "
                    f"{group}: {tp.error.str()}"
                )

    def message_timestamps(
        self, positions: Mapping[TopicPartitionKey, int]
    ) -> dict[TopicPartitionKey, int]:
        """Broker timestamp (epoch ms) of the first message at or after each
        ``(topic, partition) -> offset``, read outside any group. Partitions whose
        message cannot be read within the timeout are absent."""
        messages = read_positions(
            self.conf, {k: (o, o) for k, o in positions.items()}, timeout_s=self.timeout_s
        )
        found: dict[TopicPartitionKey, int] = {}
        for (topic, partition, _offset), message in sorted(messages.items()):
            key = (topic, partition)
            kind, timestamp = message.timestamp()
            if key not in found and kind != 0 and timestamp >= 0:  # 0: not available
                found[key] = timestamp
        return found
