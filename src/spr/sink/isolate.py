"""Poison-row isolation (design §6, class DATA): bisect a batch the database rejects.

When PostgreSQL rejects a batch for a row's content (22xxx, 23xxx ...), the batch is
split in halves and each half applied on its own, recursively, until every rejected
row stands alone. Only those rows are dead-lettered; all the others are applied. With
``k`` poison rows among ``n``, that takes at most about ``2·k·log2(n) + 1`` applies.

The caller supplies ``apply(rows)``, which must be atomic: when it raises, it must
leave no effect. In the sink that is one ``SAVEPOINT`` per call inside the batch's
single transaction, so the rows that pass, the offsets past the rejected ones and the
commit stay one transaction (dead letters are flushed before the commit). Rows are
applied in their original order. Pure logic: nothing here blocks except ``apply``.

When *every* row fails alone, and for one and the same reason, the batch may not be bad
data at all but a table that does not fit the mapping (design §6): :func:`shared_failure`
finds that reason, and the sink decides whether it is a schema problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from spr.classify import ErrorClass, classify

__all__ = ["Isolation", "failure_reason", "isolate_poison", "shared_failure"]

T = TypeVar("T")


@dataclass
class Isolation(Generic[T]):
    """The outcome of :func:`isolate_poison`.

    ``rejected`` holds each row that failed alone with its error, in input order;
    ``applied`` counts the rows that went in; ``calls`` counts calls to ``apply``.
    """

    rejected: list[tuple[T, BaseException]] = field(default_factory=list)
    applied: int = 0
    calls: int = 0


def isolate_poison(
    rows: Sequence[T],
    apply: Callable[[Sequence[T]], None],
    *,
    classify_error: Callable[[BaseException], ErrorClass] = classify,
) -> Isolation[T]:
    """Apply ``rows``, bisecting around the rows whose errors are DATA.

    An error of any other class (TRANSIENT, FATAL, ...) is raised at once, so the caller
    rolls the whole transaction back and retries or stops: a connection lost halfway
    through a bisection says nothing about the rows.
    """
    result: Isolation[T] = Isolation()
    # Depth-first, left half first, so rows are applied in their original order.
    pending: list[Sequence[T]] = [rows] if rows else []
    while pending:
        chunk = pending.pop()
        result.calls += 1
        try:
            apply(chunk)
        except Exception as exc:
            if classify_error(exc) is not ErrorClass.DATA:
                raise
            if len(chunk) == 1:
                result.rejected.append((chunk[0], exc))
            else:
                middle = len(chunk) // 2
                pending.append(chunk[middle:])
                pending.append(chunk[:middle])
            continue
        result.applied += len(chunk)
    return result


def failure_reason(error: BaseException) -> tuple[str, str, str, str, str] | None:
    """What a database rejection is about: (SQLSTATE, schema, table, column, constraint)
    from PostgreSQL's diagnostics (empty strings where it names nothing), or None for an
    error without a SQLSTATE."""
    sqlstate = getattr(error, "sqlstate", None)
    diag = getattr(error, "diag", None)
    if not sqlstate or diag is None:
        return None
    return (
        str(sqlstate),
        diag.schema_name or "",
        diag.table_name or "",
        diag.column_name or "",
        diag.constraint_name or "",
    )


def shared_failure(isolation: Isolation[T], rows: int) -> BaseException | None:
    """The error every one of ``rows`` rows was rejected with, when all of them failed
    alone for one reason that names a column or a constraint (same SQLSTATE, table and
    column or constraint); else None. One row counts too: it is then the whole batch."""
    if rows <= 0 or len(isolation.rejected) != rows:
        return None
    reasons = {failure_reason(error) for _, error in isolation.rejected}
    if len(reasons) != 1:
        return None
    reason = reasons.pop()
    if reason is None or not (reason[3] or reason[4]):
        return None
    return isolation.rejected[0][1]
