"""How a pipeline stops: the first failure wins, and nothing is committed after it.

Errors surface in places the loop does not call directly: rebalance callbacks run inside
``consume()``, rejected rows are dead-lettered on the flush thread, a dead-letter flush
can fail halfway through a batch. Each of them hands its error to one
:class:`FirstFailure`, and the loop raises it at its next step. The first error is the
cause; a later one is usually a consequence (a revoke that cannot flush because the
database already failed), so it is logged and never replaces the first.
"""

from __future__ import annotations

import logging

from spr.errors import SprError

__all__ = ["FirstFailure", "FlushFailed", "first_line"]

log = logging.getLogger("spr.engine")


class FlushFailed(SprError):
    """A flush could not be committed within its retry budget, or failed for good.

    Nothing of the failed batch was committed; the engine stops. ``cause`` is the last
    underlying error.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class FirstFailure:
    """The error that stops a pipeline: set once, by whichever stage fails first."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` unless an earlier error already stopped the pipeline. Never raises."""
        if self.error is None:
            self.error = exc
        elif exc is not self.error:
            log.debug("after the first failure, also: %s", first_line(exc))

    def raise_if_failed(self) -> None:
        """Raise the first failure: an :class:`SprError` (or an interrupt) as it is, any
        other error wrapped in one sentence."""
        error = self.error
        if error is None:
            return
        if isinstance(error, (SprError, KeyboardInterrupt, SystemExit)):
            raise error
        raise SprError(f"the engine stopped: {first_line(error)}") from error


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
