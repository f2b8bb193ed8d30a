# The idempotency ring (design §1): a fixed-memory, open-addressed table of recent
# fingerprints with a time to live; and SourceTable (design §10), the same table with a
# value per slot. Their layout (RingSlot, the typed fields) is declared in _core.pxd;
# the invariants are in the class docstrings below. Time enters only as now_ms
# arguments.

cdef extern from *:
    """
    /* murmur3's finalizer, then multiply-shift onto [0, capacity). */
    static inline size_t spr_home_slot(uint64_t fp, uint64_t capacity) {
        fp ^= fp >> 33; fp *= 0xff51afd7ed558ccdULL;
        fp ^= fp >> 33; fp *= 0xc4ceb9fe1a85ec53ULL;
        fp ^= fp >> 33;
        return (size_t)(((unsigned __int128)fp * capacity) >> 64);
    }
    static inline void spr_prefetch(const void *p) { __builtin_prefetch(p, 1, 1); }
    """
    size_t spr_home_slot(uint64_t fp, uint64_t capacity) nogil
    void spr_prefetch(const void *p) nogil


cdef Py_ssize_t _PROBE = PROBE_WINDOW
cdef Py_ssize_t _PREFETCH_AHEAD = 12  # at most 16, the size of the homes buffer


cdef class IdempotencyRing:
    """A fixed-size window of recently seen event fingerprints, with a time to live.

    Same contract as ``spr._core_py.IdempotencyRing``. Invariants: ``slots`` holds
    ``capacity`` 16-byte slots allocated once; a fingerprint is stored only within
    ``window`` slots of its home slot; slots become empty only through ``clear``, so a
    probe can stop at the first empty slot; stored fingerprints are never 0, and a
    fingerprint occupies one slot at most (an expired copy is reused, not duplicated).
    """

    def __cinit__(self, capacity, ttl_ms):
        if not 0 < capacity <= 2**40:
            raise ConfigError(f"ring capacity must be between 1 and 2**40, got {capacity}")
        if not 0 < ttl_ms <= 2**63 - 1:
            raise ConfigError(f"ring ttl_ms must be a positive 64-bit int, got {ttl_ms}")
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self.window = min(_PROBE, self._capacity)
        self.slots = <RingSlot *>calloc(self._capacity, sizeof(RingSlot))
        if self.slots is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)

    @property
    def capacity(self):
        """Number of slots (the most fingerprints the ring can hold)."""
        return self._capacity

    @property
    def ttl_ms(self):
        """How long an entry stays live, in milliseconds of distance from ``now_ms``."""
        return self._ttl_ms

    @property
    def lookups(self):
        """Number of ``seen_or_add`` operations (single or batched) since creation."""
        return self._lookups

    @property
    def hits(self):
        """How many of those lookups found a live entry (reported a duplicate)."""
        return self._hits

    @property
    def evictions(self):
        """How many live entries were overwritten because their probe window was full."""
        return self._evictions

    def __len__(self):
        cdef size_t i
        cdef Py_ssize_t live = 0
        for i in range(self._capacity):
            if self.slots[i].fingerprint != 0 and _live(
                self.slots[i].added_ms, self.last_now_ms, self._ttl_ms
            ):
                live += 1
        return live

    def clear(self):
        """Forget every entry (the counters stay); use after a rolled-back flush."""
        memset(self.slots, 0, self._capacity * sizeof(RingSlot))

    def seen_or_add(self, uint64_t fingerprint, int64_t now_ms):
        """True if ``fingerprint`` is live in the ring; otherwise add it and return False."""
        return self._seen_or_add(fingerprint, now_ms)

    def seen_or_add_many(self, fingerprints, int64_t now_ms):
        """``seen_or_add`` for each fingerprint in order (a list of ints or a uint64
        buffer such as ``array('Q')``), all at the same ``now_ms``."""
        cdef const uint64_t[::1] view
        cdef Py_ssize_t i, n
        cdef size_t home
        cdef size_t homes[16]
        cdef list result
        cdef uint64_t fp
        if isinstance(fingerprints, (memoryview, bytes, bytearray)):
            fingerprints = memoryview(fingerprints).cast("B").cast("Q")
        if not isinstance(fingerprints, (list, tuple)) and _has_buffer(fingerprints):
            view = fingerprints
            n = view.shape[0]
            result = [False] * n
            # Home slots are computed _PREFETCH_AHEAD elements early, kept in a small
            # circular buffer, and their cache lines prefetched in the meantime.
            for i in range(min(n, _PREFETCH_AHEAD)):
                homes[i] = self._prefetch(view[i])
            for i in range(n):
                home = homes[i & 15]
                if i + _PREFETCH_AHEAD < n:
                    homes[(i + _PREFETCH_AHEAD) & 15] = self._prefetch(view[i + _PREFETCH_AHEAD])
                if self._seen_or_add_at(view[i], home, now_ms):
                    result[i] = True
            return result
        result = []
        for item in fingerprints:
            fp = item
            result.append(self._seen_or_add(fp, now_ms))
        return result

    cdef inline size_t _prefetch(self, uint64_t fp) noexcept:
        # The probe window spans up to three cache lines: ask for all of them.
        cdef size_t home = spr_home_slot(fp or _ZERO_SUBSTITUTE, self._capacity)
        cdef size_t last = self._capacity - 1
        spr_prefetch(&self.slots[home])
        spr_prefetch(&self.slots[min(home + 4, last)])
        spr_prefetch(&self.slots[min(home + self.window - 1, last)])
        return home

    cdef inline bint _seen_or_add(self, uint64_t fp, int64_t now) noexcept:
        return self._seen_or_add_at(
            fp, spr_home_slot(fp or _ZERO_SUBSTITUTE, self._capacity), now
        )

    cdef inline bint _seen_or_add_at(self, uint64_t fp, size_t slot, int64_t now) noexcept:
        cdef bint found
        self._lookups += 1
        self.last_now_ms = now
        self._find_or_insert(fp, slot, now, &found)
        if found:
            self._hits += 1
        return found

    cdef inline RingSlot *_find_or_insert(self, uint64_t fp, size_t slot, int64_t now,
                                          bint *found) noexcept:
        # The slot holding fp live (found), or the slot fp was just stored in, probing
        # from its home ``slot``. Counts evictions; the callers count lookups and hits.
        cdef RingSlot *s
        cdef RingSlot *victim = NULL
        cdef int victim_kind = 3  # 0 empty, 1 expired, 2 oldest live, 3 none yet
        cdef int64_t victim_time = 0
        cdef bint live
        if fp == 0:
            fp = _ZERO_SUBSTITUTE
        for _ in range(self.window):
            s = &self.slots[slot]
            if s.fingerprint == 0:
                if victim_kind > 1:
                    victim = s
                    victim_kind = 0
                break
            live = _live(s.added_ms, now, self._ttl_ms)
            if s.fingerprint == fp:
                if live:
                    found[0] = True
                    return s
                # Reuse the expired copy, so that a fingerprint has one slot at most.
                victim = s
                victim_kind = 1
                break
            if live:
                if victim_kind == 3 or (victim_kind == 2 and s.added_ms < victim_time):
                    victim = s
                    victim_kind = 2
                    victim_time = s.added_ms
            elif victim_kind > 1:
                victim = s
                victim_kind = 1
            slot += 1
            if slot == self._capacity:
                slot = 0
        if victim_kind == 2:
            self._evictions += 1
        victim.fingerprint = fp
        victim.added_ms = now
        found[0] = False
        return victim


cdef object _MASK64 = 0xFFFFFFFFFFFFFFFF
cdef object _INT64_MIN = -(2**63)
cdef object _INT64_MAX = 2**63 - 1


@cython.final
cdef class SourceTable(IdempotencyRing):
    """Which source partition an entity's events without a sequence came from, in fixed
    memory with a time to live (the ring's table, with a 64-bit value per slot).

    Same contract as ``spr._core_py.SourceTable``. Invariants: those of the ring, whose
    probe (``_find_or_insert``) it shares; ``sources`` holds ``capacity`` values,
    ``sources[i]`` belonging to ``slots[i]`` and written when a claim stores a
    fingerprint there (so a slot filled by ``seen_or_add`` keeps a stale value, as in
    the twin: the two uses are not meant to be mixed on one table).
    """

    def __cinit__(self, capacity, ttl_ms):
        # IdempotencyRing.__cinit__ has checked the arguments and allocated the slots.
        self.sources = <uint64_t *>calloc(self._capacity, sizeof(uint64_t))
        if self.sources is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.sources)

    def clear(self):
        """Forget every entry (the counters stay)."""
        memset(self.slots, 0, self._capacity * sizeof(RingSlot))
        memset(self.sources, 0, self._capacity * sizeof(uint64_t))

    def claim(self, entity, source, now_ms):
        """0 when ``entity`` (a fingerprint) has no live claim or is claimed by
        ``source`` (both unsigned 64-bit, ``source`` non-zero): ``source`` then holds
        it; otherwise the other source that holds it."""
        if not 0 <= entity <= _MASK64:
            raise OverflowError(f"fingerprint must be an unsigned 64-bit int, got {entity}")
        if not _INT64_MIN <= now_ms <= _INT64_MAX:
            raise OverflowError(f"now_ms must fit in a signed 64-bit int, got {now_ms}")
        if not 0 < source <= _MASK64:
            raise OverflowError(f"source must be a non-zero unsigned 64-bit int, got {source}")
        return self._claim(entity, source, now_ms)

    cdef inline uint64_t _claim(self, uint64_t fp, uint64_t source, int64_t now) noexcept:
        cdef bint found
        cdef RingSlot *s
        cdef uint64_t held
        self._lookups += 1
        self.last_now_ms = now
        # Through the base type: Cython calls an inherited final method by vtable.
        s = (<IdempotencyRing>self)._find_or_insert(
            fp, spr_home_slot(fp or _ZERO_SUBSTITUTE, self._capacity), now, &found
        )
        if not found:
            self.sources[s - self.slots] = source
            return 0
        self._hits += 1
        held = self.sources[s - self.slots]
        return 0 if held == source else held


cdef inline bint _live(int64_t added, int64_t now, int64_t ttl) noexcept nogil:
    # |now - added| < ttl without signed overflow.
    cdef uint64_t distance
    if now >= added:
        distance = <uint64_t>now - <uint64_t>added
    else:
        distance = <uint64_t>added - <uint64_t>now
    return distance < <uint64_t>ttl


cdef inline bint _has_buffer(object obj):
    return PyObject_CheckBuffer(obj)


cdef extern from "Python.h":
    bint PyObject_CheckBuffer(object obj)
