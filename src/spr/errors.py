"""The errors spr raises, in one small hierarchy.

Every error a user can cause (bad configuration, a server that is not there, an
invalid event) derives from :class:`SprError`, and its message is one plain sentence
that says what to fix. The command line prints that sentence instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "CommitsLost",
    "ConfigError",
    "ConflictingWriter",
    "DeadLetterUnavailable",
    "FormerPrimary",
    "InvalidEvent",
    "ProducerError",
    "SchemaMismatch",
    "ServerUnavailable",
    "SprError",
    "ToolMissing",
]


class SprError(Exception):
    """Base class of every error spr raises on purpose."""


class ConfigError(SprError):
    """A setting or argument is wrong; the message names it and what is expected."""


class SchemaMismatch(ConfigError):
    """The table does not fit the mapping: PostgreSQL rejects every row of a batch on a
    column or constraint spr does not write (design §6). A schema problem, not bad data:
    the engine stops with nothing committed instead of dead-lettering every event."""


class ServerUnavailable(SprError):
    """Kafka or PostgreSQL cannot be reached; the message says which and where."""


class FormerPrimary(ServerUnavailable):
    """The PostgreSQL server spr connected to accepts writes but is on an older timeline
    than one spr has already written to: a primary that came back after a failover
    without being fenced (split brain). spr never writes to it; like any unavailable
    server it is retried (transient), so that fencing it, or taking it out of the DSN,
    lets spr go on with the new primary."""


class ConflictingWriter(SprError):
    """A commit's outcome was unknown (the connection died after COMMIT was sent), and
    the offsets stored for its partitions are neither the batch's previous offsets nor
    its next ones: something else writes this group's offsets. Fatal: neither applying
    the batch again nor skipping it can be proven right."""


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


class ProducerError(SprError):
    """Kafka refused or failed to deliver messages that spr was asked to produce.

    ``failed`` is how many messages failed since the last report; ``first_error`` is
    librdkafka's description of the first of them. Messages are never dropped silently:
    every delivery failure is counted and reported through this error.
    """

    def __init__(self, message: str, *, failed: int = 0, first_error: str = "") -> None:
        super().__init__(message)
        self.failed = failed
        self.first_error = first_error


class DeadLetterUnavailable(SprError):
    """A dead letter could not be written to, or acknowledged by, its dead-letter topic.

    Consumption must stop: an offset is never committed past an event that was neither
    applied nor dead-lettered (design §6). ``failed`` counts the dead letters that were
    not acknowledged.
    """

    def __init__(self, message: str, *, failed: int = 0) -> None:
        super().__init__(message)
        self.failed = failed


class CommitsLost(SprError):
    """PostgreSQL no longer holds commits it acknowledged: a stored offset is below what
    this consumer knows it committed, as after a crash under ``synchronous_commit=off``
    (or a failover to a standby that lagged). Rows and offsets were lost together, so
    nothing is applied twice or skipped as long as the events are consumed again from
    the stored offsets; the engine does that by itself (transient, not fatal).

    ``stored`` maps each such partition, ``(topic, partition)``, to its stored next
    offset now (None when its row is gone); ``expected`` to the one known committed.
    """

    def __init__(
        self,
        message: str,
        *,
        stored: dict[tuple[str, int], int | None],
        expected: dict[tuple[str, int], int],
    ) -> None:
        super().__init__(message)
        self.stored = stored
        self.expected = expected
