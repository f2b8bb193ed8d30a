# cython: language_level=3
"""Compiled core of spr; mirrors ``spr._core_py`` name for name, with the same semantics.

The per-element loops (murmur2, XXH64, the ring's probe, the pre-parse scan of a
message, the COPY encoder, the routing stage's JSON writer) are plain C; Python objects
appear only at the boundary.
"""

# One extension module, one C file: Batch.ingest calls the decoder, the key check, the
# ring and the row store directly, and the C compiler can inline them. Each job is an
# include file in _core/ (the same seams as the modules of spr._core_py); what several
# of them use is declared in _core.pxd. Include is textual: the files share this
# module's namespace, and their order is the order of module-level initialisation.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset

import hashlib
import types
from datetime import timedelta

import msgspec

from spr._core_py import (
    COPY_BINARY_HEADER,
    PROBE_WINDOW,
    ROW_OVERHEAD_BYTES as _ROW_OVERHEAD_BYTES,
    ZERO_FINGERPRINT_SUBSTITUTE,
    _UNIX_EPOCH,
    check_columns,
)
from spr._core_py.rekey import SCHEMA_VERSION
from spr._event import (
    CANONICAL_DECODER,
    DEFAULT_LIMITS,
    EXPECT_SEQUENCE,
    EXPECT_STRING,
    EXPECT_TIMESTAMP,
    MAX_INT64,
    MAX_TIMESTAMP_MS,
    MISROUTED_APPLY,
    MISROUTED_BY_SEQUENCE,
    RAW_DECODER,
    REASON_BOM,
    REASON_EMPTY,
    REASON_EMPTY_ID,
    REASON_EMPTY_STATE,
    REASON_EMPTY_TYPE,
    REASON_MISROUTED_HELD,
    REASON_MISROUTED_NO_SEQUENCE,
    REASON_MISSING_ID,
    REASON_MISSING_STATE,
    REASON_MISSING_TYPE,
    REASON_NOT_BYTES,
    REASON_NOT_UTF8,
    REASON_NULL,
    STATE_COLUMNS,
    Event,
    CanonicalEvent,
    IngestResult,
    RawEvent,
    RekeyResult,
    reason_alias_type,
    reason_from_msgspec,
    reason_key_mismatch,
    reason_key_missing,
    reason_misrouted,
    reason_too_big,
    reason_too_deep,
    reason_unorderable,
)
from spr.errors import ConfigError, InvalidEvent

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

# Used by more than one include file.
cdef object _sha256 = hashlib.sha256
cdef const char *_HEX = b"0123456789abcdef"
cdef uint64_t _ZERO_SUBSTITUTE = ZERO_FINGERPRINT_SUBSTITUTE
cdef int64_t _MAX_TIMESTAMP_MS = MAX_TIMESTAMP_MS
cdef object _default_limits = DEFAULT_LIMITS
cdef Py_ssize_t _default_max_bytes = DEFAULT_LIMITS.max_bytes
cdef int64_t _default_max_depth = DEFAULT_LIMITS.max_depth

include "_core/routing.pxi"
include "_core/fingerprints.pxi"
include "_core/ring.pxi"
include "_core/decode.pxi"
include "_core/message.pxi"
include "_core/keycheck.pxi"
include "_core/batch.pxi"
include "_core/ingest.pxi"
include "_core/rekey.pxi"
include "_core/copy.pxi"
include "_core/tracing.pxi"
