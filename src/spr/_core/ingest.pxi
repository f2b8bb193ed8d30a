# The fused ingest (design §3, §4, §10): one consume() result decoded, key-checked,
# checked for misrouting, deduplicated and buffered in one pass, with no Event built
# per message. Invariant: the same IngestResult and batch contents as
# spr._core_py.Batch.ingest, whose docstring states the rules. Batch.ingest (batch.pxi)
# is a thin wrapper over _ingest; both, and what _ingest calls, are C functions of this
# one module.

cdef object _ingest(Batch batch, object messages, IdempotencyRing ring, int64_t now_ms,
                    object assigned, object limits, bint check_keys, object partitions,
                    object on_misrouted):
    # The body of Batch.ingest (batch.pxi), which checked the argument types.
    cdef _Fields f = _Fields.__new__(_Fields)
    cdef list errors = [], invalid = [], held = []
    cdef dict counts = {}, misrouted = {}
    cdef Py_ssize_t max_bytes, duplicates = 0, consumed = 0, run_count = 0, size
    cdef Py_ssize_t run_misrouted = 0
    cdef int64_t max_depth, offset, timestamp_ms, sequence
    cdef int64_t modulus = 0  # the run's partition count: 0 no check, -1 not checked yet
    cdef int32_t partition, run_partition = 0, home
    cdef bint fast, allowed = True, hold_given = False, hold_missing = False, matched
    cdef object count_obj = None
    cdef object message_type = _message_type
    cdef PyObject *run_topic = NULL
    cdef object run_topic_obj = None  # keeps run_topic alive
    cdef PyObject *p
    cdef Text entity_type, entity_id, state, event_id, payload
    cdef char stack[320]
    cdef char *key = stack
    cdef Py_ssize_t key_capacity = _KEY_BUFFER, routing_size, row = -1
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
    if partitions is not None:
        # on_misrouted as the twin reads it: what to hold back, with or without a sequence.
        hold_missing = on_misrouted != MISROUTED_APPLY
        hold_given = hold_missing and not on_misrouted == MISROUTED_BY_SEQUENCE
    try:
        for message in messages:
            fast = message_type is not None and type(message) is message_type
            # -- errors, ownership, position ------------------------------------------
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
                if run_misrouted:
                    misrouted[run_topic_obj] = misrouted.get(run_topic_obj, 0) + run_misrouted
                run_topic = p
                run_topic_obj = <object>p
                run_partition = partition
                run_count = 0
                run_misrouted = 0
                allowed = assigned is None or (<object>p, partition) in assigned
                modulus = 0
                if partitions is not None and allowed:
                    count_obj = partitions.get(run_topic_obj)
                    if count_obj:
                        modulus = -1
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
            # -- decode ---------------------------------------------------------------
            try:
                _decode_fields(value, offset, timestamp_ms, max_bytes, max_depth, f)
                sequence = f.sequence
            except InvalidEvent as exc:
                invalid.append((message, exc.reason))
                batch._advance(topic, partition, offset)
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
            size = routing_size + 1 + spr_put_decimal(key + routing_size + 1, sequence)
            # -- key check (design §3) ------------------------------------------------
            slot = batch._locate(h, &entity_type, &entity_id, &row)
            verified = NULL
            if check_keys:
                if row >= 0 and batch.rows_[row].key_known:
                    memcpy(expected, batch.rows_[row].partition_key, 16)
                else:
                    _partition_key_of(key, routing_size, h, expected)
                # _key_matches, its common case spelt out here (see SPR_ALWAYS_INLINE).
                if type(message_key) is bytes:
                    matched = PyBytes_GET_SIZE(message_key) == 16 and memcmp(
                        PyBytes_AS_STRING(message_key), expected, 16) == 0
                else:
                    matched = _key_matches(message_key, expected)
                if not matched:
                    invalid.append((message, _key_reason(message_key, f, expected)))
                    batch._advance(topic, partition, offset)
                    continue
                verified = expected
            # -- misrouting (design §10): the partition key is at hand, murmur2 is C ----
            if modulus != 0:
                if modulus < 0:
                    modulus = _check_partitions(count_obj)
                if verified is NULL:
                    if row >= 0 and batch.rows_[row].key_known:
                        memcpy(expected, batch.rows_[row].partition_key, 16)
                    else:
                        _partition_key_of(key, routing_size, h, expected)
                    verified = expected
                # Both operands fit in 31 bits: a 32-bit division, the cheaper one.
                home = <int32_t>((<uint32_t>spr_murmur2(<const uint8_t *>expected, 16)
                                  & 0x7FFFFFFF) % <uint32_t>modulus)
                if home != partition:
                    run_misrouted += 1
                    if hold_given if f.sequence_given else hold_missing:
                        held.append((message, _misrouted_reason(
                            topic, partition, f, expected, home, count_obj)))
                        batch._advance(topic, partition, offset)
                        continue
            # -- duplicates, then the row ---------------------------------------------
            if ring._seen_or_add(spr_xxh64(<const uint8_t *>key, size), now_ms):
                duplicates += 1
                batch._advance(topic, partition, offset)
                continue
            event_id_obj = f.event_id
            if event_id_obj:
                event_id.data = PyUnicode_AsUTF8AndSize(event_id_obj, &event_id.size)
            else:
                event_id.data = key
                event_id.size = size
            payload.data = PyBytes_AS_STRING(value)
            payload.size = PyBytes_GET_SIZE(value)
            batch._store(slot, row, h, &entity_type, &entity_id, &state, &event_id,
                         &payload, sequence, f.timestamp, topic, partition, offset,
                         verified)
            batch._events_added += 1
            batch._advance(topic, partition, offset)
    finally:
        if key is not stack:
            PyMem_Free(key)
    if run_count:
        _count(counts, run_topic_obj, run_partition, run_count)
    if run_misrouted:
        misrouted[run_topic_obj] = misrouted.get(run_topic_obj, 0) + run_misrouted
    return IngestResult(errors, invalid, duplicates, consumed, counts, misrouted, held)


cdef object _misrouted_reason(str topic, int32_t partition, _Fields f, const char *key,
                              int32_t home, object count):
    return reason_misrouted(
        topic, partition, f"{f.entity_type}:{f.entity_id}",
        PyUnicode_DecodeASCII(key, 16, NULL), home, count,
        REASON_MISROUTED_HELD if f.sequence_given else REASON_MISROUTED_NO_SEQUENCE,
    )


cdef inline bint _same_text(object a, object b) except -1:
    if type(a) is str and type(b) is str:
        return <str>a == <str>b
    return a == b


cdef int _count(dict counts, object topic, int32_t partition, Py_ssize_t n) except -1:
    key = (topic, partition)
    counts[key] = counts.get(key, 0) + n
    return 0
