"""The idempotency ring (design §1): recent fingerprints in fixed memory, with a TTL.

Twin of ``src/spr/_core/ring.pxi``; the invariants are in the class docstring. Time
enters only as ``now_ms`` arguments; nothing blocks.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from spr._core_py.ints import _INT64_MAX, _check_int64
from spr.errors import ConfigError

_MASK64 = 0xFFFFFFFFFFFFFFFF


# Slots examined per lookup: a fingerprint lives in one of the PROBE_WINDOW slots that
# follow its home slot (wrapping around the end of the table).
PROBE_WINDOW = 8
# Fingerprint 0 marks an empty slot, so a real 0 is stored as this constant instead
# (the two then collide, which is one more 2**-64 chance, like any other pair).
ZERO_FINGERPRINT_SUBSTITUTE = 0x9E3779B97F4A7C15


def _home_slot(fp: int, capacity: int) -> int:
    # murmur3's 64-bit finalizer spreads small or patterned fingerprints over the table;
    # the multiply-shift maps the mixed value onto [0, capacity) without a division.
    fp ^= fp >> 33
    fp = (fp * 0xFF51AFD7ED558CCD) & _MASK64
    fp ^= fp >> 33
    fp = (fp * 0xC4CEB9FE1A85EC53) & _MASK64
    fp ^= fp >> 33
    return (fp * capacity) >> 64


def _check_fingerprint(fp: int) -> int:
    if not 0 <= fp <= _MASK64:
        raise OverflowError(f"fingerprint must be an unsigned 64-bit int, got {fp}")
    return fp or ZERO_FINGERPRINT_SUBSTITUTE


class IdempotencyRing:
    """A fixed-size window of recently seen event fingerprints, with a time to live.

    The table is open-addressed: ``capacity`` slots, each a 64-bit fingerprint and the
    ``now_ms`` at which it was added (16 bytes a slot, allocated once). A fingerprint
    lives in one of the ``PROBE_WINDOW`` slots from its home slot on, so an operation
    touches at most that many slots and never allocates.

    An entry is live while ``|now_ms - added_ms| < ttl_ms``. The window is symmetric so
    that a clock stepping back a little keeps recent entries, while one stepping far
    (either way) expires them: no entry outlives ``ttl_ms`` of distance from the clock,
    so nothing becomes immortal.

    When every slot of the window holds a live entry, the entry with the smallest added
    time is overwritten (an *eviction*). The ring may therefore forget a fingerprint
    early, letting a duplicate through (the database's sequence guard still stops it);
    it never reports a fingerprint it was not given, except by a 64-bit collision.
    A hit does not refresh an entry's time. Not thread-safe.
    """

    __slots__ = (
        "_capacity",
        "_evictions",
        "_fingerprints",
        "_hits",
        "_last_now_ms",
        "_lookups",
        "_times",
        "_ttl_ms",
        "_window",
    )

    def __init__(self, capacity: int, ttl_ms: int) -> None:
        if not 0 < capacity <= 2**40:
            raise ConfigError(f"ring capacity must be between 1 and 2**40, got {capacity}")
        if not 0 < ttl_ms <= _INT64_MAX:
            raise ConfigError(f"ring ttl_ms must be a positive 64-bit int, got {ttl_ms}")
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self._window = min(PROBE_WINDOW, capacity)
        self._fingerprints = array("Q", bytes(8 * capacity))
        self._times = array("q", bytes(8 * capacity))
        self._lookups = 0
        self._hits = 0
        self._evictions = 0
        self._last_now_ms = 0

    @property
    def capacity(self) -> int:
        """Number of slots (the most fingerprints the ring can hold)."""
        return self._capacity

    @property
    def ttl_ms(self) -> int:
        """How long an entry stays live, in milliseconds of distance from ``now_ms``."""
        return self._ttl_ms

    @property
    def lookups(self) -> int:
        """Number of ``seen_or_add`` operations (single or batched) since creation."""
        return self._lookups

    @property
    def hits(self) -> int:
        """How many of those lookups found a live entry (reported a duplicate)."""
        return self._hits

    @property
    def evictions(self) -> int:
        """How many live entries were overwritten because their probe window was full."""
        return self._evictions

    def __len__(self) -> int:
        """Live entries as of the latest ``now_ms`` given; O(capacity)."""
        now = self._last_now_ms
        ttl = self._ttl_ms
        return sum(
            1
            for fp, t in zip(self._fingerprints, self._times, strict=True)
            if fp and abs(now - t) < ttl
        )

    def clear(self) -> None:
        """Forget every entry (the counters stay); use after a rolled-back flush."""
        capacity = self._capacity
        self._fingerprints = array("Q", bytes(8 * capacity))
        self._times = array("q", bytes(8 * capacity))

    def seen_or_add(self, fingerprint: int, now_ms: int) -> bool:
        """True if ``fingerprint`` is live in the ring; otherwise add it and return False."""
        fp = _check_fingerprint(fingerprint)
        _check_int64(now_ms, "now_ms")
        return self._seen_or_add(fp, now_ms)

    def seen_or_add_many(self, fingerprints: Iterable[int], now_ms: int) -> list[bool]:
        """``seen_or_add`` for each fingerprint in order (a list of ints or a uint64
        buffer such as ``array('Q')``), all at the same ``now_ms``."""
        _check_int64(now_ms, "now_ms")
        if isinstance(fingerprints, memoryview | bytes | bytearray):
            fingerprints = memoryview(fingerprints).cast("B").cast("Q")
        return [self._seen_or_add(_check_fingerprint(fp), now_ms) for fp in fingerprints]

    def _seen_or_add(self, fp: int, now: int) -> bool:
        self._lookups += 1
        self._last_now_ms = now
        found = self._find_or_insert(fp, now)[1]
        if found:
            self._hits += 1
        return found

    def _find_or_insert(self, fp: int, now: int) -> tuple[int, bool]:
        # The slot holding fp live (True), or the slot fp was just stored in (False).
        fps = self._fingerprints
        times = self._times
        ttl = self._ttl_ms
        capacity = self._capacity
        slot = _home_slot(fp, capacity)
        victim = -1
        victim_kind = 3  # 0 empty, 1 expired, 2 oldest live, 3 none yet
        victim_time = 0
        for _ in range(self._window):
            stored = fps[slot]
            if stored == 0:
                if victim_kind > 1:
                    victim = slot
                    victim_kind = 0
                break
            t = times[slot]
            live = abs(now - t) < ttl
            if stored == fp:
                if live:
                    return slot, True
                # Reuse the expired copy, so that a fingerprint has one slot at most.
                victim = slot
                victim_kind = 1
                break
            if live:
                if victim_kind == 3 or (victim_kind == 2 and t < victim_time):
                    victim = slot
                    victim_kind = 2
                    victim_time = t
            elif victim_kind > 1:
                victim = slot
                victim_kind = 1
            slot += 1
            if slot == capacity:
                slot = 0
        if victim_kind == 2:
            self._evictions += 1
        fps[victim] = fp
        times[victim] = now
        return victim, False


class SourceTable(IdempotencyRing):
    """Which source partition an entity's events without a sequence came from, in fixed
    memory with a time to live (the ring's table, with a 64-bit value per slot).

    An event without a sequence takes its source offset as its sequence (design §2):
    that orders it against the entity's other events from the *same* partition only.
    :meth:`claim` records the source of an entity's first such event and answers for
    the next ones: another source means the event cannot be ordered. Like the ring it
    may forget (an eviction, an expired entry); then the next event claims the entity
    afresh. A claim does not refresh an entry's time. Not thread-safe.
    """

    __slots__ = ("_sources",)

    def __init__(self, capacity: int, ttl_ms: int) -> None:
        super().__init__(capacity, ttl_ms)
        self._sources = array("Q", bytes(8 * capacity))

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        super().clear()
        self._sources = array("Q", bytes(8 * self._capacity))

    def claim(self, entity: int, source: int, now_ms: int) -> int:
        """0 when ``entity`` (a fingerprint) has no live claim or is claimed by
        ``source`` (both unsigned 64-bit, ``source`` non-zero): ``source`` then holds
        it; otherwise the other source that holds it."""
        fp = _check_fingerprint(entity)
        _check_int64(now_ms, "now_ms")
        if not 0 < source <= _MASK64:
            raise OverflowError(f"source must be a non-zero unsigned 64-bit int, got {source}")
        self._lookups += 1
        self._last_now_ms = now_ms
        slot, found = self._find_or_insert(fp, now_ms)
        if not found:
            self._sources[slot] = source
            return 0
        self._hits += 1
        held = int(self._sources[slot])
        return 0 if held == source else held
