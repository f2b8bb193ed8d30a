"""Configuration of spr: frozen, keyword-only, validated when built.

Every policy is a frozen dataclass that raises :class:`spr.errors.ConfigError` from its
constructor when a value is out of range, so a bad setting fails before any server is
touched. Settings are layered, later layers winning: the dataclass defaults, a TOML file,
``SPR_*`` environment variables, then command-line flags (:func:`load_engine_config`).

The rooms: ``defaults`` (where the servers are when nothing is said), ``kafka``
(librdkafka defaults, merged in one place), ``policies`` (batch and backpressure),
``mapping`` (the table), ``engine`` (:class:`EngineConfig`) and ``loading``.
"""

from __future__ import annotations

from spr.config.defaults import DEFAULT_BOOTSTRAP, DEFAULT_DSN, default_bootstrap, default_dsn
from spr.config.engine import EngineConfig
from spr.config.kafka import (
    CONNECTION_PREFIXES,
    CONSUMER_DEFAULTS,
    connection_settings,
    merge_kafka_config,
    uses_consumer_protocol,
    uses_cooperative_rebalance,
)
from spr.config.loading import load_engine_config, load_kafka_settings, load_table_config
from spr.config.mapping import DEFAULT_MAPPING, ORDERS_MAPPING, TableMapping
from spr.config.policies import BackpressurePolicy, BatchPolicy, BreakerPolicy

__all__ = [
    "CONNECTION_PREFIXES",
    "CONSUMER_DEFAULTS",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_DSN",
    "DEFAULT_MAPPING",
    "ORDERS_MAPPING",
    "BackpressurePolicy",
    "BatchPolicy",
    "BreakerPolicy",
    "EngineConfig",
    "TableMapping",
    "connection_settings",
    "default_bootstrap",
    "default_dsn",
    "load_engine_config",
    "load_kafka_settings",
    "load_table_config",
    "merge_kafka_config",
    "uses_consumer_protocol",
    "uses_cooperative_rebalance",
]
