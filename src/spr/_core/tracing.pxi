# Trace contexts in record headers (spr._core_py.tracing): the sampled flag of each
# message's W3C traceparent, read without a Python object for an unsampled event.
# Invariant: a consumed message's header list (librdkafka's rd_kafka_headers_t, held by
# confluent_kafka's Message until headers() converts it) is read only through
# librdkafka's own rd_kafka_header_get_last, found in the library the client loaded, and
# only from a message of the probed Message type whose Python header list is not built
# yet; any other message is read through headers(), with the same results.

ctypedef int (*_header_get_last_t)(
    void *hdrs, const char *name, const void **valuep, size_t *sizep
) noexcept nogil

cdef Py_ssize_t _MSG_HEADERS = 40
cdef Py_ssize_t _MSG_C_HEADERS = 48
cdef _header_get_last_t _header_get_last = NULL
cdef bint _headers_probed = False
cdef object _rdkafka_library = None  # keeps the ctypes handle (and so the symbol) alive

cdef const char *_TRACEPARENT = b"traceparent"
cdef const char *_TRACESTATE = b"tracestate"


cdef bint _probe_headers():
    """Whether consumed messages' C header lists can be read: the Message layout is the
    expected one (headers, then c_headers, then error) and librdkafka's
    rd_kafka_header_get_last was found."""
    global _headers_probed, _header_get_last, _rdkafka_library
    if _headers_probed:
        return _header_get_last != NULL
    _headers_probed = True
    if not _message_probed:
        _probe_message_type()
    if _message_type is None:
        return False
    try:
        import ctypes

        from confluent_kafka import Message
        listed = [("traceparent", b"probe")]
        m = Message(topic="spr-probe", headers=listed)
        if (
            _msg_ptr(m, _MSG_HEADERS) != <PyObject *>listed
            or _msg_ptr(m, _MSG_C_HEADERS) != NULL
            or _MSG_C_HEADERS + 8 != _MSG_ERROR
        ):
            return False
        path = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                # (rpartition: this module is compiled without negative indexing.)
                line = line.rstrip()
                if "librdkafka" in line and line.endswith((".so", ".so.1")):
                    path = line.rpartition(" ")[2]
                    break
        if path is None:
            return False
        library = ctypes.CDLL(path)
        address = ctypes.cast(library.rd_kafka_header_get_last, ctypes.c_void_p).value
    except Exception:  # no /proc, no client, no symbol: read headers() instead
        return False
    if not address:
        return False
    _rdkafka_library = library
    _header_get_last = <_header_get_last_t><uintptr_t>address
    return True


cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if c >= 48 and c <= 57:  # 0-9
        return c - 48
    if c >= 97 and c <= 102:  # a-f
        return c - 87
    return -1


cdef bint _hex_run(const unsigned char *p, Py_ssize_t start, Py_ssize_t end,
                   bint *nonzero) noexcept nogil:
    cdef Py_ssize_t i
    cdef int digit
    for i in range(start, end):
        digit = _hex_value(p[i])
        if digit < 0:
            return False
        if digit:
            nonzero[0] = True
    return True


cdef bint _sampled_c(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef bint nonzero = False
    cdef bint ignored = False
    if n < 55 or p[2] != 45 or p[35] != 45 or p[52] != 45:  # 45: "-"
        return False
    if p[0] == 102 and p[1] == 102:  # version ff
        return False
    if p[0] == 48 and p[1] == 48 and n != 55:  # version 00: exactly four fields
        return False
    if n > 55 and p[55] != 45:
        return False
    if not _hex_run(p, 0, 2, &ignored) or not _hex_run(p, 53, 55, &ignored):
        return False
    if not _hex_run(p, 3, 35, &nonzero) or not nonzero:
        return False
    nonzero = False
    if not _hex_run(p, 36, 52, &nonzero) or not nonzero:
        return False
    return (_hex_value(p[54]) & 1) == 1


cdef object _header_bytes(object value):
    if value is None:
        return None
    if isinstance(value, str):
        return (<str>value).encode("utf-8")
    return bytes(value)


def traceparent_sampled(value):
    """Whether ``value`` is a well-formed W3C ``traceparent`` with the sampled flag set."""
    if value is None:
        return False
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    return _sampled_c(<const unsigned char *>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


cdef object _sampled_from_list(object message, object headers):
    # The methods' path (test doubles, or a header list headers() already built).
    cdef object parent = None
    cdef object state = None
    for key, value in headers:
        if key == "traceparent":
            parent = value
        elif key == "tracestate":
            state = value
    parent = _header_bytes(parent)
    if parent is None or not _sampled_c(
        <const unsigned char *>PyBytes_AS_STRING(parent), PyBytes_GET_SIZE(parent)
    ):
        return None
    return (parent, _header_bytes(state) or None, message.topic(), message.partition(),
            message.offset())


def sampled_traces(messages, Py_ssize_t cap):
    """The sampled trace contexts of ``messages``, in order, at most ``cap`` of them: see
    ``spr._core_py.sampled_traces``."""
    cdef list found = []
    cdef bint direct
    cdef PyObject *listed
    cdef void *c_headers
    cdef const void *value
    cdef size_t size
    cdef const void *state_value
    cdef size_t state_size
    cdef object state
    cdef object entry
    if cap <= 0:
        return found
    direct = _probe_headers()
    message_type = _message_type
    for message in messages:
        if direct and type(message) is message_type:
            listed = _msg_ptr(message, _MSG_HEADERS)
            if listed == NULL:
                c_headers = <void *>_msg_ptr(message, _MSG_C_HEADERS)
                if c_headers == NULL:
                    continue
                if _header_get_last(c_headers, _TRACEPARENT, &value, &size) != 0:
                    continue
                if value == NULL or not _sampled_c(<const unsigned char *>value, <Py_ssize_t>size):
                    continue
                state = None
                if (
                    _header_get_last(c_headers, _TRACESTATE, &state_value, &state_size) == 0
                    and state_value != NULL
                    and state_size > 0
                ):
                    state = PyBytes_FromStringAndSize(<const char *>state_value, state_size)
                found.append((
                    PyBytes_FromStringAndSize(<const char *>value, size),
                    state,
                    _or_none(_msg_ptr(message, _MSG_TOPIC)),
                    _msg_i32(message, _MSG_PARTITION),
                    _msg_i64(message, _MSG_OFFSET),
                ))
                if len(found) >= cap:
                    break
                continue
        headers = message.headers()
        if not headers:
            continue
        entry = _sampled_from_list(message, headers)
        if entry is None:
            continue
        found.append(entry)
        if len(found) >= cap:
            break
    return found
