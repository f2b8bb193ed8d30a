"""spr's Kafka clients: built in one place, from the same connection settings.

:mod:`spr.kafka.clients` makes every confluent-kafka client spr uses (consumer, producer,
admin, a read-back consumer outside any group), so that each one connects the way the
user configured the consumer (SASL, SSL, ...) and logs through Python logging.
:class:`spr.kafka.admin.KafkaAdmin` is the one administrative wrapper (offsets, topics,
groups) used by the engine, ``spr lag``, ``spr replay`` and ``spr plan``.
"""

from __future__ import annotations

from spr.kafka.admin import KafkaAdmin

__all__ = ["KafkaAdmin"]
