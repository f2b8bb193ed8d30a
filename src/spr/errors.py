"""The errors spr raises, in one small hierarchy.

Every error a user can cause (bad configuration, a server that is not there, an
invalid event) derives from :class:`SprError`, and its message is one plain sentence
that says what to fix. The command line prints that sentence instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidEvent",
    "ServerUnavailable",
    "SprError",
    "ToolMissing",
]


class SprError(Exception):
    """Base class of every error spr raises on purpose."""


class ConfigError(SprError):
    """A setting or argument is wrong; the message names it and what is expected."""


class ServerUnavailable(SprError):
    """Kafka or PostgreSQL cannot be reached; the message says which and where."""


class ToolMissing(SprError):
    """An external program spr needs (java, mvn, postgres) is not installed."""


class InvalidEvent(SprError):
    """An event cannot be decoded into the canonical form.

    ``reason`` is a short machine-friendly sentence; it travels with the event to the
    dead-letter topic. Invalid events are never retried.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
