"""Pure-Python reference implementation of spr's per-event core.

This package defines the semantics; ``spr._core`` (Cython) mirrors every public name
here and must give the same results. Nothing in it reads a clock: time enters only as
``now_ms`` arguments.

Its modules follow the seams of the compiled core's include files (``src/spr/_core/``):
``routing``, ``fingerprints``, ``ring``, ``decode``, ``keycheck``, ``batch``, ``ingest``,
``copy`` and ``tracing``. The compiled core's ``message.pxi`` (reading a Kafka message's C struct)
has no twin: here the message's methods are called. ``ints`` holds the integer range
checks that the compiled core gets from its C types. Import the names from this package;
the modules are an implementation detail. ``__all__`` is the core's API, the same as
``spr._core``'s; the other names re-exported here (``X as X``) are the constants that
``spr._core`` takes from the twin, and helpers the tests use.
"""

from __future__ import annotations

from spr._core_py.batch import _UNIX_EPOCH as _UNIX_EPOCH
from spr._core_py.batch import ROW_OVERHEAD_BYTES as ROW_OVERHEAD_BYTES
from spr._core_py.batch import Batch
from spr._core_py.batch import check_columns as check_columns
from spr._core_py.copy import COPY_BINARY_HEADER as COPY_BINARY_HEADER
from spr._core_py.copy import COPY_BINARY_TRAILER as COPY_BINARY_TRAILER
from spr._core_py.decode import decode_batch, decode_event, decode_with_sequence
from spr._core_py.fingerprints import event_fingerprint, fingerprint
from spr._core_py.keycheck import check_key
from spr._core_py.rekey import rekey, source_fingerprint
from spr._core_py.ring import (
    PROBE_WINDOW,
    ZERO_FINGERPRINT_SUBSTITUTE,
    IdempotencyRing,
    SourceTable,
)
from spr._core_py.ring import _home_slot as _home_slot
from spr._core_py.routing import murmur2, partition_for, partition_key, route_many
from spr._core_py.tracing import sampled_traces, traceparent_sampled

__all__ = [
    "PROBE_WINDOW",
    "ZERO_FINGERPRINT_SUBSTITUTE",
    "Batch",
    "IdempotencyRing",
    "SourceTable",
    "check_key",
    "decode_batch",
    "decode_event",
    "decode_with_sequence",
    "event_fingerprint",
    "fingerprint",
    "murmur2",
    "partition_for",
    "partition_key",
    "rekey",
    "route_many",
    "sampled_traces",
    "source_fingerprint",
    "traceparent_sampled",
]
