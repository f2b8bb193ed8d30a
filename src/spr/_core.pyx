# cython: language_level=3
"""Compiled core of spr; mirrors ``spr._core_py`` name for name, with the same semantics.

The per-element loops (murmur2, XXH64, the ring's probe, the pre-parse scan of a
message, the COPY encoder) are plain C; Python objects appear only at the boundary.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
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
    RawEvent,
    reason_alias_type,
    reason_from_msgspec,
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


cdef object _decode(object value, object offset, object timestamp_ms,
                    Py_ssize_t max_bytes, int64_t max_depth):
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
                return _build(event_id, entity_type, entity_id, sequence, state, timestamp,
                              value)
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
    return _build(event_id, entity_type, entity_id, sequence, state, timestamp, value)


cdef inline object _build(object event_id, str entity_type, str entity_id,
                          object sequence, str state, object timestamp, bytes value):
    if not entity_type:
        raise InvalidEvent(REASON_EMPTY_TYPE)
    if not entity_id:
        raise InvalidEvent(REASON_EMPTY_ID)
    if not state:
        raise InvalidEvent(REASON_EMPTY_STATE)
    if not event_id:
        event_id = f"{entity_type}:{entity_id}:{sequence}"
    return Event(event_id, entity_type, entity_id, sequence, state, timestamp, value)


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


cdef struct RowPosition:
    int64_t sequence
    int64_t offset
    int32_t partition


@cython.final
cdef class Batch:
    """The rows of one flush, collapsed to the newest event per entity.

    Same contract as ``spr._core_py.Batch``. Invariants: ``events[i]``, ``topics[i]``
    and ``positions[i]`` describe row ``i``; ``index[entity_type][entity_id]`` is the
    row of that entity; ``next_offset`` holds every partition's next offset except
    the current one, which is kept in C (``current_*``) while events of one partition
    arrive in a run, and merged in (with max) when the partition changes.
    """

    COPY_FORMAT = "binary"

    cdef tuple _columns
    cdef int codes[10]
    cdef Py_ssize_t ncols
    cdef dict index
    cdef list events
    cdef list topics
    cdef RowPosition *positions
    cdef Py_ssize_t allocated
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
        self.index = {}
        self.events = []
        self.topics = []
        self.next_offset = {}
        self.current_topic = None
        self.positions = NULL
        self.allocated = 0

    def __dealloc__(self):
        PyMem_Free(self.positions)

    @property
    def columns(self):
        """The staging columns, in COPY order."""
        return self._columns

    @property
    def events_added(self):
        """Events passed to ``add`` since creation or the last ``clear``."""
        return self._events_added

    @property
    def row_count(self):
        """Distinct entities buffered (the rows ``copy_data`` would write)."""
        return len(self.events)

    @property
    def nbytes(self):
        """Approximate memory held by the buffered rows, for the memory bound."""
        return self._nbytes

    def __len__(self):
        return len(self.events)

    def add(self, event, str topic, int32_t partition, int64_t offset):
        """Buffer ``event`` read from ``topic``/``partition`` at ``offset``."""
        cdef Py_ssize_t row
        cdef int64_t sequence
        cdef RowPosition *position
        cdef bytes payload
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        sequence = _slot(event, _EV_SEQUENCE)
        payload = _slot(event, _EV_PAYLOAD)
        # Two levels of dicts rather than tuple keys: no tuple per event for the
        # allocator and the garbage collector.
        entity_type = _slot(event, _EV_ENTITY_TYPE)
        by_id = self.index.get(entity_type)
        if by_id is None:
            by_id = self.index[entity_type] = {}
        entity_id = _slot(event, _EV_ENTITY_ID)
        found = (<dict>by_id).get(entity_id)
        if found is None:
            row = len(self.events)
            if row == self.allocated:
                self._grow()
            (<dict>by_id)[entity_id] = row
            self.events.append(event)
            self.topics.append(topic)
            position = &self.positions[row]
            position.sequence = sequence
            position.offset = offset
            position.partition = partition
            self._nbytes += _ROW_OVERHEAD + PyBytes_GET_SIZE(payload)
        else:
            row = found
            position = &self.positions[row]
            if sequence > position.sequence or (
                sequence == position.sequence and offset > position.offset
            ):
                old = self.events[row]
                self._nbytes += PyBytes_GET_SIZE(payload) - PyBytes_GET_SIZE(
                    _slot(old, _EV_PAYLOAD)
                )
                self.events[row] = event
                self.topics[row] = topic
                position.sequence = sequence
                position.offset = offset
                position.partition = partition
        self._events_added += 1
        self._advance(topic, partition, offset)

    def advance(self, str topic, int32_t partition, int64_t offset):
        """Mark ``offset`` consumed without a row (a duplicate or a dead letter)."""
        self._advance(topic, partition, offset)

    cdef int _grow(self) except -1:
        cdef Py_ssize_t size = max(1024, 2 * self.allocated)
        cdef RowPosition *grown = <RowPosition *>PyMem_Realloc(
            self.positions, size * sizeof(RowPosition)
        )
        if grown is NULL:
            raise MemoryError()
        self.positions = grown
        self.allocated = size
        return 0

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

    def rows(self):
        """The collapsed rows as Python values in ``columns`` order. ``payload`` is the
        JSON text (str); ``event_ts`` an aware UTC datetime, or None when unknown."""
        cdef Py_ssize_t row, i
        cdef list result = []
        cdef RowPosition *position
        cdef int64_t ts
        for row in range(len(self.events)):
            event = self.events[row]
            position = &self.positions[row]
            values = []
            for i in range(self.ncols):
                code = self.codes[i]
                if code == COL_ENTITY_TYPE:
                    values.append(event.entity_type)
                elif code == COL_ENTITY_ID:
                    values.append(event.entity_id)
                elif code == COL_SEQUENCE:
                    values.append(event.sequence)
                elif code == COL_STATE:
                    values.append(event.state)
                elif code == COL_EVENT_ID:
                    values.append(event.event_id)
                elif code == COL_PAYLOAD:
                    values.append((<bytes>_slot(event, _EV_PAYLOAD)).decode("utf-8"))
                elif code == COL_EVENT_TS:
                    ts = event.timestamp_ms
                    if 0 <= ts <= _MAX_TIMESTAMP_MS:
                        values.append(_UNIX_EPOCH + timedelta(milliseconds=ts))
                    else:
                        values.append(None)
                elif code == COL_KAFKA_TOPIC:
                    values.append(self.topics[row])
                elif code == COL_KAFKA_PARTITION:
                    values.append(position.partition)
                else:
                    values.append(position.offset)
            result.append(tuple(values))
        return result

    def copy_data(self):
        """The whole ``COPY ... FROM STDIN (FORMAT binary)`` stream for the rows:
        header, one tuple per row in ``columns`` order, trailer."""
        cdef Py_ssize_t row, i, rows = len(self.events)
        cdef Py_ssize_t total, size
        cdef RowPosition *position
        cdef int64_t ts
        cdef char *p
        cdef bytes payload, result
        cdef int code
        # Pass 1 sizes the output exactly, so it is written once, straight into the
        # bytes object (no growing buffer, no final copy). The UTF-8 of a str is cached
        # in the str, so pass 2 finds it again for free.
        total = PyBytes_GET_SIZE(COPY_BINARY_HEADER) + 2
        for row in range(rows):
            event = self.events[row]
            total += 2 + 4 * self.ncols
            for i in range(self.ncols):
                code = self.codes[i]
                if code == COL_ENTITY_TYPE:
                    PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_TYPE), &size)
                elif code == COL_ENTITY_ID:
                    PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_ID), &size)
                elif code == COL_STATE:
                    PyUnicode_AsUTF8AndSize(_slot(event, _EV_STATE), &size)
                elif code == COL_EVENT_ID:
                    PyUnicode_AsUTF8AndSize(_slot(event, _EV_EVENT_ID), &size)
                elif code == COL_KAFKA_TOPIC:
                    PyUnicode_AsUTF8AndSize(self.topics[row], &size)
                elif code == COL_PAYLOAD:
                    size = PyBytes_GET_SIZE(_slot(event, _EV_PAYLOAD)) + 1
                elif code == COL_KAFKA_PARTITION:
                    size = 4
                elif code == COL_EVENT_TS:
                    ts = _slot(event, _EV_TIMESTAMP_MS)
                    size = 8 if 0 <= ts <= _MAX_TIMESTAMP_MS else 0
                else:
                    size = 8
                total += size
        result = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(result)
        size = PyBytes_GET_SIZE(COPY_BINARY_HEADER)
        memcpy(p, PyBytes_AS_STRING(COPY_BINARY_HEADER), size)
        p += size
        for row in range(rows):
            event = self.events[row]
            position = &self.positions[row]
            p = spr_put_be16(p, self.ncols)
            for i in range(self.ncols):
                code = self.codes[i]
                if code == COL_ENTITY_TYPE:
                    p = _put_text(p, _slot(event, _EV_ENTITY_TYPE))
                elif code == COL_ENTITY_ID:
                    p = _put_text(p, _slot(event, _EV_ENTITY_ID))
                elif code == COL_STATE:
                    p = _put_text(p, _slot(event, _EV_STATE))
                elif code == COL_EVENT_ID:
                    p = _put_text(p, _slot(event, _EV_EVENT_ID))
                elif code == COL_KAFKA_TOPIC:
                    p = _put_text(p, self.topics[row])
                elif code == COL_PAYLOAD:
                    payload = _slot(event, _EV_PAYLOAD)
                    size = PyBytes_GET_SIZE(payload)
                    p = spr_put_be32(p, <int32_t>(size + 1))
                    p[0] = 1
                    memcpy(p + 1, PyBytes_AS_STRING(payload), size)
                    p += size + 1
                elif code == COL_SEQUENCE:
                    p = spr_put_be64(spr_put_be32(p, 8), position.sequence)
                elif code == COL_EVENT_TS:
                    ts = _slot(event, _EV_TIMESTAMP_MS)
                    if 0 <= ts <= _MAX_TIMESTAMP_MS:
                        p = spr_put_be64(spr_put_be32(p, 8), (ts - _PG_EPOCH_MS) * 1000)
                    else:
                        p = spr_put_be32(p, -1)
                elif code == COL_KAFKA_PARTITION:
                    p = spr_put_be32(spr_put_be32(p, 4), position.partition)
                else:
                    p = spr_put_be64(spr_put_be32(p, 8), position.offset)
        spr_put_be16(p, -1)
        return result

    def clear(self):
        """Drop every row, offset and counter; the columns stay."""
        self.index.clear()
        self.events.clear()
        self.topics.clear()
        self.next_offset.clear()
        self.current_topic = None
        self._events_added = 0
        self._nbytes = 0


cdef inline char *_put_text(char *p, str text) except NULL:
    cdef Py_ssize_t size
    cdef const char *data = PyUnicode_AsUTF8AndSize(text, &size)
    p = spr_put_be32(p, <int32_t>size)
    memcpy(p, data, size)
    return p + size
