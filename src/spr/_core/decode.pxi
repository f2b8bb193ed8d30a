# Decoding (design §2): one Kafka message value to the canonical fields, with msgspec.
# A C pre-scan checks UTF-8 and nesting depth before any parsing; msgspec Structs are
# then read through their object slots, not attribute lookups. Invariant: the same
# event, or the same InvalidEvent reason, as spr._core_py.decode for every input.

cdef extern from *:
    """
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
    """
    int spr_prescan(const uint8_t *s, size_t n, int64_t max_depth) nogil


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


# Event is read by Batch.add (batch.pxi).
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


cdef object _raw_decode = RAW_DECODER.decode
cdef object _canonical_decode = CANONICAL_DECODER.decode
cdef object _MAX_INT64 = MAX_INT64
cdef object _DecodeError = msgspec.DecodeError


@cython.final
cdef class _Fields:
    # Its fields, and why it exists, are declared in _core.pxd.
    pass


cdef object _decode(object value, object offset, object timestamp_ms,
                    Py_ssize_t max_bytes, int64_t max_depth, _Fields f):
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
    cdef bint given
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
                             timestamp, True)
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
    given = sequence is not None
    if not given:
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
    return _fill(out, event_id, entity_type, entity_id, sequence, state, timestamp, given)


cdef inline int _fill(_Fields out, object event_id, str entity_type, str entity_id,
                      object sequence, str state, object timestamp,
                      bint sequence_given) except -1:
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
    out.sequence_given = sequence_given
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
    cdef _Fields f = _Fields.__new__(_Fields)
    if limits is _default_limits:
        return _decode(value, offset, timestamp_ms, _default_max_bytes, _default_max_depth, f)
    return _decode(value, offset, timestamp_ms, limits.max_bytes, limits.max_depth, f)


def decode_with_sequence(value, *, offset, timestamp_ms, limits=DEFAULT_LIMITS):
    """``decode_event``, and whether the event carried its own sequence (False when it
    took ``offset``, which orders it only against events of the same partition)."""
    cdef _Fields f = _Fields.__new__(_Fields)
    if limits is _default_limits:
        event = _decode(value, offset, timestamp_ms, _default_max_bytes, _default_max_depth, f)
    else:
        event = _decode(value, offset, timestamp_ms, limits.max_bytes, limits.max_depth, f)
    return event, f.sequence_given


def decode_batch(values, offsets, timestamps_ms, limits=DEFAULT_LIMITS):
    """Decode many values; returns the events aligned with the input (None where
    invalid) and ``(index, reason)`` for each invalid one."""
    cdef Py_ssize_t i, n = len(values)
    cdef Py_ssize_t max_bytes = limits.max_bytes
    cdef int64_t max_depth = limits.max_depth
    cdef list events = [None] * n
    cdef list invalid = []
    cdef _Fields f = _Fields.__new__(_Fields)
    if not n == len(offsets) == len(timestamps_ms):
        raise ValueError("values, offsets and timestamps_ms must have the same length")
    for i in range(n):
        try:
            events[i] = _decode(values[i], offsets[i], timestamps_ms[i], max_bytes, max_depth,
                                f)
        except InvalidEvent as exc:
            invalid.append((i, exc.reason))
    return events, invalid
