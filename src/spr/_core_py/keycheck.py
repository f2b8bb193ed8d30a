"""The key check (design §3): a message's Kafka key must be the partition key of its
entity's routing key.

Twin of ``src/spr/_core/keycheck.pxi``, without its memo: here every check hashes.
"""

from __future__ import annotations

from typing import Any

from spr._core_py.routing import partition_key
from spr._event import Event, reason_key_mismatch, reason_key_missing
from spr.errors import InvalidEvent


def check_key(message_key: Any, event: Event) -> None:
    """Raise InvalidEvent unless ``message_key`` (bytes, or a str as UTF-8) is the
    partition key of ``event``'s entity; a missing key fails too (design §3)."""
    expected = partition_key(f"{event.entity_type}:{event.entity_id}")
    if message_key is None:
        raise InvalidEvent(reason_key_missing(event.entity_type, event.entity_id, expected))
    actual = message_key.encode("utf-8") if isinstance(message_key, str) else message_key
    if actual != expected.encode("ascii"):
        raise InvalidEvent(
            reason_key_mismatch(bytes(actual), event.entity_type, event.entity_id, expected)
        )
