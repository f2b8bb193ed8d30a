"""librdkafka settings: spr's consumer defaults, and the one place they are merged.

Kafka client settings are merged in exactly one place, :func:`merge_kafka_config`, where
the user's keys always win over spr's defaults. :func:`connection_settings` is the one
definition of "where and how to connect" (bootstrap, security, SASL, SSL, socket, client
id), which every client spr builds beside the consumer (the dead-letter producer, the
admin client, a read-back consumer) shares with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "CONNECTION_PREFIXES",
    "CONSUMER_DEFAULTS",
    "connection_settings",
    "merge_kafka_config",
    "uses_consumer_protocol",
    "uses_cooperative_rebalance",
]


#: spr's librdkafka consumer defaults (design §4). ``merge_kafka_config`` lets user keys
#: override any of them.
CONSUMER_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": "earliest",
        # Prefetch memory: librdkafka keeps whole fetch responses alive while any of
        # their messages is queued, so these three bound the consumer's RSS. Measured
        # on the bench topic: 8 MB queue + 4 MB fetches peak at 84 MB RSS for a bare
        # consumer vs 136 MB with 32 MB + 10 MB, at the same rate; the whole engine
        # (1M events) peaks at 161 MB with 4 MB + 2 MB vs 192 MB with 8 MB + 4 MB, just
        # as fast (4 MB is ~80 ms of events at 200k/s, and the fetcher refills it in
        # 10 ms steps; a message larger than a fetch still comes, per KIP-74).
        "fetch.max.bytes": "2097152",
        "max.partition.fetch.bytes": "524288",
        # librdkafka's 1 s default stalls any consumer slower than its fetcher.
        "fetch.queue.backoff.ms": "10",
        "queued.max.messages.kbytes": "4096",
        "session.timeout.ms": "10000",
        "heartbeat.interval.ms": "2000",
        "max.poll.interval.ms": "60000",
        # Only committed transactions are read (librdkafka's default too, stated here
        # because spr relies on it): output a transform aborted is never applied.
        "isolation.level": "read_committed",
        # The end of a partition is reported: a topic written with transactions ends
        # with a commit marker, a control record the consumer skips, so the last offset
        # consumed + 1 stays one below the end; at the end the stored offset moves to
        # it, so that "caught up" and lag count what a consumer can reach.
        "enable.partition.eof": "true",
    }
)

# Settings the KIP-848 consumer protocol moves to the broker; librdkafka rejects them.
_CLASSIC_ONLY = ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms")


def merge_kafka_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge librdkafka settings: every key in ``overrides`` wins over ``defaults``.

    When the result selects the KIP-848 consumer protocol (``group.protocol=consumer``),
    the classic-protocol keys that came only from ``defaults`` are dropped, because the
    broker owns them there and librdkafka refuses them; keys the user set are kept.
    Never raises; never mutates its arguments.
    """
    merged = dict(defaults)
    merged.update(overrides)
    if uses_consumer_protocol(merged):
        for key in _CLASSIC_ONLY:
            if key not in overrides:
                merged.pop(key, None)
    return merged


def uses_consumer_protocol(conf: Mapping[str, Any]) -> bool:
    """True when the configuration selects the KIP-848 ``consumer`` group protocol."""
    return str(conf.get("group.protocol", "classic")).strip().lower() == "consumer"


def uses_cooperative_rebalance(conf: Mapping[str, Any]) -> bool:
    """True when rebalances hand out incremental deltas instead of the whole assignment.

    The consumer protocol is always incremental. The classic protocol is only when every
    configured assignor is ``cooperative-sticky`` (a mixed list rebalances eagerly).
    """
    if uses_consumer_protocol(conf):
        return True
    strategies = [
        s.strip().lower()
        for s in str(conf.get("partition.assignment.strategy", "range,roundrobin")).split(",")
        if s.strip()
    ]
    return bool(strategies) and all(s == "cooperative-sticky" for s in strategies)


#: Settings that say where and how to connect; every client spr makes shares them.
CONNECTION_PREFIXES = ("bootstrap.", "security.", "sasl.", "ssl.", "socket.", "client.", "broker.")


def connection_settings(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The connection part of a librdkafka configuration (see :data:`CONNECTION_PREFIXES`),
    for a client of another kind that must reach the same cluster the same way."""
    return {k: v for k, v in conf.items() if str(k).startswith(CONNECTION_PREFIXES)}
