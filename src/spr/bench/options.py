"""What one ``spr bench`` run does: the contenders, and the validated options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spr.errors import ConfigError

__all__ = [
    "CONTENDERS",
    "LIVE_CONTENDERS",
    "LIVE_ONLY",
    "SCENARIOS",
    "SKIPPABLE",
    "BenchOptions",
    "Progress",
]

#: Contenders in the order they run and appear in the report.
CONTENDERS = ("raw_consume", "spr", "copy_merge", "plain_merge", "arroyo", "quix", "antipattern")
#: Names accepted by ``--skip`` (``ceilings`` means every ceiling, ``quix`` and
#: ``latency`` apply to both scenarios).
SKIPPABLE = (
    "raw_consume",
    "copy_merge",
    "plain_merge",
    "consume_produce",
    "ceilings",
    "arroyo",
    "quix",
    "antipattern",
    "latency",
)
#: ``backlog``: spr run against the alternatives on a backlog that collapses (many
#: events per entity); ``live``: one event per entity, nothing to collapse, against the
#: ceilings only; ``latency``: a steady rate, append -> commit percentiles (as
#: ``--rate``); ``state`` (the default): ``backlog`` then ``latency``; ``transform``:
#: spr transform against its ceiling and Quix's exactly-once mode; ``soak``: a steady
#: rate for ``soak_seconds`` with spr's RSS sampled over time (not part of ``all``: it
#: takes 30 minutes by default); ``all``: every other one.
SCENARIOS = ("state", "backlog", "live", "latency", "transform", "soak", "all")
#: The contenders of the ``live`` scenario: spr and its own ceilings on the same rows,
#: with the textbook merge (``plain_merge``) that spr's database side is measured against.
LIVE_CONTENDERS = ("raw_consume", "spr", "copy_merge", "plain_merge")
#: Contenders of the ``live`` scenario only.
LIVE_ONLY = ("plain_merge",)

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What to run. Frozen and validated on construction (raises ConfigError).

    ``latency_only`` runs just the latency mode at ``latency_rate`` events/s for
    ``latency_seconds`` (``spr bench --rate R``); otherwise the full comparison runs,
    followed by the latency phase unless ``"latency"`` is in ``skip``. ``scenario``
    chooses what is compared (:data:`SCENARIOS`).
    """

    bootstrap: str
    dsn: str
    events: int = 1_000_000
    entities: int = 100_000
    partitions: int = 12
    duplicates: float = 0.05
    stale: float = 0.02
    value_size: int = 200
    seed: int = 0
    workers: int = 1
    flush_connections: int | None = None  # None: spr run's default
    skip: frozenset[str] = frozenset()
    latency_only: bool = False
    latency_rate: float = 10_000.0
    latency_seconds: float = 10.0
    antipattern_events: int = 10_000
    batch_max_rows: int | None = None
    batch_max_age_ms: int | None = None
    keep: bool = False
    contender_timeout_s: float | None = None
    quix_build_timeout_s: float = 600.0
    scenario: str = "state"
    soak_seconds: float = 1800.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "events",
            "entities",
            "partitions",
            "workers",
            "flush_connections",
            "antipattern_events",
        ):
            value = getattr(self, name)
            if name == "flush_connections" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.latency_rate <= 0 or self.latency_seconds <= 0 or self.soak_seconds <= 0:
            raise ConfigError(
                "the latency rate and the latency and soak durations must be positive"
            )
        unknown = set(self.skip) - set(SKIPPABLE)
        if unknown:
            raise ConfigError(
                f"cannot skip {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}"
            )
        if self.scenario not in SCENARIOS:
            raise ConfigError(
                f"unknown scenario {self.scenario!r}; choose from {', '.join(SCENARIOS)}"
            )
        for name in ("batch_max_rows", "batch_max_age_ms"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")

    def skips(self, name: str) -> bool:
        if name in self.skip:
            return True
        ceilings = ("raw_consume", "copy_merge", "plain_merge", "consume_produce")
        return name in ceilings and "ceilings" in self.skip

    @property
    def runs_backlog(self) -> bool:
        return self.scenario in ("state", "backlog", "all") and not self.latency_only

    @property
    def runs_live(self) -> bool:
        return self.scenario in ("live", "all") and not self.latency_only

    @property
    def runs_latency(self) -> bool:
        if self.latency_only or self.scenario == "latency":
            return True
        return self.scenario in ("state", "all") and not self.skips("latency")

    @property
    def runs_soak(self) -> bool:
        return self.scenario == "soak" and not self.latency_only

    @property
    def runs_state(self) -> bool:
        """Any scenario of ``spr run`` (they need the database)."""
        return self.runs_backlog or self.runs_live or self.runs_latency or self.runs_soak

    @property
    def runs_transform(self) -> bool:
        return self.scenario in ("transform", "all")

    @property
    def batch(self) -> dict[str, int]:
        batch: dict[str, int] = {}
        if self.batch_max_rows is not None:
            batch["max_rows"] = self.batch_max_rows
        if self.batch_max_age_ms is not None:
            batch["max_age_ms"] = self.batch_max_age_ms
        return batch

    @property
    def max_rows(self) -> int:
        from spr.config import BatchPolicy

        return self.batch_max_rows or BatchPolicy().max_rows


# ------------------------------------------------------------------------ processes
