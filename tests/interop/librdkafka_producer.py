"""A plain confluent-kafka producer, as the field report's Python services write events.

It reproduces a producer that keeps librdkafka's DEFAULT partitioner
(``consistent_random``: CRC32 of the key bytes modulo the partition count, a random
partition for an empty or missing key), not the ``murmur2_random`` that spr's own producer
sets (design §3): so even with spr's partition key as the message key, most entities land
on a partition other than ``partition_for(key, n)``. The events are sent verbatim as
compact JSON, whichever names they use (the canonical ones or the design §2 aliases such
as ``id``, ``type``, ``seq``, ``status``, ``ts``), and are expected to carry a sequence.
The producer is idempotent with ``acks=all``, so each partition receives the events in
the order given. :func:`produce` blocks until the broker has acknowledged every message,
and returns the partition and offset it assigned to each, in input order. Use it from a
test, with ``tests/interop`` on ``sys.path``::

    from librdkafka_producer import produce
    sent = produce("127.0.0.1:9092", "src", [{"type": "payment", "entity_id": "7", ...}])

It needs only confluent-kafka, which spr depends on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import confluent_kafka

__all__ = ["ENTITY_ID_NAMES", "ENTITY_TYPE_NAMES", "Delivered", "entity_of", "produce"]

# Design §2: where each producer may keep the entity's type and id.
ENTITY_TYPE_NAMES = ("entityType", "entity_type", "type", "event_type")
ENTITY_ID_NAMES = ("entityId", "entity_id")

KeyChoice = Literal["partition", "routing"] | Callable[[Mapping[str, Any]], bytes | None]


@dataclass(frozen=True)
class Delivered:
    """One acknowledged message: where the broker put it and exactly what was sent."""

    index: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def entity_of(event: Mapping[str, Any]) -> tuple[str, str]:
    """``(entity_type, entity_id)`` of an event under any of the design §2 names; a
    missing one is ``""``."""
    entity_type = next((str(event[n]) for n in ENTITY_TYPE_NAMES if n in event), "")
    entity_id = next((str(event[n]) for n in ENTITY_ID_NAMES if n in event), "")
    return entity_type, entity_id


def _key(event: Mapping[str, Any], choice: KeyChoice) -> bytes | None:
    if callable(choice):
        return choice(event)
    routing_key = ":".join(entity_of(event)).encode()
    if choice == "routing":
        return routing_key
    # spr's partition key (design §3), computed here so that this tool does not
    # depend on spr's own code.
    return hashlib.sha256(routing_key).digest()[:8].hex().encode()


def produce(
    bootstrap: str,
    topic: str,
    events: Sequence[Mapping[str, Any]],
    *,
    key: KeyChoice = "partition",
    headers: Callable[[Mapping[str, Any]], Sequence[tuple[str, bytes]]] | None = None,
    config: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> list[Delivered]:
    """Send ``events`` to ``topic`` in order and return where each one landed.

    ``key`` is ``"partition"`` (spr's partition key of the event's entity, the default),
    ``"routing"`` (the plain ``entity_type:entity_id`` string) or a function of the
    event. ``config`` is merged over the producer settings; it must not be used to set
    ``partitioner`` unless a test means to leave librdkafka's default. Blocks for at
    most about ``timeout_s``; raises ``TimeoutError`` when some message was not
    acknowledged by then, and ``RuntimeError`` when the broker rejected one.
    """
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": "spr-interop-librdkafka",
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": max(1000, int(timeout_s * 1000)),
    }
    settings.update(config or {})
    producer = confluent_kafka.Producer(settings)
    results: list[Delivered | None] = [None] * len(events)
    errors: list[str] = []

    def on_delivery(
        index: int, sent_headers: Sequence[tuple[str, str | bytes | None]] | None
    ) -> Callable[[Any, Any], None]:
        def callback(error: Any, message: Any) -> None:
            if error is not None:
                errors.append(f"message {index}: {error}")
                return
            results[index] = Delivered(
                index=index,
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                key=message.key(),
                value=message.value(),
                headers=tuple(
                    (k, v.encode() if isinstance(v, str) else v or b"")
                    for k, v in sent_headers or ()
                ),
            )

        return callback

    deadline = time.monotonic() + timeout_s
    for index, event in enumerate(events):
        value = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        message_headers: list[tuple[str, str | bytes | None]] | None = None
        if headers is not None:
            message_headers = list(headers(event))
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=_key(event, key),
                    headers=message_headers,
                    on_delivery=on_delivery(index, message_headers),
                )
                break
            except BufferError:
                if time.monotonic() > deadline:
                    raise TimeoutError("librdkafka's queue stayed full") from None
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(max(0.0, deadline - time.monotonic()))
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(events)} messages failed: {errors[:3]}")
    if remaining:
        raise TimeoutError(f"{remaining} of {len(events)} messages not acknowledged in time")
    delivered = [r for r in results if r is not None]
    if len(delivered) != len(events):
        raise RuntimeError(f"only {len(delivered)} of {len(events)} delivery reports arrived")
    return delivered
