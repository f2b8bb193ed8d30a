"""Loading the configuration: defaults < TOML file < ``SPR_*`` environment < flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from spr.config.defaults import DEFAULT_DSN
from spr.config.engine import EngineConfig
from spr.config.mapping import TableMapping
from spr.config.policies import BackpressurePolicy, BatchPolicy, BreakerPolicy
from spr.errors import ConfigError

__all__ = ["check_dsn", "load_engine_config", "load_kafka_settings", "load_table_config"]


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
    "flush_connections",
    "flush_split_rows",
}
_FLOAT_KEYS = {"connect_timeout_s", "flush_retry_s", "idle_exit_s", "flush_split_rows_per_event"}

# Environment variables and the setting each one fills (section, key).
_ENV: dict[str, tuple[str, str]] = {
    "SPR_BOOTSTRAP": ("engine", "bootstrap"),
    "SPR_DSN": ("engine", "dsn"),
    "SPR_GROUP": ("engine", "group_id"),
    "SPR_TOPICS": ("engine", "topics"),
    "SPR_TABLE": ("table", "name"),
    "SPR_STATEMENT_TIMEOUT_MS": ("engine", "statement_timeout_ms"),
    "SPR_SYNCHRONOUS_COMMIT": ("engine", "synchronous_commit"),
    "SPR_FLUSH_CONNECTIONS": ("engine", "flush_connections"),
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


_BOOL_KEYS = {"auto_create_schema", "dead_letters"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _whole_number(key: str, value: Any, where: str) -> int:
    """``value`` as an int: a TOML integer or a string of digits. A float (``workers =
    1.7``) or a boolean is refused rather than truncated."""
    if isinstance(value, (bool, float)):
        raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
        raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}")
    if not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    return value


def _number(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None


def _coerce(key: str, value: Any, where: str) -> Any:
    if value is None:
        return None
    if key in _INT_KEYS:
        return _whole_number(key, value, where)
    if key in _FLOAT_KEYS:
        return _number(key, value, where)
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return text in _TRUE
    if key == "synchronous_commit":
        # TOML may say it as a boolean, as postgresql.conf may; EngineConfig checks it.
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value).strip().lower()
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
        if key in floats:
            values[key] = _number(key, value, where)
        else:
            values[key] = _whole_number(key, value, where)
    return cls(**values)


def check_dsn(dsn: str) -> str:
    """``dsn`` unchanged when libpq can parse it (a ``postgresql://`` URL or ``key=value``
    pairs); ConfigError otherwise, with the parser's reason and the password masked.
    Contacts no server."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    from spr.logs import redact

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ConfigError(
            f"the PostgreSQL DSN is not valid ({reason}); expected "
            "postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE or 'host=H port=P dbname=D'"
        ) from None
    return dsn


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
    if engine.get("dsn"):
        check_dsn(str(engine["dsn"]))
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
    dsn = check_dsn(str(engine.get("dsn") or DEFAULT_DSN))
    timeout = int(engine.get("statement_timeout_ms") or 30_000)
    return dsn, TableMapping.from_mapping(sections["table"]), timeout


def _kafka_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_kafka_settings(
    *,
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    kafka_flags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The user's librdkafka settings from the same layers as :func:`load_engine_config`
    (the file's ``[kafka]``, ``SPR_KAFKA_*``, ``-X``), for commands that need no group or
    table (``spr lag``, ``spr replay``), so that they connect the way ``spr run`` does.
    Raises ConfigError."""
    return dict(_layers(file, environ, None, kafka_flags)["kafka"])
