# confluent_kafka.Message access for Batch.ingest (ingest.pxi): the fields of a C
# Message read straight from its struct. Invariant: a struct offset is read only from a
# message whose type is exactly the probed Message type, after the probe succeeded.

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
