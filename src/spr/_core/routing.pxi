# Routing (design §3): the partition key of a routing key (first 8 bytes of its
# SHA-256, in hex) and Kafka's murmur2 partitioner, one key or many at a time.
# Invariant: every result equals spr._core_py.routing's, bit for bit, on any input.

cdef extern from *:
    """
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
    """
    int32_t spr_murmur2(const uint8_t *data, size_t length) nogil


cdef int64_t _INT32_MAX = 2147483647


cdef inline const uint8_t *_key_bytes(object key, Py_ssize_t *size, list keep) except NULL:
    # UTF-8 of a str (cached inside the str, no copy for ASCII), or the bytes themselves.
    # Also reads idempotency keys for fingerprints.pxi.
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


def partition_key(str routing_key):
    """First 8 bytes of SHA-256 of the UTF-8 routing key, as 16 lowercase hex chars."""
    cdef char buf[16]
    _hex8(_sha256(routing_key.encode("utf-8")).digest(), buf)
    return PyUnicode_DecodeASCII(buf, 16, NULL)


cdef inline void _hex8(bytes digest, char *out) noexcept:
    # Shared with keycheck.pxi, whose cache misses may fall back to hashlib.
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
