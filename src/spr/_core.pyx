# cython: language_level=3
"""Compiled core of spr; mirrors ``spr._core_py`` name for name, with the same semantics.

The per-element loops (murmur2, XXH64, the ring's probe, the pre-parse scan of a
message, the COPY encoder) are plain C; Python objects appear only at the boundary.
"""

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
from spr._event import (
    CANONICAL_DECODER,
    DEFAULT_LIMITS,
    EXPECT_SEQUENCE,
    EXPECT_STRING,
    EXPECT_TIMESTAMP,
    MAX_INT64,
    MAX_TIMESTAMP_MS,
    RAW_DECODER,
    REASON_BOM,
    REASON_EMPTY,
    REASON_EMPTY_ID,
    REASON_EMPTY_STATE,
    REASON_EMPTY_TYPE,
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
    reason_alias_type,
    reason_from_msgspec,
    reason_key_mismatch,
    reason_key_missing,
    reason_too_big,
    reason_too_deep,
)
from spr.errors import ConfigError, InvalidEvent

__all__ = [
    "PROBE_WINDOW",
    "ZERO_FINGERPRINT_SUBSTITUTE",
    "Batch",
    "IdempotencyRing",
    "decode_batch",
    "decode_event",
    "event_fingerprint",
    "fingerprint",
    "murmur2",
    "partition_for",
    "partition_key",
    "route_many",
]

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static inline uint64_t spr_read64(const uint8_t *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint32_t spr_read32(const uint8_t *p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }

    /* Kafka's Java Utils.murmur2, returned as the signed int Java returns. */
    static inline int32_t spr_murmur2(const uint8_t *data, size_t length) {
        const uint32_t m = 0x5bd1e995u;
        uint32_t h = 0x9747b28cu ^ (uint32_t)length;
        size_t whole = length & ~(size_t)3, i;
        for (i = 0; i < whole; i += 4) {
            uint32_t k = spr_read32(data + i);
            k *= m; k ^= k >> 24; k *= m;
            h *= m; h ^= k;
        }
        switch (length & 3) {
            case 3: h ^= (uint32_t)data[whole + 2] << 16; /* fall through */
            case 2: h ^= (uint32_t)data[whole + 1] << 8;  /* fall through */
            case 1: h ^= (uint32_t)data[whole]; h *= m;
        }
        h ^= h >> 13; h *= m; h ^= h >> 15;
        return (int32_t)h;
    }

    #define SPR_P1 0x9E3779B185EBCA87ULL
    #define SPR_P2 0xC2B2AE3D27D4EB4FULL
    #define SPR_P3 0x165667B19E3779F9ULL
    #define SPR_P4 0x85EBCA77C2B2AE63ULL
    #define SPR_P5 0x27D4EB2F165667C5ULL
    static inline uint64_t spr_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    static inline uint64_t spr_xxh_round(uint64_t acc, uint64_t input) {
        acc += input * SPR_P2; acc = spr_rotl64(acc, 31); return acc * SPR_P1;
    }
    static inline uint64_t spr_xxh_merge(uint64_t acc, uint64_t val) {
        acc ^= spr_xxh_round(0, val); return acc * SPR_P1 + SPR_P4;
    }
    /* XXH64 with seed 0, as xxhash.xxh64_intdigest computes it. */
    static uint64_t spr_xxh64(const uint8_t *p, size_t len) {
        const uint8_t *end = p + len;
        uint64_t h;
        if (len >= 32) {
            const uint8_t *limit = end - 32;
            uint64_t v1 = SPR_P1 + SPR_P2, v2 = SPR_P2, v3 = 0, v4 = (uint64_t)0 - SPR_P1;
            do {
                v1 = spr_xxh_round(v1, spr_read64(p)); p += 8;
                v2 = spr_xxh_round(v2, spr_read64(p)); p += 8;
                v3 = spr_xxh_round(v3, spr_read64(p)); p += 8;
                v4 = spr_xxh_round(v4, spr_read64(p)); p += 8;
            } while (p <= limit);
            h = spr_rotl64(v1, 1) + spr_rotl64(v2, 7) + spr_rotl64(v3, 12) + spr_rotl64(v4, 18);
            h = spr_xxh_merge(h, v1); h = spr_xxh_merge(h, v2);
            h = spr_xxh_merge(h, v3); h = spr_xxh_merge(h, v4);
        } else {
            h = SPR_P5;
        }
        h += (uint64_t)len;
        while (p + 8 <= end) {
            h ^= spr_xxh_round(0, spr_read64(p));
            h = spr_rotl64(h, 27) * SPR_P1 + SPR_P4;
            p += 8;
        }
        if (p + 4 <= end) {
            h ^= (uint64_t)spr_read32(p) * SPR_P1;
            h = spr_rotl64(h, 23) * SPR_P2 + SPR_P3;
            p += 4;
        }
        while (p < end) {
            h ^= (*p) * SPR_P5;
            h = spr_rotl64(h, 11) * SPR_P1;
            p++;
        }
        h ^= h >> 33; h *= SPR_P2; h ^= h >> 29; h *= SPR_P3; h ^= h >> 32;
        return h;
    }

    /* murmur3's finalizer, then multiply-shift onto [0, capacity). */
    static inline size_t spr_home_slot(uint64_t fp, uint64_t capacity) {
        fp ^= fp >> 33; fp *= 0xff51afd7ed558ccdULL;
        fp ^= fp >> 33; fp *= 0xc4ceb9fe1a85ec53ULL;
        fp ^= fp >> 33;
        return (size_t)(((unsigned __int128)fp * capacity) >> 64);
    }
    static inline void spr_prefetch(const void *p) { __builtin_prefetch(p, 1, 1); }

    /* Strict UTF-8 as Python's codec checks it: no overlongs, surrogates or > U+10FFFF. */
    static int spr_valid_utf8(const uint8_t *s, size_t n) {
        size_t i = 0;
        while (i < n) {
            uint8_t c = s[i];
            if (c < 0x80) { i++; continue; }
            if (c < 0xC2) return 0;
            if (c < 0xE0) {
                if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
                i += 2;
            } else if (c < 0xF0) {
                if (i + 2 >= n) return 0;
                uint8_t c1 = s[i + 1];
                if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
                if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0)) return 0;
                i += 3;
            } else if (c < 0xF5) {
                if (i + 3 >= n) return 0;
                uint8_t c1 = s[i + 1];
                if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80
                        || (s[i + 3] & 0xC0) != 0x80) return 0;
                if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90)) return 0;
                i += 4;
            } else {
                return 0;
            }
        }
        return 1;
    }

    /* Deepest nesting of [ and { outside JSON strings (a running sum that may dip
       below zero on malformed input, exactly like the twin's regex + accumulate). */
    static int64_t spr_json_depth(const uint8_t *s, size_t n) {
        int64_t depth = 0, deepest = 0;
        size_t i = 0;
        while (i < n) {
            uint8_t c = s[i++];
            if (c == '"') {
                while (i < n) {
                    uint8_t d = s[i++];
                    if (d == '\\\\') { i++; }
                    else if (d == '"') { break; }
                }
            } else if (c == '[' || c == '{') {
                if (++depth > deepest) deepest = depth;
            } else if (c == ']' || c == '}') {
                depth--;
            }
        }
        return deepest;
    }

    /* 0: fine, 1: not UTF-8, 2: nested deeper than max_depth. One vectorisable pass
       decides the common case; the exact checks run only when it can't. */
    static int spr_prescan(const uint8_t *s, size_t n, int64_t max_depth) {
        uint8_t high = 0;
        int64_t opens = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t c = s[i];
            high |= c;
            opens += (c == '[') | (c == '{');
        }
        if ((high & 0x80) && !spr_valid_utf8(s, n)) return 1;
        if (opens > max_depth && spr_json_depth(s, n) > max_depth) return 2;
        return 0;
    }

    static inline char *spr_put_be16(char *p, int16_t v) {
        uint16_t u = (uint16_t)v; p[0] = (char)(u >> 8); p[1] = (char)u; return p + 2;
    }
    static inline char *spr_put_be32(char *p, int32_t v) {
        uint32_t u = (uint32_t)v;
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        u = __builtin_bswap32(u);
    #endif
        memcpy(p, &u, 4); return p + 4;
    }
    static inline char *spr_put_be64(char *p, int64_t v) {
        uint64_t u = (uint64_t)v;
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        u = __builtin_bswap64(u);
    #endif
        memcpy(p, &u, 8); return p + 8;
    }
    """
    int32_t spr_murmur2(const uint8_t *data, size_t length) nogil
    uint64_t spr_xxh64(const uint8_t *p, size_t length) nogil
    size_t spr_home_slot(uint64_t fp, uint64_t capacity) nogil
    void spr_prefetch(const void *p) nogil
    int spr_prescan(const uint8_t *s, size_t n, int64_t max_depth) nogil
    char *spr_put_be16(char *p, int v) nogil
    char *spr_put_be32(char *p, int32_t v) nogil
    char *spr_put_be64(char *p, int64_t v) nogil


cdef object _sha256 = hashlib.sha256
cdef const char *_HEX = b"0123456789abcdef"
cdef int64_t _INT32_MAX = 2147483647


cdef inline const uint8_t *_key_bytes(object key, Py_ssize_t *size, list keep) except NULL:
    # UTF-8 of a str (cached inside the str, no copy for ASCII), or the bytes themselves.
    if type(key) is str:
        return <const uint8_t *>PyUnicode_AsUTF8AndSize(key, size)
    if type(key) is not bytes:
        key = bytes(key)
        keep.append(key)
    size[0] = PyBytes_GET_SIZE(key)
    return <const uint8_t *>PyBytes_AS_STRING(key)


cdef inline int64_t _check_partitions(object num_partitions) except -1:
    if not 0 < num_partitions <= _INT32_MAX:
        raise ValueError(
            f"num_partitions must be between 1 and 2**31-1, got {num_partitions}"
        )
    return num_partitions


# ------------------------------------------------------------- struct field access

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef int _T_OBJECT_EX = 16


cdef Py_ssize_t _slot_offset(object cls, str name) except -1:
    # msgspec stores each field of a Struct in an object slot described by a member
    # descriptor; reading the slot directly skips attribute lookup in the hot loops.
    # Anything unexpected fails the import, and spr._impl then falls back to the twin.
    descr = vars(cls).get(name)
    if (
        type(descr) is not types.MemberDescriptorType
        or (<PyMemberDescrObject *>descr).d_member.type != _T_OBJECT_EX
    ):
        raise ImportError(f"{cls.__name__}.{name} is not a plain object slot")
    return (<PyMemberDescrObject *>descr).d_member.offset


cdef inline object _slot(object obj, Py_ssize_t offset):
    # Only for instances of the Struct the offset came from (or a subclass of it).
    cdef PyObject *value = (<PyObject **>((<char *><PyObject *>obj) + offset))[0]
    if value is NULL:
        raise AttributeError("unset struct field")
    return <object>value


cdef Py_ssize_t _EV_EVENT_ID = _slot_offset(Event, "event_id")
cdef Py_ssize_t _EV_ENTITY_TYPE = _slot_offset(Event, "entity_type")
cdef Py_ssize_t _EV_ENTITY_ID = _slot_offset(Event, "entity_id")
cdef Py_ssize_t _EV_SEQUENCE = _slot_offset(Event, "sequence")
cdef Py_ssize_t _EV_STATE = _slot_offset(Event, "state")
cdef Py_ssize_t _EV_TIMESTAMP_MS = _slot_offset(Event, "timestamp_ms")
cdef Py_ssize_t _EV_PAYLOAD = _slot_offset(Event, "payload")

cdef Py_ssize_t _CAN_EVENT_ID = _slot_offset(CanonicalEvent, "event_id")
cdef Py_ssize_t _CAN_ENTITY_TYPE = _slot_offset(CanonicalEvent, "entity_type")
cdef Py_ssize_t _CAN_ENTITY_ID = _slot_offset(CanonicalEvent, "entity_id")
cdef Py_ssize_t _CAN_SEQUENCE = _slot_offset(CanonicalEvent, "sequence")
cdef Py_ssize_t _CAN_STATE = _slot_offset(CanonicalEvent, "state")
cdef Py_ssize_t _CAN_TIMESTAMP = _slot_offset(CanonicalEvent, "timestamp")

cdef Py_ssize_t _RAW_EVENT_ID = _slot_offset(RawEvent, "event_id")
cdef Py_ssize_t _RAW_ENTITY_TYPE = _slot_offset(RawEvent, "entity_type")
cdef Py_ssize_t _RAW_ENTITY_ID = _slot_offset(RawEvent, "entity_id")
cdef Py_ssize_t _RAW_SEQUENCE = _slot_offset(RawEvent, "sequence")
cdef Py_ssize_t _RAW_STATE = _slot_offset(RawEvent, "state")
cdef Py_ssize_t _RAW_TIMESTAMP = _slot_offset(RawEvent, "timestamp")
cdef Py_ssize_t _RAW_EVENTID = _slot_offset(RawEvent, "eventId")
cdef Py_ssize_t _RAW_ENTITYTYPE = _slot_offset(RawEvent, "entityType")
cdef Py_ssize_t _RAW_ENTITYID = _slot_offset(RawEvent, "entityId")
cdef Py_ssize_t _RAW_SEQ = _slot_offset(RawEvent, "seq")
cdef Py_ssize_t _RAW_STATUS = _slot_offset(RawEvent, "status")
cdef Py_ssize_t _RAW_TS = _slot_offset(RawEvent, "ts")
cdef Py_ssize_t _RAW_ID = _slot_offset(RawEvent, "id")
cdef Py_ssize_t _RAW_TYPE = _slot_offset(RawEvent, "type")
cdef Py_ssize_t _RAW_EVENT_TYPE = _slot_offset(RawEvent, "event_type")
cdef Py_ssize_t _ROW_OVERHEAD = _ROW_OVERHEAD_BYTES


# ---------------------------------------------------------------------------- routing

def partition_key(str routing_key):
    """First 8 bytes of SHA-256 of the UTF-8 routing key, as 16 lowercase hex chars."""
    cdef char buf[16]
    _hex8(_sha256(routing_key.encode("utf-8")).digest(), buf)
    return PyUnicode_DecodeASCII(buf, 16, NULL)


cdef inline void _hex8(bytes digest, char *out) noexcept:
    cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(digest)
    cdef int i
    for i in range(8):
        out[2 * i] = _HEX[d[i] >> 4]
        out[2 * i + 1] = _HEX[d[i] & 15]


def murmur2(data):
    """Kafka's Java ``Utils.murmur2`` of ``data``: a signed 32-bit int, as Java returns it."""
    if type(data) is not bytes:
        data = bytes(data)
    return spr_murmur2(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def partition_for(key, num_partitions):
    """The Java client's partition for a message key: ``(murmur2 & 0x7fffffff) % n``."""
    cdef int64_t n = _check_partitions(num_partitions)
    cdef Py_ssize_t size
    cdef list keep = []
    cdef const uint8_t *p = _key_bytes(key, &size, keep)
    return (<int64_t>(<uint32_t>spr_murmur2(p, size) & 0x7FFFFFFF)) % n


def route_many(routing_keys, num_partitions):
    """Partition keys and partitions for many routing keys, aligned with the input."""
    cdef int64_t n = _check_partitions(num_partitions)
    cdef list keys = []
    cdef list partitions = []
    cdef char buf[16]
    cdef str routing_key
    for routing_key in routing_keys:
        _hex8(_sha256(routing_key.encode("utf-8")).digest(), buf)
        keys.append(PyUnicode_DecodeASCII(buf, 16, NULL))
        partitions.append(
            (<int64_t>(<uint32_t>spr_murmur2(<const uint8_t *>buf, 16) & 0x7FFFFFFF)) % n
        )
    return keys, partitions


# ---------------------------------------------------------------------- idempotency

def fingerprint(idempotency_key):
    """XXH64 (seed 0) of the UTF-8 idempotency key, as an unsigned 64-bit int."""
    cdef Py_ssize_t size
    cdef list keep = []
    cdef const uint8_t *p = _key_bytes(idempotency_key, &size, keep)
    return spr_xxh64(p, size)


def event_fingerprint(str entity_type, str entity_id, sequence):
    """Fingerprint of the idempotency key ``entity_type:entity_id:sequence``."""
    cdef Py_ssize_t size
    cdef str key = f"{entity_type}:{entity_id}:{sequence}"
    cdef const uint8_t *p = <const uint8_t *>PyUnicode_AsUTF8AndSize(key, &size)
    return spr_xxh64(p, size)


cdef struct RingSlot:
    uint64_t fingerprint  # 0 = empty
    int64_t added_ms


cdef uint64_t _ZERO_SUBSTITUTE = ZERO_FINGERPRINT_SUBSTITUTE
cdef Py_ssize_t _PROBE = PROBE_WINDOW
cdef Py_ssize_t _PREFETCH_AHEAD = 12  # at most 16, the size of the homes buffer


@cython.final
cdef class IdempotencyRing:
    """A fixed-size window of recently seen event fingerprints, with a time to live.

    Same contract as ``spr._core_py.IdempotencyRing``. Invariants: ``slots`` holds
    ``capacity`` 16-byte slots allocated once; a fingerprint is stored only within
    ``window`` slots of its home slot; slots become empty only through ``clear``, so a
    probe can stop at the first empty slot; stored fingerprints are never 0, and a
    fingerprint occupies one slot at most (an expired copy is reused, not duplicated).
    """

    cdef RingSlot *slots
    cdef size_t _capacity
    cdef size_t window
    cdef int64_t _ttl_ms
    cdef int64_t last_now_ms
    cdef uint64_t _lookups
    cdef uint64_t _hits
    cdef uint64_t _evictions

    def __cinit__(self, capacity, ttl_ms):
        if not 0 < capacity <= 2**40:
            raise ConfigError(f"ring capacity must be between 1 and 2**40, got {capacity}")
        if not 0 < ttl_ms <= 2**63 - 1:
            raise ConfigError(f"ring ttl_ms must be a positive 64-bit int, got {ttl_ms}")
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self.window = min(_PROBE, self._capacity)
        self.slots = <RingSlot *>calloc(self._capacity, sizeof(RingSlot))
        if self.slots is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)

    @property
    def capacity(self):
        """Number of slots (the most fingerprints the ring can hold)."""
        return self._capacity

    @property
    def ttl_ms(self):
        """How long an entry stays live, in milliseconds of distance from ``now_ms``."""
        return self._ttl_ms

    @property
    def lookups(self):
        """Number of ``seen_or_add`` operations (single or batched) since creation."""
        return self._lookups

    @property
    def hits(self):
        """How many of those lookups found a live entry (reported a duplicate)."""
        return self._hits

    @property
    def evictions(self):
        """How many live entries were overwritten because their probe window was full."""
        return self._evictions

    def __len__(self):
        cdef size_t i
        cdef Py_ssize_t live = 0
        for i in range(self._capacity):
            if self.slots[i].fingerprint != 0 and _live(
                self.slots[i].added_ms, self.last_now_ms, self._ttl_ms
            ):
                live += 1
        return live

    def clear(self):
        """Forget every entry (the counters stay); use after a rolled-back flush."""
        memset(self.slots, 0, self._capacity * sizeof(RingSlot))

    def seen_or_add(self, uint64_t fingerprint, int64_t now_ms):
        """True if ``fingerprint`` is live in the ring; otherwise add it and return False."""
        return self._seen_or_add(fingerprint, now_ms)

    def seen_or_add_many(self, fingerprints, int64_t now_ms):
        """``seen_or_add`` for each fingerprint in order (a list of ints or a uint64
        buffer such as ``array('Q')``), all at the same ``now_ms``."""
        cdef const uint64_t[::1] view
        cdef Py_ssize_t i, n
        cdef size_t home
        cdef size_t homes[16]
        cdef list result
        cdef uint64_t fp
        if isinstance(fingerprints, (memoryview, bytes, bytearray)):
            fingerprints = memoryview(fingerprints).cast("B").cast("Q")
        if not isinstance(fingerprints, (list, tuple)) and _has_buffer(fingerprints):
            view = fingerprints
            n = view.shape[0]
            result = [False] * n
            # Home slots are computed _PREFETCH_AHEAD elements early, kept in a small
            # circular buffer, and their cache lines prefetched in the meantime.
            for i in range(min(n, _PREFETCH_AHEAD)):
                homes[i] = self._prefetch(view[i])
            for i in range(n):
                home = homes[i & 15]
                if i + _PREFETCH_AHEAD < n:
                    homes[(i + _PREFETCH_AHEAD) & 15] = self._prefetch(view[i + _PREFETCH_AHEAD])
                if self._seen_or_add_at(view[i], home, now_ms):
                    result[i] = True
            return result
        result = []
        for item in fingerprints:
            fp = item
            result.append(self._seen_or_add(fp, now_ms))
        return result

    cdef inline size_t _prefetch(self, uint64_t fp) noexcept:
        # The probe window spans up to three cache lines: ask for all of them.
        cdef size_t home = spr_home_slot(fp or _ZERO_SUBSTITUTE, self._capacity)
        cdef size_t last = self._capacity - 1
        spr_prefetch(&self.slots[home])
        spr_prefetch(&self.slots[min(home + 4, last)])
        spr_prefetch(&self.slots[min(home + self.window - 1, last)])
        return home

    cdef inline bint _seen_or_add(self, uint64_t fp, int64_t now) noexcept:
        return self._seen_or_add_at(
            fp, spr_home_slot(fp or _ZERO_SUBSTITUTE, self._capacity), now
        )

    cdef inline bint _seen_or_add_at(self, uint64_t fp, size_t slot, int64_t now) noexcept:
        cdef RingSlot *s
        cdef RingSlot *victim = NULL
        cdef int victim_kind = 3  # 0 empty, 1 expired, 2 oldest live, 3 none yet
        cdef int64_t victim_time = 0
        cdef bint live
        if fp == 0:
            fp = _ZERO_SUBSTITUTE
        self._lookups += 1
        self.last_now_ms = now
        for _ in range(self.window):
            s = &self.slots[slot]
            if s.fingerprint == 0:
                if victim_kind > 1:
                    victim = s
                    victim_kind = 0
                break
            live = _live(s.added_ms, now, self._ttl_ms)
            if s.fingerprint == fp:
                if live:
                    self._hits += 1
                    return True
                # Reuse the expired copy, so that a fingerprint has one slot at most.
                victim = s
                victim_kind = 1
                break
            if live:
                if victim_kind == 3 or (victim_kind == 2 and s.added_ms < victim_time):
                    victim = s
                    victim_kind = 2
                    victim_time = s.added_ms
            elif victim_kind > 1:
                victim = s
                victim_kind = 1
            slot += 1
            if slot == self._capacity:
                slot = 0
        if victim_kind == 2:
            self._evictions += 1
        victim.fingerprint = fp
        victim.added_ms = now
        return False


cdef inline bint _live(int64_t added, int64_t now, int64_t ttl) noexcept nogil:
    # |now - added| < ttl without signed overflow.
    cdef uint64_t distance
    if now >= added:
        distance = <uint64_t>now - <uint64_t>added
    else:
        distance = <uint64_t>added - <uint64_t>now
    return distance < <uint64_t>ttl


cdef inline bint _has_buffer(object obj):
    return PyObject_CheckBuffer(obj)


cdef extern from "Python.h":
    bint PyObject_CheckBuffer(object obj)


# ---------------------------------------------------------------------------- decoding

cdef object _raw_decode = RAW_DECODER.decode
cdef object _canonical_decode = CANONICAL_DECODER.decode
cdef object _MAX_INT64 = MAX_INT64
cdef int64_t _PG_EPOCH_MS = 946684800000  # 2000-01-01T00:00:00Z
cdef int64_t _MAX_TIMESTAMP_MS = MAX_TIMESTAMP_MS
cdef object _DecodeError = msgspec.DecodeError
cdef object _default_limits = DEFAULT_LIMITS
cdef Py_ssize_t _default_max_bytes = DEFAULT_LIMITS.max_bytes
cdef int64_t _default_max_depth = DEFAULT_LIMITS.max_depth


@cython.final
cdef class _Fields:
    # One decoded event's canonical fields, refilled per message by _decode_fields so
    # that the fused ingest builds no Event; event_id may be None or empty (the caller
    # supplies the idempotency-key fallback).
    cdef object event_id
    cdef str entity_type
    cdef str entity_id
    cdef object sequence
    cdef str state
    cdef object timestamp


cdef object _decode(object value, object offset, object timestamp_ms,
                    Py_ssize_t max_bytes, int64_t max_depth):
    cdef _Fields f = _Fields.__new__(_Fields)
    _decode_fields(value, offset, timestamp_ms, max_bytes, max_depth, f)
    event_id = f.event_id
    if not event_id:
        event_id = f"{f.entity_type}:{f.entity_id}:{f.sequence}"
    return Event(event_id, f.entity_type, f.entity_id, f.sequence, f.state, f.timestamp, value)


cdef int _decode_fields(object value, object offset, object timestamp_ms,
                        Py_ssize_t max_bytes, int64_t max_depth, _Fields out) except -1:
    cdef Py_ssize_t size
    cdef const uint8_t *data
    cdef int verdict
    if value is None:
        raise InvalidEvent(REASON_NULL)
    if type(value) is not bytes:
        raise InvalidEvent(REASON_NOT_BYTES)
    size = PyBytes_GET_SIZE(value)
    if size == 0:
        raise InvalidEvent(REASON_EMPTY)
    if size > max_bytes:
        raise InvalidEvent(reason_too_big(size, max_bytes))
    data = <const uint8_t *>PyBytes_AS_STRING(value)
    if size >= 3 and data[0] == 0xEF and data[1] == 0xBB and data[2] == 0xBF:
        raise InvalidEvent(REASON_BOM)
    verdict = spr_prescan(data, size, max_depth)
    if verdict == 1:
        raise InvalidEvent(REASON_NOT_UTF8)
    if verdict == 2:
        raise InvalidEvent(reason_too_deep(max_depth))
    try:
        if size >= 11 and (
            memcmp(data, b'{"event_id"', 11) == 0
            or (size >= 14 and memcmp(data, b'{"entity_type"', 14) == 0)
        ):
            fast = _canonical_decode(value)
            event_id = _slot(fast, _CAN_EVENT_ID)
            entity_type = _slot(fast, _CAN_ENTITY_TYPE)
            entity_id = _slot(fast, _CAN_ENTITY_ID)
            sequence = _slot(fast, _CAN_SEQUENCE)
            state = _slot(fast, _CAN_STATE)
            timestamp = _slot(fast, _CAN_TIMESTAMP)
            if (
                event_id
                and entity_type is not None
                and entity_id is not None
                and state is not None
                and sequence is not None
                and timestamp is not None
            ):
                return _fill(out, event_id, entity_type, entity_id, sequence, state,
                             timestamp)
        raw = _raw_decode(value)
    except (_DecodeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(reason_from_msgspec(exc)) from None

    entity_type = _slot(raw, _RAW_ENTITY_TYPE)
    if entity_type is None:
        entity_type = _alias_str(raw, _RAW_ENTITYTYPE, "entityType")
        if entity_type is None:
            entity_type = _alias_str(raw, _RAW_TYPE, "type")
            if entity_type is None:
                entity_type = _alias_str(raw, _RAW_EVENT_TYPE, "event_type")
                if entity_type is None:
                    raise InvalidEvent(REASON_MISSING_TYPE)
    entity_id = _slot(raw, _RAW_ENTITY_ID)
    if entity_id is None:
        entity_id = _alias_str(raw, _RAW_ENTITYID, "entityId")
        if entity_id is None:
            raise InvalidEvent(REASON_MISSING_ID)
    state = _slot(raw, _RAW_STATE)
    if state is None:
        state = _alias_str(raw, _RAW_STATUS, "status")
        if state is None:
            raise InvalidEvent(REASON_MISSING_STATE)
    sequence = _slot(raw, _RAW_SEQUENCE)
    if sequence is None:
        sequence = _alias_int(raw, _RAW_SEQ, "seq", _MAX_INT64, EXPECT_SEQUENCE)
        if sequence is None:
            sequence = offset
    timestamp = _slot(raw, _RAW_TIMESTAMP)
    if timestamp is None:
        timestamp = _alias_int(raw, _RAW_TS, "ts", _MAX_TIMESTAMP_MS, EXPECT_TIMESTAMP)
        if timestamp is None:
            timestamp = timestamp_ms
    event_id = _slot(raw, _RAW_EVENT_ID)
    if not event_id:
        event_id = _alias_str(raw, _RAW_EVENTID, "eventId")
        if not event_id:
            event_id = _alias_str(raw, _RAW_ID, "id")
    return _fill(out, event_id, entity_type, entity_id, sequence, state, timestamp)


cdef inline int _fill(_Fields out, object event_id, str entity_type, str entity_id,
                      object sequence, str state, object timestamp) except -1:
    if not entity_type:
        raise InvalidEvent(REASON_EMPTY_TYPE)
    if not entity_id:
        raise InvalidEvent(REASON_EMPTY_ID)
    if not state:
        raise InvalidEvent(REASON_EMPTY_STATE)
    out.event_id = event_id
    out.entity_type = entity_type
    out.entity_id = entity_id
    out.sequence = sequence
    out.state = state
    out.timestamp = timestamp
    return 0


cdef object _alias_str(object raw, Py_ssize_t offset, str spelling):
    value = _slot(raw, offset)
    if value is None or type(value) is str:
        return value
    raise InvalidEvent(reason_alias_type(spelling, EXPECT_STRING, value))


cdef object _alias_int(object raw, Py_ssize_t offset, str spelling, object maximum,
                       str expected):
    value = _slot(raw, offset)
    if value is None or (type(value) is int and 0 <= value <= maximum):
        return value
    raise InvalidEvent(reason_alias_type(spelling, expected, value))


def decode_event(value, *, offset, timestamp_ms, limits=DEFAULT_LIMITS):
    """Decode one Kafka message value into the canonical ``Event``; see
    ``spr._core_py.decode_event`` for the rules. Raises ``InvalidEvent`` only."""
    if limits is _default_limits:
        return _decode(value, offset, timestamp_ms, _default_max_bytes, _default_max_depth)
    return _decode(value, offset, timestamp_ms, limits.max_bytes, limits.max_depth)


def decode_batch(values, offsets, timestamps_ms, limits=DEFAULT_LIMITS):
    """Decode many values; returns the events aligned with the input (None where
    invalid) and ``(index, reason)`` for each invalid one."""
    cdef Py_ssize_t i, n = len(values)
    cdef Py_ssize_t max_bytes = limits.max_bytes
    cdef int64_t max_depth = limits.max_depth
    cdef list events = [None] * n
    cdef list invalid = []
    if not n == len(offsets) == len(timestamps_ms):
        raise ValueError("values, offsets and timestamps_ms must have the same length")
    for i in range(n):
        try:
            events[i] = _decode(values[i], offsets[i], timestamps_ms[i], max_bytes, max_depth)
        except InvalidEvent as exc:
            invalid.append((i, exc.reason))
    return events, invalid


# ------------------------------------------------------------------------------- batch

cdef enum Column:
    COL_ENTITY_TYPE
    COL_ENTITY_ID
    COL_SEQUENCE
    COL_STATE
    COL_EVENT_ID
    COL_PAYLOAD
    COL_EVENT_TS
    COL_KAFKA_TOPIC
    COL_KAFKA_PARTITION
    COL_KAFKA_OFFSET


cdef struct Row:
    # One buffered entity. Its text lives in the batch's arena from ``start`` on, in
    # this order: entity_type, entity_id, state, event_id, payload (``capacity`` bytes
    # are reserved there, so a newer event of about the same size overwrites in place).
    int64_t sequence
    int64_t offset
    int64_t timestamp_ms
    uint64_t hash  # XXH64 of "entity_type:entity_id", for the index
    Py_ssize_t start
    Py_ssize_t capacity
    int32_t partition
    int32_t topic  # index into Batch.topic_names
    int32_t type_len
    int32_t id_len
    int32_t state_len
    int32_t event_id_len
    int32_t payload_len
    char partition_key[16]  # the verified Kafka key of the entity (when key_known)
    bint key_known


cdef struct Text:
    const char *data
    Py_ssize_t size


cdef Py_ssize_t _ROW_SLACK = 16
cdef int _KEY_BUFFER = 320
cdef Py_ssize_t _MAX_FIELD = 0x7FFFFFFF


# ----------------------------------------------------------- partition key check cache

cdef struct KeySlot:
    uint64_t hash  # XXH64 of the routing key; 0 = empty
    char partition_key[16]

# A direct-mapped memo of partition_key(): SHA-256 through hashlib costs ~230 ns, the
# memo ~10 ns; 64k slots (1.5 MB) cover the working set of a large batch. A slot is
# trusted on a full 64-bit hash match of the routing key (a false match needs an
# XXH64 collision, and then only lets a wrong key pass the check).
cdef size_t _KEY_SLOTS = 1 << 16
cdef KeySlot *_key_cache = NULL


ctypedef int (*_sha_init_t)(void *ctx) noexcept nogil
ctypedef int (*_sha_update_t)(void *ctx, const void *data, size_t size) noexcept nogil
ctypedef int (*_sha_final_t)(unsigned char *digest, void *ctx) noexcept nogil
cdef _sha_init_t _c_sha_init = NULL
cdef _sha_update_t _c_sha_update = NULL
cdef _sha_final_t _c_sha_final = NULL
cdef bint _c_sha_probed = False


cdef int _probe_c_sha256() except -1:
    # hashlib's SHA-256 is OpenSSL's, behind ~200 ns of Python objects per call. The
    # same library's low-level SHA256_* functions (SHA-NI where the CPU has it) cost
    # a few dozen ns. They are used only when found and when they agree with hashlib
    # on test vectors; otherwise every miss goes through hashlib.
    global _c_sha_init, _c_sha_update, _c_sha_final, _c_sha_probed
    cdef uint64_t ctx[32]
    cdef unsigned char digest[32]
    _c_sha_probed = True
    try:
        import ctypes
        __import__("_hashlib")  # loads libcrypto

        lib = None
        for name in ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.dylib"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            return 0
        init = ctypes.cast(lib.SHA256_Init, ctypes.c_void_p).value
        update = ctypes.cast(lib.SHA256_Update, ctypes.c_void_p).value
        final = ctypes.cast(lib.SHA256_Final, ctypes.c_void_p).value
    except Exception:  # no such library or symbols: hashlib it is
        return 0
    if not (init and update and final):
        return 0
    _c_sha_init = <_sha_init_t><uintptr_t>init
    _c_sha_update = <_sha_update_t><uintptr_t>update
    _c_sha_final = <_sha_final_t><uintptr_t>final
    for sample in (b"", b"order:1", b"x" * 55, b"y" * 56, b"z" * 200, "ü:é".encode()):
        if (
            _c_sha_init(ctx) != 1
            or _c_sha_update(ctx, PyBytes_AS_STRING(sample), PyBytes_GET_SIZE(sample)) != 1
            or _c_sha_final(digest, ctx) != 1
            or digest[:32] != _sha256(sample).digest()
        ):
            _c_sha_init = NULL
            return 0
    return 0


cdef int _partition_key_of(const char *routing, Py_ssize_t size, uint64_t h,
                           char *out) except -1:
    global _key_cache
    cdef KeySlot *slot
    cdef uint64_t ctx[32]
    cdef unsigned char digest[32]
    cdef int i
    if _key_cache is NULL:
        _key_cache = <KeySlot *>calloc(_KEY_SLOTS, sizeof(KeySlot))
        if _key_cache is NULL:
            raise MemoryError()
        if not _c_sha_probed:
            _probe_c_sha256()
    if h == 0:
        h = _ZERO_SUBSTITUTE
    slot = &_key_cache[h & (_KEY_SLOTS - 1)]
    if slot.hash != h:
        if (
            _c_sha_init is not NULL
            and _c_sha_init(ctx) == 1
            and _c_sha_update(ctx, routing, size) == 1
            and _c_sha_final(digest, ctx) == 1
        ):
            for i in range(8):
                slot.partition_key[2 * i] = _HEX[digest[i] >> 4]
                slot.partition_key[2 * i + 1] = _HEX[digest[i] & 15]
        else:
            _hex8(_sha256(PyBytes_FromStringAndSize(routing, size)).digest(),
                  slot.partition_key)
        slot.hash = h
    memcpy(out, slot.partition_key, 16)
    return 0


# ------------------------------------------------------- confluent_kafka.Message access

# Where confluent_kafka's C Message keeps its fields (its struct in confluent_kafka.h).
# Found once by probing a Message built with known values; when the layout is not
# the expected one, or the messages are of another type (test doubles), the methods
# are called instead, with the same results.
cdef object _message_type = None
cdef bint _message_probed = False
cdef Py_ssize_t _MSG_TOPIC = 16
cdef Py_ssize_t _MSG_VALUE = 24
cdef Py_ssize_t _MSG_KEY = 32
cdef Py_ssize_t _MSG_ERROR = 56
cdef Py_ssize_t _MSG_PARTITION = 64
cdef Py_ssize_t _MSG_OFFSET = 72
cdef Py_ssize_t _MSG_TIMESTAMP = 88


cdef inline PyObject *_msg_ptr(object message, Py_ssize_t offset) noexcept:
    return (<PyObject **>((<char *><PyObject *>message) + offset))[0]


cdef inline int64_t _msg_i64(object message, Py_ssize_t offset) noexcept:
    cdef int64_t value
    memcpy(&value, (<char *><PyObject *>message) + offset, 8)
    return value


cdef inline int32_t _msg_i32(object message, Py_ssize_t offset) noexcept:
    cdef int32_t value
    memcpy(&value, (<char *><PyObject *>message) + offset, 4)
    return value


cdef object _probe_message_type():
    global _message_type, _message_probed
    _message_probed = True
    try:
        from confluent_kafka import KafkaError, Message
        topic, key, value = "spr-probe", b"spr-probe-key", b"spr-probe-value"
        m = Message(topic=topic, partition=0x1234567, offset=0x123456789AB, key=key,
                    value=value, timestamp=(1, 0x1ABCDEF0123))
        e = Message(error=KafkaError(-191))
        error = e.error()
    except Exception:  # no client, or a Message that can't be built: use the methods
        return None
    if (
        type(m).__basicsize__ < _MSG_TIMESTAMP + 8
        or _msg_ptr(m, _MSG_TOPIC) != <PyObject *>topic
        or _msg_ptr(m, _MSG_VALUE) != <PyObject *>value
        or _msg_ptr(m, _MSG_KEY) != <PyObject *>key
        or _msg_ptr(m, _MSG_ERROR) != NULL
        or _msg_ptr(e, _MSG_ERROR) != <PyObject *>error
        or _msg_i32(m, _MSG_PARTITION) != 0x1234567
        or _msg_i64(m, _MSG_OFFSET) != 0x123456789AB
        or _msg_i64(m, _MSG_TIMESTAMP) != 0x1ABCDEF0123
        or m.timestamp() != (1, 0x1ABCDEF0123)
    ):
        return None
    _message_type = Message
    return Message


cdef inline object _or_none(PyObject *p):
    if p is NULL:
        return None
    return <object>p


# ------------------------------------------------------------------------------- batch

@cython.final
cdef class Batch:
    """The rows of one flush, collapsed to the newest event per entity.

    Same contract as ``spr._core_py.Batch``. Invariants: ``rows[i]`` describes row
    ``i``, whose text is in ``arena`` (``rows[i].start`` on); ``slots`` is an
    open-addressed table (size ``mask + 1``, a power of two at least twice the rows)
    of row number + 1 (0 = empty), probed linearly from ``hash & mask``, with
    entity_type and entity_id compared byte for byte on a hash match; ``next_offset``
    holds every partition's next offset except the current one, which is kept in C
    (``current_*``) while events of one partition arrive in a run, and merged in (with
    max) when the partition changes. No Python object is kept per row.
    """

    COPY_FORMAT = "binary"

    cdef tuple _columns
    cdef int codes[10]
    cdef Py_ssize_t ncols
    cdef Row *rows_
    cdef Py_ssize_t nrows
    cdef Py_ssize_t allocated
    cdef char *arena
    cdef Py_ssize_t arena_used
    cdef Py_ssize_t arena_size
    cdef int32_t *slots
    cdef size_t mask
    cdef list topic_names
    cdef object last_topic
    cdef int32_t last_topic_index
    cdef dict next_offset
    cdef object current_topic
    cdef int32_t current_partition
    cdef int64_t current_next
    cdef Py_ssize_t _events_added
    cdef Py_ssize_t _nbytes

    def __cinit__(self, columns=STATE_COLUMNS):
        cdef Py_ssize_t i
        self._columns = check_columns(columns)
        self.ncols = len(self._columns)
        for i in range(self.ncols):
            self.codes[i] = STATE_COLUMNS.index(self._columns[i])
        self.topic_names = []
        self.last_topic = None
        self.next_offset = {}
        self.current_topic = None

    def __dealloc__(self):
        PyMem_Free(self.rows_)
        PyMem_Free(self.arena)
        PyMem_Free(self.slots)

    @property
    def columns(self):
        """The staging columns, in COPY order."""
        return self._columns

    @property
    def events_added(self):
        """Events added (``add`` or ``ingest``) since creation or the last ``clear``."""
        return self._events_added

    @property
    def row_count(self):
        """Distinct entities buffered (the rows ``copy_data`` would write)."""
        return self.nrows

    @property
    def nbytes(self):
        """Approximate memory held by the buffered rows, for the memory bound."""
        return self._nbytes

    def __len__(self):
        return self.nrows

    # -- storage ----------------------------------------------------------------------

    cdef int _grow_rows(self) except -1:
        cdef Py_ssize_t size = max(1024, 2 * self.allocated)
        cdef Row *grown = <Row *>PyMem_Realloc(self.rows_, size * sizeof(Row))
        if grown is NULL:
            raise MemoryError()
        self.rows_ = grown
        self.allocated = size
        return 0

    cdef int _grow_slots(self) except -1:
        # Keeps the table at most half full; rehashing uses the stored hashes.
        cdef size_t size = max(<size_t>2048, 2 * (self.mask + 1))
        cdef int32_t *slots = <int32_t *>PyMem_Malloc(size * sizeof(int32_t))
        cdef size_t mask = size - 1, j
        cdef Py_ssize_t row
        if slots is NULL:
            raise MemoryError()
        memset(slots, 0, size * sizeof(int32_t))
        for row in range(self.nrows):
            j = self.rows_[row].hash & mask
            while slots[j] != 0:
                j = (j + 1) & mask
            slots[j] = <int32_t>(row + 1)
        PyMem_Free(self.slots)
        self.slots = slots
        self.mask = mask
        return 0

    cdef char *_reserve(self, Py_ssize_t size) except NULL:
        cdef Py_ssize_t need = self.arena_used + size, grown_size
        cdef char *grown
        if need > self.arena_size:
            grown_size = max(need, max(<Py_ssize_t>65536, 2 * self.arena_size))
            grown = <char *>PyMem_Realloc(self.arena, grown_size)
            if grown is NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_size = grown_size
        self.arena_used = need
        return self.arena + need - size

    cdef inline size_t _find(self, uint64_t h, Text *entity_type, Text *entity_id,
                             Py_ssize_t *row) noexcept:
        # The slot holding the entity (row >= 0), or the empty slot to put it in (-1).
        cdef size_t j = h & self.mask
        cdef int32_t found
        cdef Row *r
        while True:
            found = self.slots[j]
            if found == 0:
                row[0] = -1
                return j
            r = &self.rows_[found - 1]
            if (
                r.hash == h
                and r.type_len == entity_type.size
                and r.id_len == entity_id.size
                and memcmp(self.arena + r.start, entity_type.data, entity_type.size) == 0
                and memcmp(self.arena + r.start + r.type_len, entity_id.data,
                           entity_id.size) == 0
            ):
                row[0] = found - 1
                return j
            j = (j + 1) & self.mask

    cdef int32_t _topic_index(self, str topic) except -1:
        cdef Py_ssize_t i
        if topic is self.last_topic or (
            self.last_topic is not None and topic == <str>self.last_topic
        ):
            return self.last_topic_index
        for i in range(len(self.topic_names)):
            if <str>self.topic_names[i] == topic:
                break
        else:
            i = len(self.topic_names)
            self.topic_names.append(topic)
        self.last_topic = topic
        self.last_topic_index = <int32_t>i
        return <int32_t>i

    cdef inline size_t _locate(self, uint64_t h, Text *entity_type, Text *entity_id,
                               Py_ssize_t *row) except? 0:
        # _find, after making room for one more row (so the slot stays valid for _store).
        if self.slots is NULL or <size_t>(2 * self.nrows + 2) > self.mask + 1:
            self._grow_slots()
        return self._find(h, entity_type, entity_id, row)

    cdef int _store(self, size_t slot, Py_ssize_t row, uint64_t h, Text *entity_type,
                    Text *entity_id, Text *state, Text *event_id, Text *payload,
                    int64_t sequence, int64_t timestamp_ms, str topic, int32_t partition,
                    int64_t offset, const char *partition_key) except -1:
        # ``slot``/``row`` come from _locate. Collapse rule: higher sequence wins, then
        # higher offset. Returns 1 when the row was added or replaced, 0 when the event
        # was older than the buffered one.
        cdef Row *r
        cdef Py_ssize_t size
        cdef char *p
        if (
            entity_type.size > _MAX_FIELD or entity_id.size > _MAX_FIELD
            or state.size > _MAX_FIELD or event_id.size > _MAX_FIELD
            or payload.size > _MAX_FIELD
        ):
            raise OverflowError("a field of the event is over 2 GiB")
        size = entity_type.size + entity_id.size + state.size + event_id.size + payload.size
        if row < 0:
            if self.nrows == self.allocated:
                self._grow_rows()
            row = self.nrows
            r = &self.rows_[row]
            p = self._reserve(size + _ROW_SLACK)
            r.start = p - self.arena
            r.capacity = size + _ROW_SLACK
            r.hash = h
            r.key_known = False
            self.slots[slot] = <int32_t>(row + 1)
            self.nrows += 1
            self._nbytes += _ROW_OVERHEAD + payload.size
        else:
            r = &self.rows_[row]
            if not (sequence > r.sequence or (sequence == r.sequence and offset > r.offset)):
                return 0
            self._nbytes += payload.size - r.payload_len
            if size > r.capacity:
                p = self._reserve(size + _ROW_SLACK)
                r = &self.rows_[row]
                r.start = p - self.arena
                r.capacity = size + _ROW_SLACK
        p = self.arena + r.start
        memcpy(p, entity_type.data, entity_type.size)
        p += entity_type.size
        memcpy(p, entity_id.data, entity_id.size)
        p += entity_id.size
        memcpy(p, state.data, state.size)
        p += state.size
        memcpy(p, event_id.data, event_id.size)
        p += event_id.size
        memcpy(p, payload.data, payload.size)
        r.type_len = <int32_t>entity_type.size
        r.id_len = <int32_t>entity_id.size
        r.state_len = <int32_t>state.size
        r.event_id_len = <int32_t>event_id.size
        r.payload_len = <int32_t>payload.size
        r.sequence = sequence
        r.offset = offset
        r.timestamp_ms = timestamp_ms
        r.partition = partition
        r.topic = self._topic_index(topic)
        if partition_key is not NULL:
            memcpy(r.partition_key, partition_key, 16)
            r.key_known = True
        return 1

    # -- adding -----------------------------------------------------------------------

    def add(self, event, str topic, int32_t partition, int64_t offset):
        """Buffer ``event`` read from ``topic``/``partition`` at ``offset``."""
        cdef Text entity_type, entity_id, state, event_id, payload
        cdef char stack[320]
        cdef char *key = stack
        cdef Py_ssize_t size, row
        cdef size_t slot
        cdef uint64_t h
        cdef int64_t sequence, timestamp_ms
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        entity_type.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_TYPE),
                                                   &entity_type.size)
        entity_id.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_ID), &entity_id.size)
        state.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_STATE), &state.size)
        event_id.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_EVENT_ID), &event_id.size)
        payload_obj = _slot(event, _EV_PAYLOAD)
        payload.data = PyBytes_AS_STRING(payload_obj)
        payload.size = PyBytes_GET_SIZE(payload_obj)
        size = entity_type.size + 1 + entity_id.size
        if size > _KEY_BUFFER:
            key = <char *>PyMem_Malloc(size)
            if key is NULL:
                raise MemoryError()
        try:
            memcpy(key, entity_type.data, entity_type.size)
            key[entity_type.size] = 58  # ':'
            memcpy(key + entity_type.size + 1, entity_id.data, entity_id.size)
            h = spr_xxh64(<const uint8_t *>key, size)
        finally:
            if key is not stack:
                PyMem_Free(key)
        sequence = _slot(event, _EV_SEQUENCE)
        timestamp_ms = _slot(event, _EV_TIMESTAMP_MS)
        slot = self._locate(h, &entity_type, &entity_id, &row)
        self._store(slot, row, h, &entity_type, &entity_id, &state, &event_id, &payload,
                    sequence, timestamp_ms, topic, partition, offset, NULL)
        self._events_added += 1
        self._advance(topic, partition, offset)

    def advance(self, str topic, int32_t partition, int64_t offset):
        """Mark ``offset`` consumed without a row (a duplicate or a dead letter)."""
        self._advance(topic, partition, offset)

    def ingest(self, messages, IdempotencyRing ring not None, int64_t now_ms,
               assigned=None, limits=DEFAULT_LIMITS, bint check_keys=True):
        """Decode, check, deduplicate and buffer one ``consume()`` result; see
        ``spr._core_py.Batch.ingest`` for the rules. Raises only on a bad argument."""
        cdef _Fields f = _Fields.__new__(_Fields)
        cdef list errors = [], invalid = []
        cdef dict counts = {}
        cdef Py_ssize_t max_bytes, duplicates = 0, consumed = 0, run_count = 0, size
        cdef int64_t max_depth, offset, timestamp_ms, sequence
        cdef int32_t partition, run_partition = 0
        cdef bint fast, allowed = True
        cdef object message_type = _message_type
        cdef PyObject *run_topic = NULL
        cdef object run_topic_obj = None  # keeps run_topic alive
        cdef PyObject *p
        cdef Text entity_type, entity_id, state, event_id, payload
        cdef char stack[320]
        cdef char *key = stack
        cdef Py_ssize_t key_capacity = _KEY_BUFFER, routing_size, row
        cdef size_t slot
        cdef char expected[16]
        cdef const char *verified
        cdef uint64_t h
        cdef str topic
        if limits is _default_limits:
            max_bytes, max_depth = _default_max_bytes, _default_max_depth
        else:
            max_bytes, max_depth = limits.max_bytes, limits.max_depth
        if not _message_probed:
            message_type = _probe_message_type()
        try:
            for message in messages:
                fast = message_type is not None and type(message) is message_type
                # -- errors, ownership, position --------------------------------------
                if fast:
                    p = _msg_ptr(message, _MSG_ERROR)
                    if p is not NULL and p != <PyObject *>None:
                        errors.append(message)
                        continue
                    p = _msg_ptr(message, _MSG_TOPIC)
                    if p is NULL:
                        errors.append(message)
                        continue
                    partition = _msg_i32(message, _MSG_PARTITION)
                else:
                    if message.error() is not None:
                        errors.append(message)
                        continue
                    topic_obj = message.topic()
                    p = <PyObject *>topic_obj
                    partition = message.partition()
                # confluent_kafka makes a new topic str per message: compare by value.
                if partition != run_partition or (
                    p != run_topic
                    and (run_topic is NULL or not _same_text(<object>p, run_topic_obj))
                ):
                    if run_count:
                        _count(counts, run_topic_obj, run_partition, run_count)
                    run_topic = p
                    run_topic_obj = <object>p
                    run_partition = partition
                    run_count = 0
                    allowed = assigned is None or (<object>p, partition) in assigned
                if not allowed:
                    continue  # fetched before a revoke was served; the next owner reads it
                topic = <str>run_topic_obj
                run_count += 1
                consumed += 1
                if fast:
                    offset = _msg_i64(message, _MSG_OFFSET)
                    timestamp_ms = _msg_i64(message, _MSG_TIMESTAMP)
                    value = _or_none(_msg_ptr(message, _MSG_VALUE))
                    message_key = _or_none(_msg_ptr(message, _MSG_KEY))
                else:
                    offset = message.offset()
                    timestamp_ms = message.timestamp()[1]
                    value = message.value()
                    message_key = message.key() if check_keys else None
                # -- decode -----------------------------------------------------------
                try:
                    _decode_fields(value, offset, timestamp_ms, max_bytes, max_depth, f)
                    sequence = f.sequence
                except InvalidEvent as exc:
                    invalid.append((message, exc.reason))
                    self._advance(topic, partition, offset)
                    continue
                entity_type.data = PyUnicode_AsUTF8AndSize(f.entity_type, &entity_type.size)
                entity_id.data = PyUnicode_AsUTF8AndSize(f.entity_id, &entity_id.size)
                state.data = PyUnicode_AsUTF8AndSize(f.state, &state.size)
                # "entity_type:entity_id:sequence" is built once: its prefix is the
                # routing key, the whole is the idempotency key and the fallback event id.
                routing_size = entity_type.size + 1 + entity_id.size
                size = routing_size + 21
                if size > key_capacity:
                    if key is not stack:
                        PyMem_Free(key)
                        key = stack
                    key = <char *>PyMem_Malloc(size)
                    if key is NULL:
                        key = stack
                        raise MemoryError()
                    key_capacity = size
                memcpy(key, entity_type.data, entity_type.size)
                key[entity_type.size] = 58  # ':'
                memcpy(key + entity_type.size + 1, entity_id.data, entity_id.size)
                h = spr_xxh64(<const uint8_t *>key, routing_size)
                key[routing_size] = 58
                size = routing_size + 1 + _put_decimal(key + routing_size + 1, sequence)
                # -- key check (design §3) --------------------------------------------
                slot = self._locate(h, &entity_type, &entity_id, &row)
                verified = NULL
                if check_keys:
                    if row >= 0 and self.rows_[row].key_known:
                        memcpy(expected, self.rows_[row].partition_key, 16)
                    else:
                        _partition_key_of(key, routing_size, h, expected)
                    if not _key_matches(message_key, expected):
                        invalid.append((message, _key_reason(message_key, f, expected)))
                        self._advance(topic, partition, offset)
                        continue
                    verified = expected
                # -- duplicates, then the row -----------------------------------------
                if ring._seen_or_add(spr_xxh64(<const uint8_t *>key, size), now_ms):
                    duplicates += 1
                    self._advance(topic, partition, offset)
                    continue
                event_id_obj = f.event_id
                if event_id_obj:
                    event_id.data = PyUnicode_AsUTF8AndSize(event_id_obj, &event_id.size)
                else:
                    event_id.data = key
                    event_id.size = size
                payload.data = PyBytes_AS_STRING(value)
                payload.size = PyBytes_GET_SIZE(value)
                self._store(slot, row, h, &entity_type, &entity_id, &state, &event_id,
                            &payload, sequence, f.timestamp, topic, partition, offset,
                            verified)
                self._events_added += 1
                self._advance(topic, partition, offset)
        finally:
            if key is not stack:
                PyMem_Free(key)
        if run_count:
            _count(counts, run_topic_obj, run_partition, run_count)
        return IngestResult(errors, invalid, duplicates, consumed, counts)

    cdef inline int _advance(self, str topic, int32_t partition, int64_t offset) except -1:
        if (
            self.current_topic is not None
            and partition == self.current_partition
            and topic == <str>self.current_topic
        ):
            if offset >= self.current_next:
                self.current_next = offset + 1
            return 0
        self._merge_current()
        self.current_topic = topic
        self.current_partition = partition
        self.current_next = offset + 1
        return 0

    cdef int _merge_current(self) except -1:
        if self.current_topic is None:
            return 0
        key = (self.current_topic, self.current_partition)
        known = self.next_offset.get(key)
        if known is None or <int64_t>known < self.current_next:
            self.next_offset[key] = self.current_next
        return 0

    def next_offsets(self):
        """``(topic, partition) -> highest offset seen + 1``, for the offsets table."""
        self._merge_current()
        return dict(self.next_offset)

    # -- reading ----------------------------------------------------------------------

    def rows(self):
        """The collapsed rows as Python values in ``columns`` order. ``payload`` is the
        JSON text (str); ``event_ts`` an aware UTC datetime, or None when unknown."""
        cdef Py_ssize_t row, i
        cdef list result = []
        cdef Row *r
        cdef const char *base
        cdef int64_t ts
        cdef Py_ssize_t at
        for row in range(self.nrows):
            r = &self.rows_[row]
            base = self.arena + r.start
            values = []
            for i in range(self.ncols):
                code = self.codes[i]
                if code == COL_ENTITY_TYPE:
                    values.append(base[:r.type_len].decode("utf-8"))
                elif code == COL_ENTITY_ID:
                    values.append(base[r.type_len:r.type_len + r.id_len].decode("utf-8"))
                elif code == COL_SEQUENCE:
                    values.append(r.sequence)
                elif code == COL_STATE:
                    at = r.type_len + r.id_len
                    values.append(base[at:at + r.state_len].decode("utf-8"))
                elif code == COL_EVENT_ID:
                    at = r.type_len + r.id_len + r.state_len
                    values.append(base[at:at + r.event_id_len].decode("utf-8"))
                elif code == COL_PAYLOAD:
                    at = r.type_len + r.id_len + r.state_len + r.event_id_len
                    values.append(base[at:at + r.payload_len].decode("utf-8"))
                elif code == COL_EVENT_TS:
                    ts = r.timestamp_ms
                    if 0 <= ts <= _MAX_TIMESTAMP_MS:
                        values.append(_UNIX_EPOCH + timedelta(milliseconds=ts))
                    else:
                        values.append(None)
                elif code == COL_KAFKA_TOPIC:
                    values.append(self.topic_names[r.topic])
                elif code == COL_KAFKA_PARTITION:
                    values.append(r.partition)
                else:
                    values.append(r.offset)
            result.append(tuple(values))
        return result

    def copy_data(self):
        """The whole ``COPY ... FROM STDIN (FORMAT binary)`` stream for the rows:
        header, one tuple per row in ``columns`` order, trailer."""
        return self._render(0, self.nrows, True, True)

    def copy_chunks(self, Py_ssize_t chunk_bytes=1 << 20):
        """``copy_data()`` in pieces of about ``chunk_bytes`` (whole rows; a row larger
        than that is a piece of its own): their concatenation is ``copy_data()``. For
        streaming COPY without holding the whole stream in memory at once."""
        cdef Py_ssize_t row = 0, first, size
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        while True:
            first = row
            size = 0
            while row < self.nrows:
                size += self._row_size(row)
                if size > chunk_bytes and row > first:
                    break
                row += 1
            yield self._render(first, row, first == 0, row == self.nrows)
            if row == self.nrows:
                return

    cdef Py_ssize_t _row_size(self, Py_ssize_t row) noexcept:
        # About the bytes of one row in the COPY stream, every column counted (only
        # the chunk boundaries depend on it).
        cdef Row *r = &self.rows_[row]
        return (2 + 4 * self.ncols + 29 + r.type_len + r.id_len + r.state_len
                + r.event_id_len + r.payload_len)

    cdef bytes _render(self, Py_ssize_t first, Py_ssize_t last, bint header, bint trailer):
        cdef Py_ssize_t row, i, rows = last
        cdef Py_ssize_t total, size
        cdef Row *r
        cdef int64_t ts
        cdef char *p
        cdef const char *base
        cdef bytes result
        cdef int code
        cdef Py_ssize_t ntopics = len(self.topic_names)
        cdef Text *topics = <Text *>PyMem_Malloc((ntopics + 1) * sizeof(Text))
        if topics is NULL:
            raise MemoryError()
        try:
            for i in range(ntopics):
                topics[i].data = PyUnicode_AsUTF8AndSize(self.topic_names[i], &topics[i].size)
            # Pass 1 sizes the output exactly, so it is written once, straight into the
            # bytes object (no growing buffer, no final copy).
            total = PyBytes_GET_SIZE(COPY_BINARY_HEADER) if header else 0
            if trailer:
                total += 2
            for row in range(first, rows):
                r = &self.rows_[row]
                total += 2 + 4 * self.ncols
                for i in range(self.ncols):
                    code = self.codes[i]
                    if code == COL_ENTITY_TYPE:
                        total += r.type_len
                    elif code == COL_ENTITY_ID:
                        total += r.id_len
                    elif code == COL_STATE:
                        total += r.state_len
                    elif code == COL_EVENT_ID:
                        total += r.event_id_len
                    elif code == COL_KAFKA_TOPIC:
                        total += topics[r.topic].size
                    elif code == COL_PAYLOAD:
                        total += r.payload_len + 1
                    elif code == COL_KAFKA_PARTITION:
                        total += 4
                    elif code == COL_EVENT_TS:
                        ts = r.timestamp_ms
                        if 0 <= ts <= _MAX_TIMESTAMP_MS:
                            total += 8
                    else:
                        total += 8
            result = PyBytes_FromStringAndSize(NULL, total)
            p = PyBytes_AS_STRING(result)
            if header:
                size = PyBytes_GET_SIZE(COPY_BINARY_HEADER)
                memcpy(p, PyBytes_AS_STRING(COPY_BINARY_HEADER), size)
                p += size
            for row in range(first, rows):
                r = &self.rows_[row]
                base = self.arena + r.start
                p = spr_put_be16(p, self.ncols)
                for i in range(self.ncols):
                    code = self.codes[i]
                    if code == COL_ENTITY_TYPE:
                        p = _put_bytes(p, base, r.type_len)
                    elif code == COL_ENTITY_ID:
                        p = _put_bytes(p, base + r.type_len, r.id_len)
                    elif code == COL_STATE:
                        p = _put_bytes(p, base + r.type_len + r.id_len, r.state_len)
                    elif code == COL_EVENT_ID:
                        p = _put_bytes(p, base + r.type_len + r.id_len + r.state_len,
                                       r.event_id_len)
                    elif code == COL_KAFKA_TOPIC:
                        p = _put_bytes(p, topics[r.topic].data, topics[r.topic].size)
                    elif code == COL_PAYLOAD:
                        p = spr_put_be32(p, <int32_t>(r.payload_len + 1))
                        p[0] = 1  # jsonb binary format version
                        memcpy(p + 1,
                               base + r.type_len + r.id_len + r.state_len + r.event_id_len,
                               r.payload_len)
                        p += r.payload_len + 1
                    elif code == COL_SEQUENCE:
                        p = spr_put_be64(spr_put_be32(p, 8), r.sequence)
                    elif code == COL_EVENT_TS:
                        ts = r.timestamp_ms
                        if 0 <= ts <= _MAX_TIMESTAMP_MS:
                            p = spr_put_be64(spr_put_be32(p, 8), (ts - _PG_EPOCH_MS) * 1000)
                        else:
                            p = spr_put_be32(p, -1)
                    elif code == COL_KAFKA_PARTITION:
                        p = spr_put_be32(spr_put_be32(p, 4), r.partition)
                    else:
                        p = spr_put_be64(spr_put_be32(p, 8), r.offset)
            if trailer:
                spr_put_be16(p, -1)
        finally:
            PyMem_Free(topics)
        return result

    def clear(self):
        """Drop every row, offset and counter; the columns stay."""
        self.nrows = 0
        self.arena_used = 0
        if self.slots is not NULL:
            memset(self.slots, 0, (self.mask + 1) * sizeof(int32_t))
        self.topic_names = []
        self.last_topic = None
        self.next_offset.clear()
        self.current_topic = None
        self._events_added = 0
        self._nbytes = 0


cdef inline char *_put_bytes(char *p, const char *data, Py_ssize_t size) noexcept:
    p = spr_put_be32(p, <int32_t>size)
    memcpy(p, data, size)
    return p + size


cdef inline Py_ssize_t _put_decimal(char *out, int64_t value) noexcept:
    # The decimal digits of an int64, as f"{value}" writes them (at most 20 bytes).
    cdef uint64_t v = <uint64_t>value
    if value < 0:
        out[0] = 45  # '-'
        v = <uint64_t>0 - v
        return 1 + _put_decimal_unsigned(out + 1, v)
    return _put_decimal_unsigned(out, v)


cdef inline Py_ssize_t _put_decimal_unsigned(char *out, uint64_t v) noexcept:
    cdef char digits[20]
    cdef Py_ssize_t n = 0, i
    while True:
        digits[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef inline bint _key_matches(object message_key, const char *expected):
    if type(message_key) is bytes:
        return PyBytes_GET_SIZE(message_key) == 16 and memcmp(
            PyBytes_AS_STRING(message_key), expected, 16) == 0
    if message_key is None:
        return False
    return _key_bytes_of(message_key) == PyBytes_FromStringAndSize(expected, 16)


cdef object _key_bytes_of(object message_key):
    if isinstance(message_key, str):
        return (<str>message_key).encode("utf-8")
    return bytes(message_key)


cdef object _key_reason(object message_key, _Fields f, const char *expected):
    cdef str partition_key = PyUnicode_DecodeASCII(expected, 16, NULL)
    if message_key is None:
        return reason_key_missing(f.entity_type, f.entity_id, partition_key)
    return reason_key_mismatch(_key_bytes_of(message_key), f.entity_type, f.entity_id,
                               partition_key)


cdef inline bint _same_text(object a, object b) except -1:
    if type(a) is str and type(b) is str:
        return <str>a == <str>b
    return a == b


cdef int _count(dict counts, object topic, int32_t partition, Py_ssize_t n) except -1:
    key = (topic, partition)
    counts[key] = counts.get(key, 0) + n
    return 0
