"""Trace contexts in record headers: the W3C ``traceparent`` and its sampled flag.

The reference of the compiled core's ``_core/tracing.pxi``, which reads the same headers
from a consumed message's librdkafka header list without building a Python object for
any event whose context is not sampled. Here the message's ``headers()`` is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["SampledTrace", "sampled_traces", "traceparent_sampled"]

#: ``(traceparent, tracestate or None, topic, partition, offset)`` of one sampled event.
SampledTrace = tuple[bytes, "bytes | None", str, int, int]

# version "00": 2 + 1 + 32 + 1 + 16 + 1 + 2 characters; later versions may append fields.
_TRACEPARENT_LENGTH = 55
_HEX = frozenset(b"0123456789abcdef")


def traceparent_sampled(value: bytes | str | None) -> bool:
    """Whether ``value`` is a well-formed W3C ``traceparent`` with the sampled flag set.

    Format ``VV-TRACEID(32 hex)-SPANID(16 hex)-FLAGS(2 hex)``, lower-case hex; version
    ``ff`` and all-zero ids are invalid, version ``00`` has exactly these four fields.
    """
    if value is None:
        return False
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    if len(raw) < _TRACEPARENT_LENGTH:
        return False
    if raw[2:3] != b"-" or raw[35:36] != b"-" or raw[52:53] != b"-":
        return False
    if raw[:2] == b"ff" or (raw[:2] == b"00" and len(raw) != _TRACEPARENT_LENGTH):
        return False
    if len(raw) > _TRACEPARENT_LENGTH and raw[55:56] != b"-":
        return False
    if not _HEX.issuperset(raw[:2]) or not _HEX.issuperset(raw[3:35]):
        return False
    if not _HEX.issuperset(raw[36:52]) or not _HEX.issuperset(raw[53:55]):
        return False
    if raw[3:35] == b"0" * 32 or raw[36:52] == b"0" * 16:
        return False
    return bool(int(raw[53:55], 16) & 1)


def _as_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def sampled_traces(messages: Sequence[Any], cap: int) -> list[SampledTrace]:
    """The sampled trace contexts of ``messages``, in order, at most ``cap`` of them.

    A message's context is its last ``traceparent`` header (and its last ``tracestate``,
    None when absent or empty); it counts when :func:`traceparent_sampled`. Messages after
    the ``cap``-th sampled one are not looked at.
    """
    found: list[SampledTrace] = []
    if cap <= 0:
        return found
    for message in messages:
        headers = message.headers()
        if not headers:
            continue
        parent: Any = None
        state: Any = None
        for key, value in headers:
            if key == "traceparent":
                parent = value
            elif key == "tracestate":
                state = value
        parent_bytes = _as_bytes(parent)
        if not traceparent_sampled(parent_bytes):
            continue
        assert parent_bytes is not None
        found.append(
            (
                parent_bytes,
                _as_bytes(state) or None,
                message.topic(),
                message.partition(),
                message.offset(),
            )
        )
        if len(found) >= cap:
            break
    return found
