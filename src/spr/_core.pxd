# Declarations shared by the include files of spr._core (src/spr/_core/*.pxi): the
# C helpers and structs that more than one job uses, and the C layout of the extension
# types. Definitions live in the include files; Cython reads this file first.

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* For the few helpers of the per-event loops that must be inlined whatever the C
       compiler's budget for the whole (large) module says. */
    #if defined(__GNUC__) || defined(__clang__)
    #define SPR_ALWAYS_INLINE inline __attribute__((always_inline))
    #else
    #define SPR_ALWAYS_INLINE inline
    #endif

    /* The decimal digits of an int64, as f"{value}" writes them (at most 20 bytes). */
    static SPR_ALWAYS_INLINE Py_ssize_t spr_put_decimal(char *out, int64_t value) {
        char digits[20];
        Py_ssize_t n = 0, i, sign = 0;
        uint64_t v = (uint64_t)value;
        if (value < 0) {
            *out++ = '-';
            v = (uint64_t)0 - v;
            sign = 1;
        }
        do {
            digits[n++] = (char)('0' + v % 10);
            v /= 10;
        } while (v != 0);
        for (i = 0; i < n; i++) out[i] = digits[n - 1 - i];
        return sign + n;
    }

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
    """
    # Fingerprints (fingerprints.pxi), the batch's entity index (batch.pxi, ingest.pxi).
    uint64_t spr_xxh64(const uint8_t *p, size_t length) nogil
    # Idempotency keys and headers (ingest.pxi, rekey.pxi).
    Py_ssize_t spr_put_decimal(char *out, int64_t value) nogil


# ------------------------------------------------------------------------------- ring

cdef struct RingSlot:
    uint64_t fingerprint  # 0 = empty
    int64_t added_ms


cdef class IdempotencyRing:
    # Invariants: see the class docstring in _core/ring.pxi. Not final, so that
    # SourceTable can extend the table; its hot methods are final, hence direct C calls.
    cdef RingSlot *slots
    cdef size_t _capacity
    cdef size_t window
    cdef int64_t _ttl_ms
    cdef int64_t last_now_ms
    cdef uint64_t _lookups
    cdef uint64_t _hits
    cdef uint64_t _evictions

    @cython.final
    cdef inline size_t _prefetch(self, uint64_t fp) noexcept

    @cython.final
    cdef inline bint _seen_or_add(self, uint64_t fp, int64_t now) noexcept

    @cython.final
    cdef inline bint _seen_or_add_at(self, uint64_t fp, size_t slot, int64_t now) noexcept

    @cython.final
    cdef inline RingSlot *_find_or_insert(self, uint64_t fp, size_t slot, int64_t now,
                                          bint *found) noexcept


@cython.final
cdef class SourceTable(IdempotencyRing):
    # The ring's table plus sources[i], the value of slots[i] (see _core/ring.pxi).
    cdef uint64_t *sources

    cdef inline uint64_t _claim(self, uint64_t fp, uint64_t source, int64_t now) noexcept


# ----------------------------------------------------------------------------- decode

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
    cdef bint sequence_given  # False when sequence is the offset


# ------------------------------------------------------------------------------ batch

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


@cython.final
cdef class Batch:
    # Invariants: see the class docstring in _core/batch.pxi.
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

    cdef int _grow_rows(self) except -1
    cdef int _grow_slots(self) except -1
    cdef char *_reserve(self, Py_ssize_t size) except NULL
    cdef inline size_t _find(self, uint64_t h, Text *entity_type, Text *entity_id,
                             Py_ssize_t *row) noexcept
    cdef int32_t _topic_index(self, str topic) except -1
    cdef inline size_t _locate(self, uint64_t h, Text *entity_type, Text *entity_id,
                               Py_ssize_t *row) except? 0
    cdef int _store(self, size_t slot, Py_ssize_t row, uint64_t h, Text *entity_type,
                    Text *entity_id, Text *state, Text *event_id, Text *payload,
                    int64_t sequence, int64_t timestamp_ms, str topic, int32_t partition,
                    int64_t offset, const char *partition_key) except -1
    cdef inline int _advance(self, str topic, int32_t partition, int64_t offset) except -1
    cdef int _merge_current(self) except -1
    cdef Py_ssize_t _row_size(self, Py_ssize_t row) noexcept
