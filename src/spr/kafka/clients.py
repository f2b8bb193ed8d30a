"""Every confluent-kafka client spr makes, from one set of connection settings.

librdkafka writes its own log lines (``%3|...|FAIL|...``) straight to stderr unless a
``logger`` is configured; each client here logs through the ``spr.kafka`` logger
instead, which the command line keeps quiet unless asked (``-v``). A read-back consumer
(:func:`read_positions`) belongs to no group and commits nothing.

A setting librdkafka refuses (an unknown key, a bad value, an unknown assignor) raises
:class:`ConfigError` with librdkafka's sentence, which names the key, when the client is
built; :func:`check_settings` does the same without connecting anywhere.
:func:`cluster_problem` answers "is this cluster there?" within a fraction of a second
when the connection is refused, instead of waiting out a metadata timeout.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from spr.config.kafka import connection_settings
from spr.errors import ConfigError

__all__ = [
    "KAFKA_LOG",
    "admin_client",
    "check_settings",
    "cluster_problem",
    "consumer",
    "producer",
    "read_positions",
    "topic_partition",
]

KAFKA_LOG = logging.getLogger("spr.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())

_ERR_PARTITION_EOF = -191
TopicPartitionKey = tuple[str, int]


# librdkafka's codes (KafkaError._*) that settle whether a cluster can be used at all:
# every bootstrap broker refused or dropped the connection, or it refused the
# credentials, or TLS failed.
_ERR_ALL_BROKERS_DOWN = -187
_ERR_AUTHENTICATION = -169
_ERR_SSL = -181
_ERR_SASL_AUTHENTICATION = 58
_DECISIVE = frozenset(
    (_ERR_ALL_BROKERS_DOWN, _ERR_AUTHENTICATION, _ERR_SSL, _ERR_SASL_AUTHENTICATION)
)


def _with_logger(conf: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(conf)
    result.setdefault("logger", KAFKA_LOG)
    return result


def _build(kind: Callable[[dict[str, Any]], Any], conf: Mapping[str, Any]) -> Any:
    from confluent_kafka import KafkaException

    try:
        return kind(_with_logger(conf))
    except KafkaException as exc:
        raise settings_error(exc) from None
    except (TypeError, ValueError) as exc:  # a value of the wrong Python type
        raise ConfigError(f"a Kafka client setting is invalid: {exc}") from None


def settings_error(exc: BaseException) -> ConfigError:
    """The one sentence for a configuration librdkafka refused. librdkafka's own text
    names the key (``No such configuration property: "bogus.key"``, ``Invalid value for
    configuration property "session.timeout.ms"``, ``Unsupported
    partition.assignment.strategy: nope``)."""
    error: Any = exc.args[0] if exc.args else exc
    text = error.str() if hasattr(error, "str") else str(error)
    text = text.removeprefix("Failed to create consumer: ").removeprefix(
        "Failed to create producer: "
    )
    return ConfigError(
        f"Kafka refused a client setting: {text.rstrip('.')} (check -X, the [kafka] section "
        "of the config file and SPR_KAFKA_* variables)"
    )


def consumer(conf: Mapping[str, Any]) -> Any:
    """A ``confluent_kafka.Consumer`` with ``conf`` (logging through ``spr.kafka``).
    Raises ConfigError (one sentence naming the key) when librdkafka refuses a setting."""
    from confluent_kafka import Consumer

    return _build(Consumer, conf)


def producer(conf: Mapping[str, Any]) -> Any:
    """A ``confluent_kafka.Producer`` with ``conf`` (logging through ``spr.kafka``).
    Raises ConfigError (one sentence naming the key) when librdkafka refuses a setting."""
    from confluent_kafka import Producer

    return _build(Producer, conf)


def admin_client(conf: Mapping[str, Any]) -> Any:
    """An ``AdminClient`` that connects like ``conf`` does: only its connection settings
    are kept, since an admin client refuses consumer and producer keys. Raises
    ConfigError when librdkafka refuses one of them."""
    from confluent_kafka.admin import AdminClient

    return _build(AdminClient, connection_settings(conf))


def check_settings(conf: Mapping[str, Any]) -> None:
    """Raise ConfigError (one sentence naming the key) unless librdkafka accepts ``conf``
    as a consumer configuration: unknown keys, bad values, an unknown assignor. Builds
    a consumer with no bootstrap servers, so nothing is contacted; takes about a
    millisecond. Keys only a producer knows are accepted (librdkafka ignores them)."""
    settings = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
    settings.setdefault("group.id", "spr-settings-check")
    # Without brokers librdkafka would only log that it has none; keep that quiet.
    settings.setdefault("log_level", 0)
    client = consumer(settings)
    client.close()


def cluster_problem(conf: Mapping[str, Any], *, timeout_s: float = 10.0) -> Any | None:
    """None once the cluster of ``conf`` (its connection settings) answers a metadata
    request; otherwise the librdkafka error that says best why not (a ``KafkaError``,
    or the last exception; :func:`spr.kafka.admin.unreachable` turns it into the
    sentence).

    A refused connection, refused credentials or a failed TLS handshake is reported by
    librdkafka within milliseconds, so this returns in well under a second then; a
    silent address (packets dropped) after ``timeout_s``. Blocks; raises ConfigError
    for a connection setting librdkafka refuses."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[Any] = []
    settings = connection_settings(conf)
    settings.setdefault("socket.timeout.ms", max(1000, int(timeout_s * 1000)))
    settings["error_cb"] = errors.append
    client = _build(AdminClient, settings)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            client.list_topics(timeout=max(0.05, min(0.1, remaining)))
            return None
        except KafkaException as exc:
            client.poll(0)  # serves error_cb
            decisive = [e for e in errors if e.code() in _DECISIVE or e.fatal()]
            if decisive or remaining <= 0:
                return _most_telling(errors) or exc


def _most_telling(errors: list[Any]) -> Any:
    """Of librdkafka's errors, the one that says most: a credentials or TLS failure
    over a plain "brokers are down"."""
    for error in errors:
        text = error.str()
        if error.code() in (_ERR_AUTHENTICATION, _ERR_SSL, _ERR_SASL_AUTHENTICATION) or (
            "SASL" in text or "SSL" in text
        ):
            return error
    return errors[0] if errors else None


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
