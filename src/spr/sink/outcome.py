"""A commit whose outcome is unknown, and the rule that decides it from the database.

When the connection dies after ``COMMIT`` was sent (a primary killed, a failover, a
network cut), the client cannot know whether the transaction committed: the server may
have made it durable and died before answering, or died before committing. spr never
guesses. A flush writes the batch's rows and its partitions' next offsets in one
transaction, so once reconnected (to whichever server is primary now) the offsets stored
for the batch's partitions answer the question (:func:`commit_outcome`):

* all at the batch's next offsets: it committed; the flush is reported committed;
* all at the offsets known before the batch: it did not; the batch is flushed again;
* below those (none above): the server lost earlier acknowledged commits too, as a
  promotion under asynchronous replication does; their events are consumed again from
  the stored offsets (:class:`CommitsLost`, transient);
* anything else: another writer moves the group's offsets; stop (:class:`ConflictingWriter`).

Pure logic except for the log line; the sink reads the offsets
(:meth:`spr.sink.postgres.PostgresSink.flush`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from spr.errors import CommitsLost, ConflictingWriter

__all__ = [
    "CommitOutcome",
    "UnknownCommit",
    "commit_outcome",
    "lost_commits_error",
    "lost_offsets",
]

log = logging.getLogger("spr.sink")

Offsets = Mapping[tuple[str, int], int]


class CommitOutcome(enum.Enum):
    """What the stored offsets say about a commit whose outcome was unknown."""

    COMMITTED = "committed"  # every partition is at the batch's next offset
    NOT_COMMITTED = "not committed"  # every partition is still at its previous offset
    LOST = "lost"  # below the previous offsets: earlier acknowledged commits are gone too
    CONFLICT = "conflict"  # anything else: another writer moved the offsets


def commit_outcome(
    next_offsets: Offsets, previous: Offsets | None, stored: Offsets
) -> CommitOutcome:
    """Decide an unknown commit from the offsets stored after reconnecting.

    ``next_offsets`` are the batch's, ``previous`` the offsets known committed before it
    (a partition absent there had no stored offset; None when not known at all), and
    ``stored`` what the database holds now. One transaction wrote every partition's
    offset, so all partitions must agree (see the module). Without ``previous``, offsets
    all below the next ones count as not committed (flushing again is harmless: the
    sequence guard and ``GREATEST``). Pure; never raises.
    """
    keys = list(next_offsets)
    if all(stored.get(key) == next_offsets[key] for key in keys):
        return CommitOutcome.COMMITTED
    if previous is None:
        if all(stored.get(key, -1) < next_offsets[key] for key in keys):
            return CommitOutcome.NOT_COMMITTED
        return CommitOutcome.CONFLICT
    if all(stored.get(key) == previous.get(key) for key in keys):
        return CommitOutcome.NOT_COMMITTED
    if all(stored.get(key, -1) <= previous.get(key, -1) for key in keys):
        return CommitOutcome.LOST
    return CommitOutcome.CONFLICT


def lost_offsets(expected: Offsets, stored: Offsets) -> dict[tuple[str, int], int | None]:
    """The partitions whose ``stored`` next offset is below the ``expected`` one (None
    when nothing is stored): the database lost commits it acknowledged. A stored offset
    above the expected one is fine (another owner went on)."""
    return {
        key: stored.get(key) for key, offset in expected.items() if stored.get(key, -1) < offset
    }


def lost_commits_error(expected: Offsets, stored: Offsets) -> CommitsLost | None:
    """The :class:`CommitsLost` to raise when ``stored`` is below the offsets
    ``expected`` committed (a crash under ``synchronous_commit=off``, or a failover to
    a standby that had not received the last commits), else None."""
    lost = lost_offsets(expected, stored)
    if not lost:
        return None
    where = ", ".join(
        f"{t}[{p}] is at {'no offset' if lost[(t, p)] is None else lost[(t, p)]} "
        f"instead of {expected[(t, p)]}"
        for t, p in sorted(lost)
    )
    return CommitsLost(
        f"PostgreSQL lost commits it had acknowledged ({where}), as a crash under "
        "synchronous_commit=off or a failover does; their events are consumed again from Kafka",
        stored=lost,
        expected={key: expected[key] for key in lost},
    )


@dataclass(frozen=True)
class UnknownCommit:
    """A flush whose COMMIT was sent but never answered: its batch's next ``offsets``,
    the ``previous`` offsets known committed before it (None: not known), and the
    ``rows`` it staged of which ``applied`` changed a row."""

    offsets: dict[tuple[str, int], int]
    previous: dict[tuple[str, int], int] | None
    rows: int
    applied: int

    @classmethod
    def after(
        cls,
        error: BaseException,
        offsets: dict[tuple[str, int], int],
        previous: dict[tuple[str, int], int] | None,
        rows: int,
        applied: int,
    ) -> UnknownCommit:
        """The unknown commit a lost connection left (and the log line saying so)."""
        text = str(error).strip()
        log.warning(
            "the connection was lost while committing a flush (%s); its outcome is read "
            "from the stored offsets after reconnecting",
            text.splitlines()[0] if text else type(error).__name__,
        )
        return cls(offsets, previous, rows, applied)

    def resolve(self, stored: Offsets, group: str, counts: dict[str, int]) -> bool:
        """True when it committed, False when the batch must be flushed again; raises
        CommitsLost (transient) or ConflictingWriter (fatal) for the other outcomes.
        ``counts`` tallies the outcomes by name."""
        outcome = commit_outcome(self.offsets, self.previous, stored)
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
        log.warning(
            "the flush whose commit was unknown had %s (read from the stored offsets)",
            outcome.value,
        )
        if outcome is CommitOutcome.COMMITTED:
            return True
        if outcome is CommitOutcome.NOT_COMMITTED:
            return False
        previous = self.previous or {}
        where = ", ".join(
            f"{t}[{p}] is at {stored.get((t, p), 'no offset')} (before the batch "
            f"{previous.get((t, p), 'none') if self.previous is not None else 'unknown'}, "
            f"after it {n})"
            for (t, p), n in sorted(self.offsets.items())
        )
        if outcome is CommitOutcome.LOST:
            raise CommitsLost(
                f"PostgreSQL lost commits it had acknowledged ({where}), as a failover to a "
                "standby that had not received them does; their events are consumed again",
                stored={key: stored.get(key) for key in self.offsets},
                expected={key: previous.get(key, 0) for key in self.offsets},
            )
        raise ConflictingWriter(
            f"a flush's commit was cut off, and the stored offsets of group {group} are "
            f"neither those before it nor those after it ({where}): another writer moves "
            "them; stop the other writer, then start spr again"
        )
