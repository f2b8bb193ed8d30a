# The routing stage's core (design §10): one consume() result decoded, checked for
# unorderable sequence-less events (SourceTable), deduplicated (the ring) and turned
# into output records in one pass. Invariant: the same RekeyResult as
# spr._core_py.rekey, whose docstring states the rules, byte for byte. The record's
# value is the CanonicalOutput JSON that _event.OUTPUT_ENCODER (msgspec) writes, built
# here in C from the decoded fields: msgspec writes strings as UTF-8 with `"`, `\` and
# the control characters escaped (\b \t \n \f \r, else \u00xx), ints in decimal, the
# Raw payload verbatim, and leaves out a None timestamp (omit_defaults).

cdef extern from *:
    """
    static inline size_t spr_json_string_size(const uint8_t *s, size_t n) {
        size_t size = n + 2, i;
        for (i = 0; i < n; i++) {
            uint8_t c = s[i];
            if (c < 0x20) {
                size += (c == '\\b' || c == '\\t' || c == '\\n' || c == '\\f' || c == '\\r')
                    ? 1 : 5;
            } else if (c == '"' || c == '\\\\') {
                size += 1;
            }
        }
        return size;
    }
    /* Writes the string (size from spr_json_string_size) and returns the end. */
    static inline char *spr_json_put_string(char *out, const uint8_t *s, size_t n,
                                            size_t size) {
        static const char hex[] = "0123456789abcdef";
        size_t i;
        *out++ = '"';
        if (size == n + 2) {
            memcpy(out, s, n);
            out += n;
        } else {
            for (i = 0; i < n; i++) {
                uint8_t c = s[i];
                if (c >= 0x20 && c != '"' && c != '\\\\') { *out++ = (char)c; continue; }
                *out++ = '\\\\';
                switch (c) {
                    case '"': *out++ = '"'; break;
                    case '\\\\': *out++ = '\\\\'; break;
                    case '\\b': *out++ = 'b'; break;
                    case '\\t': *out++ = 't'; break;
                    case '\\n': *out++ = 'n'; break;
                    case '\\f': *out++ = 'f'; break;
                    case '\\r': *out++ = 'r'; break;
                    default:
                        *out++ = 'u'; *out++ = '0'; *out++ = '0';
                        *out++ = hex[c >> 4]; *out++ = hex[c & 15];
                }
            }
        }
        *out++ = '"';
        return out;
    }
    """
    size_t spr_json_string_size(const uint8_t *s, size_t n) nogil
    char *spr_json_put_string(char *out, const uint8_t *s, size_t n, size_t size) nogil


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)


cdef inline tuple _header(str name, bytes value):
    # A (str, bytes) pair can't be part of a reference cycle. Untracking it at once
    # (the collector would on its first look) leaves each record and its header list
    # as the only containers per record that the collections a large batch triggers
    # scan and promote.
    cdef tuple pair = (name, value)
    PyObject_GC_UnTrack(<void *>pair)
    return pair


cdef bytes _SCHEMA_VERSION = SCHEMA_VERSION
# Shared by every record: tuples are immutable, and equal to the twin's.
cdef tuple _SCHEMA_HEADER = _header("schema-version", _SCHEMA_VERSION)


def source_fingerprint(topic, partition):
    """The ``SourceTable`` value of one source partition (never 0)."""
    cdef Py_ssize_t size
    cdef str text = f"{topic}\x00{partition}"
    cdef uint64_t h = spr_xxh64(<const uint8_t *>PyUnicode_AsUTF8AndSize(text, &size), size)
    return h if h != 0 else 1


def rekey(messages, IdempotencyRing ring not None, SourceTable sources, source_names,
          int64_t now_ms, output_partitions, assigned=None, limits=DEFAULT_LIMITS):
    """Re-key one ``consume()`` result into output records; see
    ``spr._core_py.rekey`` for the rules and ``RekeyResult`` for what comes back.
    Raises only on a bad argument."""
    cdef _Fields f = _Fields.__new__(_Fields)
    cdef list errors = [], invalid = [], unorderable = [], records = []
    cdef dict counts = {}, positions = {}
    cdef Py_ssize_t max_bytes, duplicates = 0, consumed = 0, run_count = 0, size
    cdef Py_ssize_t routing_size, key_capacity = _KEY_BUFFER
    cdef int64_t max_depth, offset, timestamp_ms, sequence, run_last = 0
    cdef int64_t outputs
    cdef int32_t partition, run_partition = 0
    cdef bint fast, allowed = True
    cdef object message_type = _message_type
    cdef PyObject *run_topic = NULL
    cdef object run_topic_obj = None  # keeps run_topic alive
    cdef PyObject *p
    cdef Text entity_type, entity_id
    cdef char stack[320]
    cdef char *key = stack
    cdef char partition_key[16]
    cdef char digits[24]
    cdef uint64_t h, earlier, run_source = 0  # 0: not known yet in this run
    cdef object run_name = None
    cdef tuple run_topic_header = None, run_partition_header = None
    cdef tuple record
    cdef list headers
    if not 1 <= output_partitions <= _INT32_MAX:
        raise ValueError(
            f"output_partitions must be between 1 and 2**31-1, got {output_partitions}"
        )
    outputs = output_partitions
    if limits is _default_limits:
        max_bytes, max_depth = _default_max_bytes, _default_max_depth
    else:
        max_bytes, max_depth = limits.max_bytes, limits.max_depth
    if not _message_probed:
        message_type = _probe_message_type()
    try:
        for message in messages:
            fast = message_type is not None and type(message) is message_type
            # -- errors, ownership, position (as in ingest.pxi) -----------------------
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
            if partition != run_partition or (
                p != run_topic
                and (run_topic is NULL or not _same_text(<object>p, run_topic_obj))
            ):
                if run_count:
                    _count(counts, run_topic_obj, run_partition, run_count)
                    positions[(run_topic_obj, run_partition)] = <object>run_last + 1
                run_topic = p
                run_topic_obj = <object>p
                run_partition = partition
                run_count = 0
                allowed = assigned is None or (<object>p, partition) in assigned
                run_source = 0
                run_topic_header = None
            if not allowed:
                continue
            run_count += 1
            consumed += 1
            if fast:
                offset = _msg_i64(message, _MSG_OFFSET)
                timestamp_ms = _msg_i64(message, _MSG_TIMESTAMP)
                value = _or_none(_msg_ptr(message, _MSG_VALUE))
            else:
                offset = message.offset()
                timestamp_ms = message.timestamp()[1]
                value = message.value()
            run_last = offset  # its position is run_last + 1, as a Python int: no overflow
            # -- decode ---------------------------------------------------------------
            try:
                _decode_fields(value, offset, timestamp_ms, max_bytes, max_depth, f)
                sequence = f.sequence
            except InvalidEvent as exc:
                invalid.append((message, exc.reason))
                continue
            entity_type.data = PyUnicode_AsUTF8AndSize(f.entity_type, &entity_type.size)
            entity_id.data = PyUnicode_AsUTF8AndSize(f.entity_id, &entity_id.size)
            size = _idempotency_key(&key, &key_capacity, stack, &entity_type, &entity_id,
                                    sequence)
            routing_size = entity_type.size + 1 + entity_id.size
            h = spr_xxh64(<const uint8_t *>key, routing_size)
            # -- a sequence-less event from a second source partition -----------------
            if not f.sequence_given and sources is not None:
                if run_source == 0:
                    run_source = _source_of(run_topic_obj, partition)
                    run_name = f"{run_topic_obj}[{partition}]"
                    source_names.setdefault(run_source, run_name)
                earlier = sources._claim(h, run_source, now_ms)
                if earlier:
                    unorderable.append((message, reason_unorderable(
                        f"{f.entity_type}:{f.entity_id}",
                        source_names.get(earlier, "another source partition"), run_name)))
                    continue
            # -- duplicates, then the record ------------------------------------------
            if ring._seen_or_add(spr_xxh64(<const uint8_t *>key, size), now_ms):
                duplicates += 1
                continue
            _partition_key_of(key, routing_size, h, partition_key)
            if run_topic_header is None:
                run_topic_header = _header("spr-source-topic", run_topic_obj.encode())
                run_partition_header = _header("spr-source-partition",
                                               str(partition).encode())
            headers = [
                _header("idempotency-key", PyBytes_FromStringAndSize(key, size)),
                _SCHEMA_HEADER,
                run_topic_header,
                run_partition_header,
                _header("spr-source-offset",
                        PyBytes_FromStringAndSize(digits, spr_put_decimal(digits, offset))),
            ]
            record = (
                PyBytes_FromStringAndSize(partition_key, 16),
                _canonical_output(f, key, size, sequence, value),
                (<uint32_t>spr_murmur2(<const uint8_t *>partition_key, 16) & 0x7FFFFFFF)
                % <uint32_t>outputs,
                headers,
            )
            # Neither holds anything that could refer back to it (bytes, an int and
            # untracked header pairs) and the caller only reads them: untracked, a
            # batch of records is no work for the collector.
            PyObject_GC_UnTrack(<void *>headers)
            PyObject_GC_UnTrack(<void *>record)
            records.append(record)
    finally:
        if key is not stack:
            PyMem_Free(key)
    if run_count:
        _count(counts, run_topic_obj, run_partition, run_count)
        positions[(run_topic_obj, run_partition)] = <object>run_last + 1
    return RekeyResult(errors, invalid, unorderable, duplicates, consumed, counts, records,
                       positions)


cdef inline Py_ssize_t _idempotency_key(char **key, Py_ssize_t *capacity, char *stack,
                                        Text *entity_type, Text *entity_id,
                                        int64_t sequence) except -1:
    # Writes "entity_type:entity_id:sequence" to *key, first replacing a buffer (stack,
    # or one of its own) of *capacity bytes that is too small; returns its size. Its
    # first entity_type.size + 1 + entity_id.size bytes are the routing key. The same
    # bytes as _ingest (ingest.pxi) builds in its loop.
    cdef Py_ssize_t routing_size = entity_type.size + 1 + entity_id.size
    cdef char *grown
    cdef char *p
    if routing_size + 21 > capacity[0]:
        grown = <char *>PyMem_Malloc(routing_size + 21)
        if grown is NULL:
            raise MemoryError()
        if key[0] is not stack:
            PyMem_Free(key[0])
        key[0] = grown
        capacity[0] = routing_size + 21
    p = key[0]
    memcpy(p, entity_type.data, entity_type.size)
    p[entity_type.size] = 58  # ':'
    memcpy(p + entity_type.size + 1, entity_id.data, entity_id.size)
    p[routing_size] = 58
    return routing_size + 1 + spr_put_decimal(p + routing_size + 1, sequence)


cdef uint64_t _source_of(object topic, int32_t partition) except? 0:
    return source_fingerprint(topic, partition)


cdef bytes _canonical_output(_Fields f, const char *idempotency_key,
                             Py_ssize_t idempotency_size, int64_t sequence, bytes payload):
    # OUTPUT_ENCODER.encode(CanonicalOutput(...)) of the event, as rekey's twin builds it.
    cdef Text event_id, entity_type, entity_id, state
    cdef size_t id_size, type_size, entity_size, state_size
    cdef char sequence_digits[24]
    cdef char timestamp_digits[24]
    cdef Py_ssize_t sequence_len, timestamp_len = 0, total
    cdef int64_t timestamp = f.timestamp
    cdef char *out
    if f.event_id:
        event_id.data = PyUnicode_AsUTF8AndSize(f.event_id, &event_id.size)
    else:
        event_id.data = idempotency_key
        event_id.size = idempotency_size
    entity_type.data = PyUnicode_AsUTF8AndSize(f.entity_type, &entity_type.size)
    entity_id.data = PyUnicode_AsUTF8AndSize(f.entity_id, &entity_id.size)
    state.data = PyUnicode_AsUTF8AndSize(f.state, &state.size)
    id_size = spr_json_string_size(<const uint8_t *>event_id.data, event_id.size)
    type_size = spr_json_string_size(<const uint8_t *>entity_type.data, entity_type.size)
    entity_size = spr_json_string_size(<const uint8_t *>entity_id.data, entity_id.size)
    state_size = spr_json_string_size(<const uint8_t *>state.data, state.size)
    sequence_len = spr_put_decimal(sequence_digits, sequence)
    if timestamp >= 0:
        timestamp_len = 13 + spr_put_decimal(timestamp_digits, timestamp)
    total = (12 + id_size + 15 + type_size + 13 + entity_size + 12 + sequence_len + 9
             + state_size + timestamp_len + 11 + PyBytes_GET_SIZE(payload) + 1)
    result = PyBytes_FromStringAndSize(NULL, total)
    out = PyBytes_AS_STRING(result)
    out = _put_text(out, b'{"event_id":', 12)
    out = spr_json_put_string(out, <const uint8_t *>event_id.data, event_id.size, id_size)
    out = _put_text(out, b',"entity_type":', 15)
    out = spr_json_put_string(out, <const uint8_t *>entity_type.data, entity_type.size,
                              type_size)
    out = _put_text(out, b',"entity_id":', 13)
    out = spr_json_put_string(out, <const uint8_t *>entity_id.data, entity_id.size,
                              entity_size)
    out = _put_text(out, b',"sequence":', 12)
    out = _put_text(out, sequence_digits, sequence_len)
    out = _put_text(out, b',"state":', 9)
    out = spr_json_put_string(out, <const uint8_t *>state.data, state.size, state_size)
    if timestamp_len:
        out = _put_text(out, b',"timestamp":', 13)
        out = _put_text(out, timestamp_digits, timestamp_len - 13)
    out = _put_text(out, b',"payload":', 11)
    out = _put_text(out, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
    out[0] = 125  # '}'
    return result


cdef inline char *_put_text(char *out, const char *text, Py_ssize_t size) noexcept:
    memcpy(out, text, size)
    return out + size
