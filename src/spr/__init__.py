"""spr: Stateful Partition Routing.

Turns a Kafka topic of entity state changes into exactly-once, ordered state in
PostgreSQL. ``spr.IMPL`` says whether the compiled core (``"compiled"``) or its
pure-Python twin (``"python"``) is live.
"""

from __future__ import annotations

from spr._impl import IMPL
from spr._version import __version__
from spr.errors import ConfigError, InvalidEvent, ServerUnavailable, SprError
from spr.producer import Producer

__all__ = [
    "IMPL",
    "ConfigError",
    "InvalidEvent",
    "Producer",
    "ServerUnavailable",
    "SprError",
    "__version__",
]
