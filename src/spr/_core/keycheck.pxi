# The key check (design §3) for Batch.ingest: a message's Kafka key must be the
# partition key of its entity's routing key. Invariant: _partition_key_of gives what
# partition_key() gives for the same routing key (barring the XXH64 collision below),
# from the memo, from libcrypto's SHA-256 (once it agreed with hashlib) or hashlib.

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


def check_key(message_key, event):
    """Raise InvalidEvent unless ``message_key`` (bytes, or a str as UTF-8) is the
    partition key of ``event``'s entity; a missing key fails too (design §3). The same
    rule and reasons as ``Batch.ingest``; the twin is ``spr._core_py.keycheck``."""
    cdef str entity_type = event.entity_type
    cdef str entity_id = event.entity_id
    cdef bytes expected = partition_key(f"{entity_type}:{entity_id}").encode("ascii")
    if _key_matches(message_key, PyBytes_AS_STRING(expected)):
        return
    if message_key is None:
        raise InvalidEvent(reason_key_missing(entity_type, entity_id, expected.decode()))
    raise InvalidEvent(reason_key_mismatch(_key_bytes_of(message_key), entity_type, entity_id,
                                           expected.decode()))
