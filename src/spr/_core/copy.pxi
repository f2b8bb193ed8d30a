# The binary COPY encoder (design §4): the batch's rows as ``COPY ... FROM STDIN
# (FORMAT binary)`` data, written straight from the arena into one bytes object.
# Invariant: byte for byte what spr._core_py.copy writes for the same rows and columns.

cdef extern from *:
    """
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
    char *spr_put_be16(char *p, int v) nogil
    char *spr_put_be32(char *p, int32_t v) nogil
    char *spr_put_be64(char *p, int64_t v) nogil


cdef int64_t _PG_EPOCH_MS = 946684800000  # 2000-01-01T00:00:00Z


cdef bytes _render(Batch batch, Py_ssize_t first, Py_ssize_t last, bint header,
                   bint trailer, Py_ssize_t lane=0, Py_ssize_t lanes=1):
    # Rows [first, last) of the batch that belong to ``lane`` (partition % lanes), with
    # the header and/or trailer when asked: copy_data() is one call over every row,
    # copy_chunks() one call per chunk.
    cdef Py_ssize_t row, i, rows = last
    cdef Py_ssize_t total, size
    cdef Row *r
    cdef int64_t ts
    cdef char *p
    cdef const char *base
    cdef bytes result
    cdef int code
    cdef Py_ssize_t ntopics = len(batch.topic_names)
    cdef Text *topics = <Text *>PyMem_Malloc((ntopics + 1) * sizeof(Text))
    if topics is NULL:
        raise MemoryError()
    try:
        for i in range(ntopics):
            topics[i].data = PyUnicode_AsUTF8AndSize(batch.topic_names[i], &topics[i].size)
        # Pass 1 sizes the output exactly, so it is written once, straight into the
        # bytes object (no growing buffer, no final copy).
        total = PyBytes_GET_SIZE(COPY_BINARY_HEADER) if header else 0
        if trailer:
            total += 2
        for row in range(first, rows):
            r = &batch.rows_[row]
            if lanes > 1 and r.partition % lanes != lane:
                continue
            total += 2 + 4 * batch.ncols
            for i in range(batch.ncols):
                code = batch.codes[i]
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
            r = &batch.rows_[row]
            if lanes > 1 and r.partition % lanes != lane:
                continue
            base = batch.arena + r.start
            p = spr_put_be16(p, batch.ncols)
            for i in range(batch.ncols):
                code = batch.codes[i]
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


cdef inline char *_put_bytes(char *p, const char *data, Py_ssize_t size) noexcept:
    p = spr_put_be32(p, <int32_t>size)
    memcpy(p, data, size)
    return p + size
