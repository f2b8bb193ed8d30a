"""Every confluent-kafka client spr makes, from one set of connection settings.

librdkafka writes its own log lines (``%3|...|FAIL|...``) straight to stderr unless a
``logger`` is configured; each client here logs through the ``spr.kafka`` logger
instead, which the command line keeps quiet unless asked (``-v``). A read-back consumer
(:func:`read_positions`) belongs to no group and commits nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from spr.config.kafka import connection_settings

__all__ = ["KAFKA_LOG", "admin_client", "consumer", "producer", "read_positions", "topic_partition"]

KAFKA_LOG = logging.getLogger("spr.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())

_ERR_PARTITION_EOF = -191
TopicPartitionKey = tuple[str, int]


def _with_logger(conf: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(conf)
    result.setdefault("logger", KAFKA_LOG)
    return result


def consumer(conf: Mapping[str, Any]) -> Any:
    """A ``confluent_kafka.Consumer`` with ``conf`` (logging through ``spr.kafka``)."""
    from confluent_kafka import Consumer

    return Consumer(_with_logger(conf))


def producer(conf: Mapping[str, Any]) -> Any:
    """A ``confluent_kafka.Producer`` with ``conf`` (logging through ``spr.kafka``)."""
    from confluent_kafka import Producer

    return Producer(_with_logger(conf))


def admin_client(conf: Mapping[str, Any]) -> Any:
    """An ``AdminClient`` that connects like ``conf`` does: only its connection settings
    are kept, since an admin client refuses consumer and producer keys."""
    from confluent_kafka.admin import AdminClient

    return AdminClient(_with_logger(connection_settings(conf)))


def topic_partition(topic: str, partition: int, offset: int | None = None) -> Any:
    """A ``confluent_kafka.TopicPartition`` (the client is imported on first use, so that
    pure-logic modules and their tests import without it)."""
    from confluent_kafka import TopicPartition

    if offset is None:
        return TopicPartition(topic, partition)
    return TopicPartition(topic, partition, offset)


def read_positions(
    conf: Mapping[str, Any],
    ranges: Mapping[TopicPartitionKey, tuple[int, int]],
    *,
    timeout_s: float,
) -> dict[tuple[str, int, int], Any]:
    """The messages of each partition from ``first`` to ``last`` offset (inclusive, per
    ``(topic, partition) -> (first, last)``), keyed by ``(topic, partition, offset)``.

    Read by a consumer that belongs to no group and never commits, connected like
    ``conf``. A partition stops at ``last``, at its end, or when ``timeout_s`` runs
    out; what could not be read is absent. Never raises for a server problem (the
    caller has a fallback); blocks at most about ``timeout_s``.
    """
    found: dict[tuple[str, int, int], Any] = {}
    if not ranges:
        return found
    settings = connection_settings(conf)
    settings.update(
        {
            "group.id": f"spr-read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
    )
    reader = None
    try:
        reader = consumer(settings)
        reader.assign([topic_partition(t, p, first) for (t, p), (first, _) in ranges.items()])
        done: set[TopicPartitionKey] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ranges) and time.monotonic() < deadline:
            for message in reader.consume(500, 0.2):
                key = (message.topic(), message.partition())
                error = message.error()
                if error is not None:
                    if error.code() == _ERR_PARTITION_EOF:
                        done.add(key)
                    continue
                if key in done or key not in ranges:
                    continue
                offset = message.offset()
                found[(key[0], key[1], offset)] = message
                if offset >= ranges[key][1]:
                    done.add(key)
                    reader.pause([topic_partition(*key)])
    except Exception as exc:  # the caller falls back to what it knows
        KAFKA_LOG.debug("reading messages back failed: %s", exc)
    finally:
        if reader is not None:
            try:
                reader.close()
            except Exception as exc:
                KAFKA_LOG.debug("closing the reader failed: %s", exc)
    return found
