"""spr: Stateful Partition Routing.

Turns a Kafka topic of entity state changes into exactly-once, ordered state in
PostgreSQL. ``spr.IMPL`` says whether the compiled core (``"compiled"``) or its
pure-Python twin (``"python"``) is live.

Importing ``spr`` (or a pure room such as :mod:`spr.routing`) loads neither the Kafka
client nor the database driver: :class:`Producer` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spr._impl import IMPL
from spr._version import __version__
from spr.errors import ConfigError, InvalidEvent, ServerUnavailable, SprError

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name == "Producer":
        from spr.producer import Producer

        return Producer
    raise AttributeError(f"module 'spr' has no attribute {name!r}")
