"""Flush and backpressure policies: frozen, keyword-only, validated when built.

Each policy raises :class:`spr.errors.ConfigError` from its constructor when a value is
out of range, so a bad setting fails before any server is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from spr.errors import ConfigError
from spr.retry import BreakerPolicy

__all__ = ["BackpressurePolicy", "BatchPolicy", "BreakerPolicy", "positive"]


def positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """When a gathered batch is flushed: whichever limit is reached first.

    ``max_rows`` caps the distinct entity rows and ``max_bytes`` the event bytes held by
    one batch; ``max_age_ms`` caps how long the oldest event of a batch may wait, so a
    quiet topic still reaches the database promptly.
    """

    # Under load the engine flushes whatever gathered while the previous flush ran
    # (group commit), so these are caps, not targets. Bigger batches collapse more
    # events into one row (the database's cost is per row): on the 1M-event bench a
    # 5,000-row cap applied 583k rows, a 50,000-row cap 220-460k. Two batches (waiting
    # + in flight) plus the COPY buffer are the engine's own memory: ~16 MB each here.
    max_rows: int = 40_000
    max_bytes: int = 16 * 1024 * 1024
    max_age_ms: int = 200

    def __post_init__(self) -> None:
        positive("batch max_rows", self.max_rows)
        positive("batch max_bytes", self.max_bytes)
        positive("batch max_age_ms", self.max_age_ms)

    @classmethod
    def low_latency(cls) -> BatchPolicy:
        """Small, young batches: each event reaches the database within ~20 ms."""
        return cls(max_rows=500, max_bytes=1024 * 1024, max_age_ms=20)

    @classmethod
    def throughput(cls) -> BatchPolicy:
        """Large batches for bulk catch-up: fewer, bigger transactions."""
        return cls(max_rows=20_000, max_bytes=32 * 1024 * 1024, max_age_ms=1_000)


@dataclass(frozen=True, kw_only=True)
class BackpressurePolicy:
    """When the engine pauses its partitions, and how it resumes without flapping.

    The engine pauses when the flush in flight has run longer than ``slow_flush_ms``
    while the next batch is already waiting, or when the bytes it buffers (the waiting
    batch plus the one being flushed) reach ``memory_bound_bytes``. It resumes only when
    (a) at least the current cool-down has passed since the pause, (b) no flush has been
    running longer than ``slow_flush_ms``, and (c) buffered bytes are at most
    ``resume_ratio`` of the bound (hysteresis). Each time the cool-down expires while
    the sink is still slow, the cool-down doubles, up to ``max_cool_down_ms``; a fast
    flush resets it to ``cool_down_ms``.
    """

    slow_flush_ms: int = 50
    memory_bound_bytes: int = 64 * 1024 * 1024
    cool_down_ms: int = 20
    max_cool_down_ms: int = 1_000
    resume_ratio: float = 0.5

    def __post_init__(self) -> None:
        positive("backpressure slow_flush_ms", self.slow_flush_ms)
        positive("backpressure memory_bound_bytes", self.memory_bound_bytes)
        positive("backpressure cool_down_ms", self.cool_down_ms)
        positive("backpressure max_cool_down_ms", self.max_cool_down_ms)
        if self.max_cool_down_ms < self.cool_down_ms:
            raise ConfigError("backpressure max_cool_down_ms must be at least cool_down_ms")
        if not 0 < self.resume_ratio < 1:
            raise ConfigError(
                f"backpressure resume_ratio must be between 0 and 1, got {self.resume_ratio!r}"
            )
