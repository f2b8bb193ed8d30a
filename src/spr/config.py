"""Configuration of the consumer engine: frozen, keyword-only, validated when built.

Every policy here is a frozen dataclass that raises :class:`spr.errors.ConfigError` from
its constructor when a value is out of range, so a bad setting fails before any server
is touched. Settings are layered, later layers winning: the dataclass defaults, a TOML
file, ``SPR_*`` environment variables, then command-line flags (:func:`load_engine_config`).

Kafka client settings are merged in exactly one place, :func:`merge_kafka_config`, where
the user's keys always win over spr's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from spr._event import COLUMN_TYPES, STATE_COLUMNS
from spr.devstack import DEFAULT_BOOTSTRAP, DEFAULT_DSN
from spr.errors import ConfigError
from spr.retry import BreakerPolicy, RetryPolicy

__all__ = [
    "CONSUMER_DEFAULTS",
    "DEFAULT_MAPPING",
    "ORDERS_MAPPING",
    "BackpressurePolicy",
    "BatchPolicy",
    "BreakerPolicy",
    "EngineConfig",
    "TableMapping",
    "load_engine_config",
    "load_table_config",
    "merge_kafka_config",
    "uses_consumer_protocol",
    "uses_cooperative_rebalance",
]


def _positive(name: str, value: float) -> None:
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
        _positive("batch max_rows", self.max_rows)
        _positive("batch max_bytes", self.max_bytes)
        _positive("batch max_age_ms", self.max_age_ms)

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
        _positive("backpressure slow_flush_ms", self.slow_flush_ms)
        _positive("backpressure memory_bound_bytes", self.memory_bound_bytes)
        _positive("backpressure cool_down_ms", self.cool_down_ms)
        _positive("backpressure max_cool_down_ms", self.max_cool_down_ms)
        if self.max_cool_down_ms < self.cool_down_ms:
            raise ConfigError("backpressure max_cool_down_ms must be at least cool_down_ms")
        if not 0 < self.resume_ratio < 1:
            raise ConfigError(
                f"backpressure resume_ratio must be between 0 and 1, got {self.resume_ratio!r}"
            )


_DEFAULT_COLUMNS: tuple[tuple[str, str], ...] = tuple((c, c) for c in STATE_COLUMNS)


@dataclass(frozen=True, kw_only=True)
class TableMapping:
    """Where and how events land in PostgreSQL.

    ``columns`` pairs each target column with the canonical field that fills it (one of
    :data:`spr.batch.STATE_COLUMNS`). ``key`` names the target columns of the table's
    primary key or unique constraint (the ``ON CONFLICT`` target). ``sequence_column``
    is the target column of the sequence guard: a row is only ever replaced by an event
    with a strictly higher sequence, which is what makes replays, republished duplicates
    and a stale owner's late batch harmless. A mapping therefore must carry a sequence
    column; ``spr db init`` adds one to an existing user table that lacks it (rows that
    predate spr have NULL there and are replaced by the first event). ``now_columns``
    are set to ``now()`` on every insert and update (``processed_at``).

    When ``key`` does not hold the entity's whole identity (``entity_type`` and
    ``entity_id``), the sink collapses each key to its newest sequence in SQL as well,
    because two entity types may then share a key within one batch.
    """

    table: str = "spr_entity_state"
    schema: str | None = None
    columns: tuple[tuple[str, str], ...] = _DEFAULT_COLUMNS
    key: tuple[str, ...] = ("entity_type", "entity_id")
    sequence_column: str = "sequence"
    now_columns: tuple[str, ...] = ("processed_at",)
    offsets_table: str = "spr_offsets"

    def __post_init__(self) -> None:
        if not self.table or not self.offsets_table:
            raise ConfigError("table names must not be empty")
        if self.table == self.offsets_table:
            raise ConfigError("the state table and the offsets table must differ")
        targets = [target for target, _ in self.columns]
        if len(set(targets)) != len(targets):
            raise ConfigError(f"table {self.table}: a target column is mapped twice")
        sources = dict(self.columns)
        for target, source in self.columns:
            if not target:
                raise ConfigError(f"table {self.table}: empty column name")
            if source not in COLUMN_TYPES:
                raise ConfigError(
                    f"table {self.table}: column {target} maps from unknown field "
                    f"{source!r}; fields are {', '.join(STATE_COLUMNS)}"
                )
        if not self.key:
            raise ConfigError(f"table {self.table}: the key must name at least one column")
        for column in self.key:
            if column not in sources:
                raise ConfigError(f"table {self.table}: key column {column} is not mapped")
        if sources.get(self.sequence_column) != "sequence":
            raise ConfigError(
                f"table {self.table}: the sequence guard needs column "
                f"{self.sequence_column} mapped from field 'sequence'"
            )
        for column in self.now_columns:
            if column in sources:
                raise ConfigError(
                    f"table {self.table}: column {column} is both mapped and set to now()"
                )
        if "entity_id" not in {sources[c] for c in self.key}:
            raise ConfigError(f"table {self.table}: the key must include the entity_id field")

    @property
    def gaps_table(self) -> str:
        """Where skipped retention gaps are recorded: ``<offsets_table>_gaps``."""
        return f"{self.offsets_table}_gaps"

    @property
    def key_is_entity(self) -> bool:
        """True when the key holds both entity_type and entity_id (no SQL collapse needed)."""
        key_sources = {dict(self.columns)[c] for c in self.key}
        return {"entity_type", "entity_id"} <= key_sources

    def column_type(self, target: str) -> str:
        """PostgreSQL type of a mapped target column (the type of its source field)."""
        return COLUMN_TYPES[dict(self.columns)[target]]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TableMapping:
        """Build from a TOML ``[table]`` section; ``preset = "orders"`` starts from a preset.

        ``columns`` is a table of ``target = "field"`` pairs; ``name`` sets the table.
        """
        data = dict(data)
        base = DEFAULT_MAPPING
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in _PRESETS:
                raise ConfigError(f"unknown table preset {preset!r}; known: {', '.join(_PRESETS)}")
            base = _PRESETS[preset]
        changes: dict[str, Any] = {}
        if "name" in data:
            changes["table"] = data.pop("name")
        for name in ("table", "schema", "sequence_column", "offsets_table"):
            if name in data:
                changes[name] = data.pop(name)
        if "columns" in data:
            columns = data.pop("columns")
            if not isinstance(columns, Mapping):
                raise ConfigError('table columns must be a table of target = "field" pairs')
            changes["columns"] = tuple((str(k), str(v)) for k, v in columns.items())
        for name in ("key", "now_columns"):
            if name in data:
                value = data.pop(name)
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ConfigError(f"table {name} must be a list of column names")
                changes[name] = tuple(str(v) for v in value)
        if data:
            raise ConfigError(f"unknown key(s) in [table]: {', '.join(sorted(data))}")
        return replace(base, **changes)


DEFAULT_MAPPING = TableMapping()

#: The field report's table: ``orders(order_id, status, payload, processed_at)`` plus the
#: ``sequence`` column the guard needs (added by ``spr db init`` when missing).
ORDERS_MAPPING = TableMapping(
    table="orders",
    columns=(
        ("order_id", "entity_id"),
        ("status", "state"),
        ("payload", "payload"),
        ("sequence", "sequence"),
    ),
    key=("order_id",),
    sequence_column="sequence",
    now_columns=("processed_at",),
)

_PRESETS: dict[str, TableMapping] = {"default": DEFAULT_MAPPING, "orders": ORDERS_MAPPING}


#: spr's librdkafka consumer defaults (design §4). ``merge_kafka_config`` lets user keys
#: override any of them.
CONSUMER_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "partition.assignment.strategy": "cooperative-sticky",
        "auto.offset.reset": "earliest",
        # Prefetch memory: librdkafka keeps whole fetch responses alive while any of
        # their messages is queued, so these three bound the consumer's RSS. Measured
        # on the bench topic: 8 MB queue + 4 MB fetches peak at 84 MB RSS for a bare
        # consumer vs 136 MB with 32 MB + 10 MB, at the same rate; the whole engine
        # (1M events) peaks at 161 MB with 4 MB + 2 MB vs 192 MB with 8 MB + 4 MB, just
        # as fast (4 MB is ~80 ms of events at 200k/s, and the fetcher refills it in
        # 10 ms steps; a message larger than a fetch still comes, per KIP-74).
        "fetch.max.bytes": "2097152",
        "max.partition.fetch.bytes": "524288",
        # librdkafka's 1 s default stalls any consumer slower than its fetcher.
        "fetch.queue.backoff.ms": "10",
        "queued.max.messages.kbytes": "4096",
        "session.timeout.ms": "10000",
        "heartbeat.interval.ms": "2000",
        "max.poll.interval.ms": "60000",
        "enable.partition.eof": "false",
    }
)

# Settings the KIP-848 consumer protocol moves to the broker; librdkafka rejects them.
_CLASSIC_ONLY = ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms")


def merge_kafka_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge librdkafka settings: every key in ``overrides`` wins over ``defaults``.

    When the result selects the KIP-848 consumer protocol (``group.protocol=consumer``),
    the classic-protocol keys that came only from ``defaults`` are dropped, because the
    broker owns them there and librdkafka refuses them; keys the user set are kept.
    Never raises; never mutates its arguments.
    """
    merged = dict(defaults)
    merged.update(overrides)
    if uses_consumer_protocol(merged):
        for key in _CLASSIC_ONLY:
            if key not in overrides:
                merged.pop(key, None)
    return merged


def uses_consumer_protocol(conf: Mapping[str, Any]) -> bool:
    """True when the configuration selects the KIP-848 ``consumer`` group protocol."""
    return str(conf.get("group.protocol", "classic")).strip().lower() == "consumer"


def uses_cooperative_rebalance(conf: Mapping[str, Any]) -> bool:
    """True when rebalances hand out incremental deltas instead of the whole assignment.

    The consumer protocol is always incremental. The classic protocol is only when every
    configured assignor is ``cooperative-sticky`` (a mixed list rebalances eagerly).
    """
    if uses_consumer_protocol(conf):
        return True
    strategies = [
        s.strip().lower()
        for s in str(conf.get("partition.assignment.strategy", "range,roundrobin")).split(",")
        if s.strip()
    ]
    return bool(strategies) and all(s == "cooperative-sticky" for s in strategies)


_ON_OFFSET_GAP = ("fail", "earliest", "latest")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything one engine process needs; validated when built.

    ``kafka`` holds the user's librdkafka overrides only; :meth:`consumer_config` merges
    them over :data:`CONSUMER_DEFAULTS`. ``revoke_budget_ms`` defaults to a fifth of
    ``max.poll.interval.ms``. ``flush_retry_s`` bounds how long one flush is retried on
    transient database errors before the engine stops (:attr:`retry_policy`);
    ``breaker`` says when the circuit breaker opens (all partitions paused) and probes.

    ``dead_letters`` (on by default) sends invalid events and rows the database rejects
    to ``dlq_topic`` (default ``<topic>.dlq``; ``{topic}`` in it is replaced by the
    source topic). Turned off, an invalid event is only counted and logged, and a row
    the database rejects stops the engine.
    """

    group_id: str
    topics: tuple[str, ...]
    bootstrap: str = DEFAULT_BOOTSTRAP
    dsn: str = DEFAULT_DSN
    mapping: TableMapping = DEFAULT_MAPPING
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    backpressure: BackpressurePolicy = field(default_factory=BackpressurePolicy)
    kafka: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    statement_timeout_ms: int = 30_000
    connect_timeout_s: float = 5.0
    flush_retry_s: float = 60.0
    revoke_budget_ms: int | None = None
    auto_create_schema: bool = False
    consume_batch: int = 2_000
    # consume(n, timeout) returns when it has n messages *or* the timeout passed, so
    # below full speed this is a floor on latency. At 10k events/s (spr bench --rate):
    # 50 ms gave p50 37 / p99 66 ms, 5 ms 8.2 / 17.5 ms, 2 ms 7.2 / 13.0 ms. At full
    # speed n arrive first and it does not matter; idle, it costs ~500 cheap calls/s.
    consume_timeout_ms: int = 2
    ring_capacity: int = 262_144
    ring_ttl_ms: int = 600_000
    idle_exit_s: float | None = None
    max_events: int | None = None
    on_offset_gap: str = "fail"
    workers: int = 1
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    dead_letters: bool = True
    dlq_topic: str | None = None

    def __post_init__(self) -> None:
        if not self.group_id:
            raise ConfigError("a consumer group is required (--group)")
        if isinstance(self.topics, str) or not self.topics:
            raise ConfigError("at least one topic is required (--topic)")
        if len(set(self.topics)) != len(self.topics) or not all(self.topics):
            raise ConfigError("topics must be non-empty and distinct")
        if not self.bootstrap:
            raise ConfigError("the Kafka bootstrap address must not be empty")
        if not self.dsn:
            raise ConfigError("the PostgreSQL DSN must not be empty")
        object.__setattr__(
            self, "kafka", MappingProxyType({str(k): str(v) for k, v in self.kafka.items()})
        )
        for name in (
            "statement_timeout_ms",
            "connect_timeout_s",
            "flush_retry_s",
            "consume_batch",
            "consume_timeout_ms",
            "ring_capacity",
            "ring_ttl_ms",
            "workers",
        ):
            _positive(name, getattr(self, name))
        for name in ("revoke_budget_ms", "idle_exit_s", "max_events"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if self.on_offset_gap not in _ON_OFFSET_GAP:
            raise ConfigError(
                f"on_offset_gap must be one of {', '.join(_ON_OFFSET_GAP)}, got {self.on_offset_gap!r}"
            )
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(self.kafka.get(key, "false")).lower() not in ("false", "0"):
                raise ConfigError(f"{key} must stay false: offsets are stored in PostgreSQL")
        if "group.id" in self.kafka and self.kafka["group.id"] != self.group_id:
            raise ConfigError("set the group with --group, not with group.id")
        try:
            poll_ms = int(self.consumer_config()["max.poll.interval.ms"])
        except (KeyError, ValueError):
            poll_ms = 300_000
        if self.revoke_budget_ms is None:
            object.__setattr__(self, "revoke_budget_ms", max(1_000, poll_ms // 5))

    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka configuration for the engine's consumer (user keys win)."""
        return merge_kafka_config(
            CONSUMER_DEFAULTS,
            {"bootstrap.servers": self.bootstrap, "group.id": self.group_id, **self.kafka},
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        """How a failed flush is retried: full-jitter backoff from 50 ms up to 2 s, for
        at most ``flush_retry_s`` seconds (attempts are bounded by that time only)."""
        return RetryPolicy(
            base_delay=0.05, max_delay=2.0, max_attempts=1_000_000, max_elapsed=self.flush_retry_s
        )

    @property
    def effective_revoke_budget_ms(self) -> int:
        """The revoke budget after defaulting (always set once the config is built)."""
        assert self.revoke_budget_ms is not None
        return self.revoke_budget_ms


# --- loading: defaults < TOML file < SPR_* environment < flags ---------------------------

_ENGINE_KEYS = {f.name for f in fields(EngineConfig)} - {
    "mapping",
    "batch",
    "backpressure",
    "breaker",
    "kafka",
}
_INT_KEYS = {
    "statement_timeout_ms",
    "revoke_budget_ms",
    "consume_batch",
    "consume_timeout_ms",
    "ring_capacity",
    "ring_ttl_ms",
    "max_events",
    "workers",
}
_FLOAT_KEYS = {"connect_timeout_s", "flush_retry_s", "idle_exit_s"}

# Environment variables and the setting each one fills (section, key).
_ENV: dict[str, tuple[str, str]] = {
    "SPR_BOOTSTRAP": ("engine", "bootstrap"),
    "SPR_DSN": ("engine", "dsn"),
    "SPR_GROUP": ("engine", "group_id"),
    "SPR_TOPICS": ("engine", "topics"),
    "SPR_TABLE": ("table", "name"),
    "SPR_STATEMENT_TIMEOUT_MS": ("engine", "statement_timeout_ms"),
    "SPR_AUTO_CREATE_SCHEMA": ("engine", "auto_create_schema"),
    "SPR_BATCH_MAX_ROWS": ("batch", "max_rows"),
    "SPR_BATCH_MAX_BYTES": ("batch", "max_bytes"),
    "SPR_BATCH_MAX_AGE_MS": ("batch", "max_age_ms"),
    "SPR_SLOW_FLUSH_MS": ("backpressure", "slow_flush_ms"),
    "SPR_MEMORY_BOUND_BYTES": ("backpressure", "memory_bound_bytes"),
    "SPR_DLQ_TOPIC": ("engine", "dlq_topic"),
    "SPR_DEAD_LETTERS": ("engine", "dead_letters"),
}
_KAFKA_ENV_PREFIX = "SPR_KAFKA_"


def _coerce(key: str, value: Any, where: str) -> Any:
    try:
        if key in _INT_KEYS and isinstance(value, str):
            return int(value)
        if key in _FLOAT_KEYS and isinstance(value, str):
            return float(value)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
    if key in ("auto_create_schema", "dead_letters") and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if key == "topics" and isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    if key == "topics" and isinstance(value, list):
        return tuple(str(t) for t in value)
    return value


def _policy(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    floats = {f.name for f in fields(cls) if "float" in str(f.type)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, str):
            try:
                value = float(value) if key in floats else int(value)
            except ValueError:
                raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
        values[key] = value
    return cls(**values)


def _layers(
    file: str | Path | None,
    environ: Mapping[str, str] | None,
    flags: Mapping[str, Any] | None,
    kafka_flags: Mapping[str, str] | None,
) -> dict[str, dict[str, Any]]:
    environ = os.environ if environ is None else environ
    sections: dict[str, dict[str, Any]] = {
        "engine": {},
        "table": {},
        "batch": {},
        "backpressure": {},
        "breaker": {},
        "kafka": {},
    }
    engine, table, batch, backpressure, breaker, kafka = (
        sections["engine"],
        sections["table"],
        sections["batch"],
        sections["backpressure"],
        sections["breaker"],
        sections["kafka"],
    )
    if file is not None:
        path = Path(file)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ConfigError("TOML config files need Python 3.11 or newer") from None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for name in ("table", "batch", "backpressure", "breaker"):
            value = data.pop(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: [{name}] must be a table")
            sections[name].update(value)
        kafka_section = data.pop("kafka", {})
        if not isinstance(kafka_section, dict):
            raise ConfigError(f"config file {path}: [kafka] must be a table")
        kafka.update({str(k): _kafka_value(v) for k, v in kafka_section.items()})
        if "group" in data:
            data["group_id"] = data.pop("group")
        unknown = set(data) - _ENGINE_KEYS
        if unknown:
            raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")
        engine.update({k: _coerce(k, v, str(path)) for k, v in data.items()})

    for var, (section, key) in _ENV.items():
        if environ.get(var):
            sections[section][key] = _coerce(key, environ[var], var)
    for var, value in environ.items():
        if var.startswith(_KAFKA_ENV_PREFIX) and len(var) > len(_KAFKA_ENV_PREFIX):
            kafka[var[len(_KAFKA_ENV_PREFIX) :].lower().replace("_", ".")] = value

    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "table":
            table["name"] = value
        elif key == "mapping_preset":
            table["preset"] = value
        elif key.startswith("batch_"):
            batch[key[len("batch_") :]] = value
        elif key.startswith("backpressure_"):
            backpressure[key[len("backpressure_") :]] = value
        elif key.startswith("breaker_"):
            breaker[key[len("breaker_") :]] = value
        elif key in _ENGINE_KEYS:
            engine[key] = _coerce(key, value, "flag")
        else:
            raise ConfigError(f"unknown setting {key}")
    kafka.update(kafka_flags or {})
    return sections


def load_engine_config(
    *,
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    kafka_flags: Mapping[str, str] | None = None,
) -> EngineConfig:
    """Build an :class:`EngineConfig` from a TOML file, ``SPR_*`` variables and flags.

    Later layers win: file < environment < flags. ``flags`` uses EngineConfig field names
    plus ``table`` (table name), ``mapping_preset`` and the batch/backpressure field
    names prefixed with ``batch_`` / ``backpressure_``; ``None`` values mean "not
    given". ``kafka_flags`` are ``-X key=value`` pairs, which win over the file's
    ``[kafka]`` section and ``SPR_KAFKA_*`` variables (``SPR_KAFKA_SESSION_TIMEOUT_MS``
    -> ``session.timeout.ms``). Raises ConfigError naming the bad setting; never
    touches a server.
    """
    sections = _layers(file, environ, flags, kafka_flags)
    engine = sections["engine"]
    engine.setdefault("group_id", "")
    engine.setdefault("topics", ())
    return EngineConfig(
        **engine,
        mapping=TableMapping.from_mapping(sections["table"]),
        batch=_policy(BatchPolicy, sections["batch"], "[batch]"),
        backpressure=_policy(BackpressurePolicy, sections["backpressure"], "[backpressure]"),
        breaker=_policy(BreakerPolicy, sections["breaker"], "[breaker]"),
        kafka=sections["kafka"],
    )


def load_table_config(
    *,
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[str, TableMapping, int]:
    """The DSN, table mapping and statement timeout from the same layers as
    :func:`load_engine_config`, for commands that need no group or topic
    (``spr db init``). Raises ConfigError."""
    sections = _layers(file, environ, flags, None)
    engine = sections["engine"]
    dsn = str(engine.get("dsn") or DEFAULT_DSN)
    timeout = int(engine.get("statement_timeout_ms") or 30_000)
    return dsn, TableMapping.from_mapping(sections["table"]), timeout


def _kafka_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
