# Fingerprints (design §1): XXH64 (seed 0) of an idempotency key, as the ring stores it.
# Invariant: equal to xxhash.xxh64_intdigest of the key's UTF-8 (spr_xxh64 is declared
# in _core.pxd, because the batch's entity index hashes with it too).

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
