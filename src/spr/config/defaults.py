"""Where spr looks for its servers when it is told nothing: the local dev stack.

``spr dev up`` runs Kafka on 127.0.0.1:9092 and PostgreSQL on 127.0.0.1:55432; the ports
move with ``SPR_DEV_KAFKA_PORT`` and ``SPR_DEV_PG_PORT``, so that a second stack (a CI run
from a clean clone, say) can live beside a developer's own. ``$SPR_BOOTSTRAP`` and
``$SPR_DSN`` point every command elsewhere. Reads the environment once, at import.
"""

from __future__ import annotations

import os

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_DSN",
    "DEV_KAFKA_HOST",
    "DEV_KAFKA_PORT",
    "DEV_PG_PORT",
    "default_bootstrap",
    "default_dsn",
]

DEV_KAFKA_HOST = "127.0.0.1"
DEV_KAFKA_PORT = int(os.environ.get("SPR_DEV_KAFKA_PORT", "9092"))
DEV_PG_PORT = int(os.environ.get("SPR_DEV_PG_PORT", "55432"))
DEFAULT_BOOTSTRAP = f"{DEV_KAFKA_HOST}:{DEV_KAFKA_PORT}"
DEFAULT_DSN = f"postgresql://spr@127.0.0.1:{DEV_PG_PORT}/spr"


def default_bootstrap() -> str:
    """Kafka bootstrap servers when none are given: ``$SPR_BOOTSTRAP`` or the local stack."""
    return os.environ.get("SPR_BOOTSTRAP") or DEFAULT_BOOTSTRAP


def default_dsn() -> str:
    """PostgreSQL DSN when none is given: ``$SPR_DSN`` or the local stack's database."""
    return os.environ.get("SPR_DSN") or DEFAULT_DSN
