"""One PostgreSQL session of a sink: opened on demand with spr's timeouts and
keepalives, dropped after a failure, cancellable from any thread.

Every statement runs under ``statement_timeout``; a transaction left idle (its process
frozen, a VM paused) is ended by the server after ``idle_in_transaction_session_timeout``;
TCP keepalives and ``tcp_user_timeout`` turn a silent network drop into an error within
seconds instead of hours. A sink that writes batches may also set ``synchronous_commit``
(``spr run --synchronous-commit``); it is set again on every new connection.

The DSN goes to libpq as it is, so its multi-host form works everywhere
(``host=a,b port=p,q target_session_attrs=read-write``, or
``postgresql://u@a:p,b:q/db?target_session_attrs=read-write``): every new connection
lands on whichever host accepts writes *now*, which is how spr follows a failover. A
dropped session is never reused, so a failover error (a demoted node's ``25006``, an
admin or crash shutdown) reconnects. One guard is spr's own: a primary on an older
timeline than one this process has already written to is an old primary that came back
unfenced (split brain), and is refused (:class:`FormerPrimary`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from spr.classify import ErrorClass, classify
from spr.errors import FormerPrimary, ServerUnavailable
from spr.logs import redact

__all__ = [
    "DEAD_LETTER_IDLE_TIMEOUT_MS",
    "IDLE_IN_TRANSACTION_TIMEOUT_MS",
    "SinkConnection",
]

log = logging.getLogger("spr.sink")

#: How long a flush's transaction may sit idle before the server ends it (see connect).
IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000
#: The highest timeline seen on a primary, by DSN: what a new connection must not be
#: below (see _check_timeline). Shared by every sink of the process.
_TIMELINES: dict[str, int] = {}
_TIMELINES_LOCK = threading.Lock()
# The timeline of the WAL a primary writes now; NULL on a standby (which cannot say).
_TIMELINE_SQL = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END"
)

#: The same while rejected rows are dead-lettered inside the transaction (Kafka acks,
#: and reading the original messages back, may take up to about a minute).
DEAD_LETTER_IDLE_TIMEOUT_MS = 120_000


class SinkConnection:
    """The connection of one sink. Not thread-safe, except :meth:`cancel`.

    ``setup(conn)`` runs on every new connection (the sink creates its staging table
    there). :meth:`get` raises ServerUnavailable (one sentence, the DSN redacted) when
    the server cannot be reached. ``synchronous_commit``, when set, is the session's
    ``synchronous_commit`` (None leaves the server's setting); it applies from the next
    connection on.
    """

    def __init__(
        self,
        dsn: str,
        *,
        statement_timeout_ms: int,
        connect_timeout_s: float,
        application_name: str,
        setup: Callable[[psycopg.Connection[Any]], None] | None = None,
        synchronous_commit: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.statement_timeout_ms = statement_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self.setup = setup
        self.synchronous_commit = synchronous_commit
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def options(self) -> dict[str, Any]:
        """TCP keepalives and ``tcp_user_timeout`` for the connection, so that a silent
        network drop fails the statement in seconds instead of blocking for hours (the
        kernel's defaults); a parameter the DSN sets itself wins."""
        options: dict[str, Any] = {
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.statement_timeout_ms) + 10_000,
        }
        try:
            given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.ProgrammingError:
            given = {}
        return {k: v for k, v in options.items() if k not in given}

    def get(self) -> psycopg.Connection[Any]:
        """The open connection, opened when it is not; raises ServerUnavailable."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout_s)),
                application_name=self.application_name,
                **self.options(),
            )
        except psycopg.OperationalError as exc:
            raise ServerUnavailable(
                f"cannot connect to PostgreSQL at {redact(self.dsn)}: {_first_line(exc)}"
            ) from exc
        try:
            self._check_timeline(conn)
            conn.execute(
                sql.SQL("SET statement_timeout = {}").format(
                    sql.Literal(int(self.statement_timeout_ms))
                )
            )
            # A flush sends its statements back to back, so its transaction is never
            # idle for long; one that is (its process frozen, a VM paused, a member
            # stopped mid-flush) holds row locks that block every other member's flush.
            # The server ends such a session after this long, which bounds the block.
            conn.execute(
                sql.SQL("SET idle_in_transaction_session_timeout = {}").format(
                    sql.Literal(IDLE_IN_TRANSACTION_TIMEOUT_MS)
                )
            )
            if self.synchronous_commit is not None:
                conn.execute(
                    sql.SQL("SET synchronous_commit = {}").format(
                        sql.Literal(self.synchronous_commit)
                    )
                )
            if self.setup is not None:
                self.setup(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conn = conn
        return conn

    def _check_timeline(self, conn: psycopg.Connection[Any]) -> None:
        """Refuse a primary on an older timeline than one already written to here.

        A promotion starts a new timeline; the old primary stays on its own. When it
        comes back as a writer before it is fenced, libpq may pick it (it is the first
        writable host of the DSN), and writing there would be lost, or worse, diverge.
        A server that cannot tell (a standby, missing privileges) is not checked."""
        try:
            row = conn.execute(_TIMELINE_SQL).fetchone()
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            return
        if row is None or row[0] is None:
            return
        timeline = int(str(row[0])[:8], 16)
        with _TIMELINES_LOCK:
            seen = _TIMELINES.get(self.dsn, 0)
            if timeline >= seen:
                _TIMELINES[self.dsn] = timeline
                return
        where = f"{conn.info.host}:{conn.info.port}"
        raise FormerPrimary(
            f"the PostgreSQL primary at {where} is on timeline {timeline}, but spr has "
            f"already written on timeline {seen}: it is an old primary that came back after "
            "a failover; fence it (stop it or take it out of the DSN) and spr goes on with "
            "the new one"
        )

    def close(self) -> None:
        """Close the connection (idempotent; never raises)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            # Closing a broken connection must not mask the real error.
            with contextlib.suppress(Exception):
                conn.close()

    def after_error(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> None:
        """Drop a connection that failed for anything but its data: the server may have
        ended the session (an idle-in-transaction timeout, a restart) before psycopg
        noticed, and the next call must not reuse it."""
        if conn.broken or conn.closed or classify(exc) is not ErrorClass.DATA:
            self.close()

    def cancel(self) -> None:
        """Abort the statement running on the connection, from any thread. Never
        raises; a no-op when idle."""
        with self._lock:
            conn = self._conn
        if conn is None:
            return
        try:
            conn.cancel_safe(timeout=2.0)
        except Exception as exc:  # the flush is then bounded by statement_timeout instead
            log.debug("cancel failed: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
