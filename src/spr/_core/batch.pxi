# The batch (design §4, §5): one flush's rows, collapsed to the newest event per entity,
# kept as C structs (Row, in _core.pxd) whose text lives in one byte arena, with an
# open-addressed index over them and the partitions' next offsets. The invariants are in
# the class docstring. The fused ingest is in ingest.pxi, the COPY encoder in copy.pxi.

cdef Py_ssize_t _ROW_SLACK = 16
cdef int _KEY_BUFFER = 320
cdef Py_ssize_t _MAX_FIELD = 0x7FFFFFFF
cdef Py_ssize_t _ROW_OVERHEAD = _ROW_OVERHEAD_BYTES


cdef int _check_lane(Py_ssize_t lane, Py_ssize_t lanes) except -1:
    if lanes < 1 or not 0 <= lane < lanes:
        raise ValueError(f"lane must be in [0, lanes) with lanes >= 1, got {lane} of {lanes}")
    return 0


@cython.final
cdef class Batch:
    """The rows of one flush, collapsed to the newest event per entity.

    Same contract as ``spr._core_py.Batch``. Invariants: ``rows[i]`` describes row
    ``i``, whose text is in ``arena`` (``rows[i].start`` on); ``slots`` is an
    open-addressed table (size ``mask + 1``, a power of two at least twice the rows)
    of row number + 1 (0 = empty), probed linearly from ``hash & mask``, with
    entity_type and entity_id compared byte for byte on a hash match; ``next_offset``
    holds every partition's next offset except the current one, which is kept in C
    (``current_*``) while events of one partition arrive in a run, and merged in (with
    max) when the partition changes. No Python object is kept per row.
    """

    COPY_FORMAT = "binary"

    def __cinit__(self, columns=STATE_COLUMNS):
        cdef Py_ssize_t i
        self._columns = check_columns(columns)
        self.ncols = len(self._columns)
        for i in range(self.ncols):
            self.codes[i] = STATE_COLUMNS.index(self._columns[i])
        self.topic_names = []
        self.last_topic = None
        self.next_offset = {}
        self.current_topic = None

    def __dealloc__(self):
        PyMem_Free(self.rows_)
        PyMem_Free(self.arena)
        PyMem_Free(self.slots)

    @property
    def columns(self):
        """The staging columns, in COPY order."""
        return self._columns

    @property
    def events_added(self):
        """Events added (``add`` or ``ingest``) since creation or the last ``clear``."""
        return self._events_added

    @property
    def row_count(self):
        """Distinct entities buffered (the rows ``copy_data`` would write)."""
        return self.nrows

    @property
    def nbytes(self):
        """Approximate memory held by the buffered rows, for the memory bound."""
        return self._nbytes

    def __len__(self):
        return self.nrows

    # -- storage ----------------------------------------------------------------------

    cdef int _grow_rows(self) except -1:
        cdef Py_ssize_t size = max(1024, 2 * self.allocated)
        cdef Row *grown = <Row *>PyMem_Realloc(self.rows_, size * sizeof(Row))
        if grown is NULL:
            raise MemoryError()
        self.rows_ = grown
        self.allocated = size
        return 0

    cdef int _grow_slots(self) except -1:
        # Keeps the table at most half full; rehashing uses the stored hashes.
        cdef size_t size = max(<size_t>2048, 2 * (self.mask + 1))
        cdef int32_t *slots = <int32_t *>PyMem_Malloc(size * sizeof(int32_t))
        cdef size_t mask = size - 1, j
        cdef Py_ssize_t row
        if slots is NULL:
            raise MemoryError()
        memset(slots, 0, size * sizeof(int32_t))
        for row in range(self.nrows):
            j = self.rows_[row].hash & mask
            while slots[j] != 0:
                j = (j + 1) & mask
            slots[j] = <int32_t>(row + 1)
        PyMem_Free(self.slots)
        self.slots = slots
        self.mask = mask
        return 0

    cdef char *_reserve(self, Py_ssize_t size) except NULL:
        cdef Py_ssize_t need = self.arena_used + size, grown_size
        cdef char *grown
        if need > self.arena_size:
            grown_size = max(need, max(<Py_ssize_t>65536, 2 * self.arena_size))
            grown = <char *>PyMem_Realloc(self.arena, grown_size)
            if grown is NULL:
                raise MemoryError()
            self.arena = grown
            self.arena_size = grown_size
        self.arena_used = need
        return self.arena + need - size

    cdef inline size_t _find(self, uint64_t h, Text *entity_type, Text *entity_id,
                             Py_ssize_t *row) noexcept:
        # The slot holding the entity (row >= 0), or the empty slot to put it in (-1).
        cdef size_t j = h & self.mask
        cdef int32_t found
        cdef Row *r
        while True:
            found = self.slots[j]
            if found == 0:
                row[0] = -1
                return j
            r = &self.rows_[found - 1]
            if (
                r.hash == h
                and r.type_len == entity_type.size
                and r.id_len == entity_id.size
                and memcmp(self.arena + r.start, entity_type.data, entity_type.size) == 0
                and memcmp(self.arena + r.start + r.type_len, entity_id.data,
                           entity_id.size) == 0
            ):
                row[0] = found - 1
                return j
            j = (j + 1) & self.mask

    cdef int32_t _topic_index(self, str topic) except -1:
        cdef Py_ssize_t i
        if topic is self.last_topic or (
            self.last_topic is not None and topic == <str>self.last_topic
        ):
            return self.last_topic_index
        for i in range(len(self.topic_names)):
            if <str>self.topic_names[i] == topic:
                break
        else:
            i = len(self.topic_names)
            self.topic_names.append(topic)
        self.last_topic = topic
        self.last_topic_index = <int32_t>i
        return <int32_t>i

    cdef inline size_t _locate(self, uint64_t h, Text *entity_type, Text *entity_id,
                               Py_ssize_t *row) except? 0:
        # _find, after making room for one more row (so the slot stays valid for _store).
        if self.slots is NULL or <size_t>(2 * self.nrows + 2) > self.mask + 1:
            self._grow_slots()
        return self._find(h, entity_type, entity_id, row)

    cdef int _store(self, size_t slot, Py_ssize_t row, uint64_t h, Text *entity_type,
                    Text *entity_id, Text *state, Text *event_id, Text *payload,
                    int64_t sequence, int64_t timestamp_ms, str topic, int32_t partition,
                    int64_t offset, const char *partition_key) except -1:
        # ``slot``/``row`` come from _locate. Collapse rule: higher sequence wins, then
        # higher offset. Returns 1 when the row was added or replaced, 0 when the event
        # was older than the buffered one.
        cdef Row *r
        cdef Py_ssize_t size
        cdef char *p
        if (
            entity_type.size > _MAX_FIELD or entity_id.size > _MAX_FIELD
            or state.size > _MAX_FIELD or event_id.size > _MAX_FIELD
            or payload.size > _MAX_FIELD
        ):
            raise OverflowError("a field of the event is over 2 GiB")
        size = entity_type.size + entity_id.size + state.size + event_id.size + payload.size
        if row < 0:
            if self.nrows == self.allocated:
                self._grow_rows()
            row = self.nrows
            r = &self.rows_[row]
            p = self._reserve(size + _ROW_SLACK)
            r.start = p - self.arena
            r.capacity = size + _ROW_SLACK
            r.hash = h
            r.key_known = False
            self.slots[slot] = <int32_t>(row + 1)
            self.nrows += 1
            self._nbytes += _ROW_OVERHEAD + payload.size
        else:
            r = &self.rows_[row]
            if not (sequence > r.sequence or (sequence == r.sequence and offset > r.offset)):
                return 0
            self._nbytes += payload.size - r.payload_len
            if size > r.capacity:
                p = self._reserve(size + _ROW_SLACK)
                r = &self.rows_[row]
                r.start = p - self.arena
                r.capacity = size + _ROW_SLACK
        p = self.arena + r.start
        memcpy(p, entity_type.data, entity_type.size)
        p += entity_type.size
        memcpy(p, entity_id.data, entity_id.size)
        p += entity_id.size
        memcpy(p, state.data, state.size)
        p += state.size
        memcpy(p, event_id.data, event_id.size)
        p += event_id.size
        memcpy(p, payload.data, payload.size)
        r.type_len = <int32_t>entity_type.size
        r.id_len = <int32_t>entity_id.size
        r.state_len = <int32_t>state.size
        r.event_id_len = <int32_t>event_id.size
        r.payload_len = <int32_t>payload.size
        r.sequence = sequence
        r.offset = offset
        r.timestamp_ms = timestamp_ms
        r.partition = partition
        r.topic = self._topic_index(topic)
        if partition_key is not NULL:
            memcpy(r.partition_key, partition_key, 16)
            r.key_known = True
        return 1

    # -- adding -----------------------------------------------------------------------

    def add(self, event, str topic, int32_t partition, int64_t offset):
        """Buffer ``event`` read from ``topic``/``partition`` at ``offset``."""
        cdef Text entity_type, entity_id, state, event_id, payload
        cdef char stack[320]
        cdef char *key = stack
        cdef Py_ssize_t size, row
        cdef size_t slot
        cdef uint64_t h
        cdef int64_t sequence, timestamp_ms
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        entity_type.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_TYPE),
                                                   &entity_type.size)
        entity_id.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_ENTITY_ID), &entity_id.size)
        state.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_STATE), &state.size)
        event_id.data = PyUnicode_AsUTF8AndSize(_slot(event, _EV_EVENT_ID), &event_id.size)
        payload_obj = _slot(event, _EV_PAYLOAD)
        payload.data = PyBytes_AS_STRING(payload_obj)
        payload.size = PyBytes_GET_SIZE(payload_obj)
        size = entity_type.size + 1 + entity_id.size
        if size > _KEY_BUFFER:
            key = <char *>PyMem_Malloc(size)
            if key is NULL:
                raise MemoryError()
        try:
            memcpy(key, entity_type.data, entity_type.size)
            key[entity_type.size] = 58  # ':'
            memcpy(key + entity_type.size + 1, entity_id.data, entity_id.size)
            h = spr_xxh64(<const uint8_t *>key, size)
        finally:
            if key is not stack:
                PyMem_Free(key)
        sequence = _slot(event, _EV_SEQUENCE)
        timestamp_ms = _slot(event, _EV_TIMESTAMP_MS)
        slot = self._locate(h, &entity_type, &entity_id, &row)
        self._store(slot, row, h, &entity_type, &entity_id, &state, &event_id, &payload,
                    sequence, timestamp_ms, topic, partition, offset, NULL)
        self._events_added += 1
        self._advance(topic, partition, offset)

    def advance(self, str topic, int32_t partition, int64_t offset):
        """Mark ``offset`` consumed without a row (a duplicate or a dead letter)."""
        self._advance(topic, partition, offset)

    def ingest(self, messages, IdempotencyRing ring not None, int64_t now_ms,
               assigned=None, limits=DEFAULT_LIMITS, bint check_keys=True,
               partitions=None, on_misrouted=MISROUTED_BY_SEQUENCE):
        """Decode, check, deduplicate and buffer one ``consume()`` result, holding back
        misrouted events as ``on_misrouted`` says; see ``spr._core_py.Batch.ingest`` for
        the rules. Raises only on a bad argument."""
        return _ingest(self, messages, ring, now_ms, assigned, limits, check_keys,
                       partitions, on_misrouted)

    cdef inline int _advance(self, str topic, int32_t partition, int64_t offset) except -1:
        if (
            self.current_topic is not None
            and partition == self.current_partition
            and topic == <str>self.current_topic
        ):
            if offset >= self.current_next:
                self.current_next = offset + 1
            return 0
        self._merge_current()
        self.current_topic = topic
        self.current_partition = partition
        self.current_next = offset + 1
        return 0

    cdef int _merge_current(self) except -1:
        if self.current_topic is None:
            return 0
        key = (self.current_topic, self.current_partition)
        known = self.next_offset.get(key)
        if known is None or <int64_t>known < self.current_next:
            self.next_offset[key] = self.current_next
        return 0

    def next_offsets(self):
        """``(topic, partition) -> highest offset seen + 1``, for the offsets table."""
        self._merge_current()
        return dict(self.next_offset)

    # -- reading ----------------------------------------------------------------------

    def count_rows(self, Py_ssize_t lane=0, Py_ssize_t lanes=1):
        """How many rows belong to ``lane``: their partition % ``lanes`` is ``lane``."""
        cdef Py_ssize_t row, count = 0
        _check_lane(lane, lanes)
        if lanes == 1:
            return self.nrows
        for row in range(self.nrows):
            if self.rows_[row].partition % lanes == lane:
                count += 1
        return count

    def rows(self, Py_ssize_t lane=0, Py_ssize_t lanes=1):
        """The collapsed rows as Python values in ``columns`` order. ``payload`` is the
        JSON text (str); ``event_ts`` an aware UTC datetime, or None when unknown. With
        ``lanes``, only the rows of ``lane`` (see :meth:`count_rows`)."""
        cdef Py_ssize_t row, i
        cdef list result = []
        cdef Row *r
        cdef const char *base
        cdef int64_t ts
        cdef Py_ssize_t at
        _check_lane(lane, lanes)
        for row in range(self.nrows):
            r = &self.rows_[row]
            if lanes > 1 and r.partition % lanes != lane:
                continue
            base = self.arena + r.start
            values = []
            for i in range(self.ncols):
                code = self.codes[i]
                if code == COL_ENTITY_TYPE:
                    values.append(base[:r.type_len].decode("utf-8"))
                elif code == COL_ENTITY_ID:
                    values.append(base[r.type_len:r.type_len + r.id_len].decode("utf-8"))
                elif code == COL_SEQUENCE:
                    values.append(r.sequence)
                elif code == COL_STATE:
                    at = r.type_len + r.id_len
                    values.append(base[at:at + r.state_len].decode("utf-8"))
                elif code == COL_EVENT_ID:
                    at = r.type_len + r.id_len + r.state_len
                    values.append(base[at:at + r.event_id_len].decode("utf-8"))
                elif code == COL_PAYLOAD:
                    at = r.type_len + r.id_len + r.state_len + r.event_id_len
                    values.append(base[at:at + r.payload_len].decode("utf-8"))
                elif code == COL_EVENT_TS:
                    ts = r.timestamp_ms
                    if 0 <= ts <= _MAX_TIMESTAMP_MS:
                        values.append(_UNIX_EPOCH + timedelta(milliseconds=ts))
                    else:
                        values.append(None)
                elif code == COL_KAFKA_TOPIC:
                    values.append(self.topic_names[r.topic])
                elif code == COL_KAFKA_PARTITION:
                    values.append(r.partition)
                else:
                    values.append(r.offset)
            result.append(tuple(values))
        return result

    def copy_data(self, Py_ssize_t lane=0, Py_ssize_t lanes=1):
        """The whole ``COPY ... FROM STDIN (FORMAT binary)`` stream for the rows:
        header, one tuple per row in ``columns`` order, trailer. With ``lanes``, only
        the rows of ``lane`` (see :meth:`count_rows`)."""
        _check_lane(lane, lanes)
        return _render(self, 0, self.nrows, True, True, lane, lanes)

    def copy_chunks(self, Py_ssize_t chunk_bytes=1 << 20, Py_ssize_t lane=0,
                    Py_ssize_t lanes=1):
        """``copy_data(lane, lanes)`` in pieces of about ``chunk_bytes`` (whole rows; a
        row larger than that is a piece of its own): their concatenation is
        ``copy_data(lane, lanes)``. For streaming COPY without holding the whole stream
        in memory at once."""
        cdef Py_ssize_t row = 0, first, size, taken
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        _check_lane(lane, lanes)
        while True:
            first = row
            size = 0
            taken = 0
            while row < self.nrows:
                if lanes == 1 or self.rows_[row].partition % lanes == lane:
                    size += self._row_size(row)
                    if size > chunk_bytes and taken:
                        break
                    taken += 1
                row += 1
            yield _render(self, first, row, first == 0, row == self.nrows, lane, lanes)
            if row == self.nrows:
                return

    cdef Py_ssize_t _row_size(self, Py_ssize_t row) noexcept:
        # About the bytes of one row in the COPY stream, every column counted (only
        # the chunk boundaries depend on it).
        cdef Row *r = &self.rows_[row]
        return (2 + 4 * self.ncols + 29 + r.type_len + r.id_len + r.state_len
                + r.event_id_len + r.payload_len)

    def clear(self):
        """Drop every row, offset and counter; the columns stay."""
        self.nrows = 0
        self.arena_used = 0
        if self.slots is not NULL:
            memset(self.slots, 0, (self.mask + 1) * sizeof(int32_t))
        self.topic_names = []
        self.last_topic = None
        self.next_offset.clear()
        self.current_topic = None
        self._events_added = 0
        self._nbytes = 0
