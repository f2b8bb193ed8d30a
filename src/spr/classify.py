"""The one classification table of design §6: every error spr meets gets one class.

=========  =====================================================  ==============================
class      examples                                               action (taken by the engine)
=========  =====================================================  ==============================
INVALID    undecodable JSON, wrong types, missing fields,         dead-letter at once
           oversize, a key that does not match its entity
TRANSIENT  broker/network timeouts, PostgreSQL 08xxx, 40001,      retry with backoff and full
           40P01, 55P03, 57014, 53xxx, a lost connection; a       jitter, bounded; a PostgreSQL
           failover: 25006 (a demoted node), 57P01/57P02/57P03,   session that failed is
           a connection lost mid-commit, an unfenced old primary  dropped, so the retry
           (FormerPrimary)                                        reconnects to the primary
DATA       PostgreSQL 22xxx/23xxx on a batch                      bisect; dead-letter the rows
                                                                  that fail
FATAL      bad credentials, missing table, 42xxx, a batch whose   stop with one clear message,
           rows all fail on a column spr does not write           nothing committed
           (SchemaMismatch), offsets moved by another writer
           (ConflictingWriter), anything not in the table
=========  =====================================================  ==============================

Two more classes name dead letters that are not errors of the event itself (design §10):
UNORDERABLE, an event without a sequence whose entity already had such events from
another source partition (their offsets cannot order each other), and MISROUTED, an
event on a partition its key does not map to, held back when it has no sequence (or as
``--on-misrouted`` says). They are assigned where they are found, not classified here.

Errors are classified once, here, by what they *are* (SQLSTATE, Kafka error code and
flags, spr's own error types), never by ``except`` clauses scattered through the loop.
Everything in this module is pure computation: nothing blocks, nothing raises. (The
routing rule that makes a message invalid for its key is :func:`spr.routing.check_key`.)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import psycopg
from confluent_kafka import KafkaError, KafkaException

from spr.errors import (
    CommitsLost,
    ConfigError,
    ConflictingWriter,
    DeadLetterUnavailable,
    InvalidEvent,
    SchemaMismatch,
    ServerUnavailable,
    SprError,
    ToolMissing,
)

__all__ = [
    "ErrorClass",
    "classify",
    "classify_kafka_error",
    "classify_sqlstate",
    "error_reason",
]


class ErrorClass(str, enum.Enum):
    """What to do about an error; the value is what the ``spr-error-class`` header says."""

    INVALID = "invalid"
    TRANSIENT = "transient"
    DATA = "data"
    FATAL = "fatal"
    UNORDERABLE = "unorderable"
    MISROUTED = "misrouted"

    def __str__(self) -> str:
        return self.value


INVALID = ErrorClass.INVALID
TRANSIENT = ErrorClass.TRANSIENT
DATA = ErrorClass.DATA
FATAL = ErrorClass.FATAL

# ------------------------------------------------------------------ PostgreSQL SQLSTATE
# Exact codes win over their two-character class. Retrying a whole flush is always safe
# (the sequence guard and the `greatest` offsets upsert make a replayed transaction a
# no-op), so anything that may succeed on a second try is TRANSIENT.
SQLSTATE_CODES: Mapping[str, ErrorClass] = {
    "40001": TRANSIENT,  # serialization_failure
    "40P01": TRANSIENT,  # deadlock_detected
    "40003": TRANSIENT,  # statement_completion_unknown: replaying is harmless
    "40002": DATA,  # transaction_integrity_constraint_violation: a deferred constraint
    "55P03": TRANSIENT,  # lock_not_available (lock_timeout)
    "57014": TRANSIENT,  # query_canceled (statement_timeout)
    "57P01": TRANSIENT,  # admin_shutdown: the server is restarting
    "57P02": TRANSIENT,  # crash_shutdown
    "57P03": TRANSIENT,  # cannot_connect_now: the server is starting up
    "57P05": TRANSIENT,  # idle_session_timeout
    "25P03": TRANSIENT,  # idle_in_transaction_session_timeout: a flush frozen mid-way
    "25006": TRANSIENT,  # read_only_sql_transaction: connected to a standby during failover
    "P0001": DATA,  # raise_exception: a trigger on a mapped table rejected the row
    "P0004": DATA,  # assert_failure in such a trigger
}
SQLSTATE_CLASSES: Mapping[str, ErrorClass] = {
    "08": TRANSIENT,  # connection exception
    "53": TRANSIENT,  # insufficient resources (disk full, out of memory, too many connections)
    "40": TRANSIENT,  # transaction rollback
    "22": DATA,  # data exception (value out of range, bad encoding, \u0000 in jsonb ...)
    "23": DATA,  # integrity constraint violation (check, not null, unique, foreign key)
    "54": DATA,  # program limit exceeded: e.g. an index row too big for one huge key
    "42": FATAL,  # syntax error or access rule violation (missing table or column)
    "28": FATAL,  # invalid authorization specification (bad credentials)
    "3D": FATAL,  # invalid catalog name (no such database)
    "3F": FATAL,  # invalid schema name
}

# ------------------------------------------------------------------------- Kafka codes
# Codes librdkafka reports without the retriable flag (most local and consumer-side
# errors), or whose flag does not say what spr should do. Checked after ``fatal()``
# and before ``retriable()``.
_KAFKA_TRANSIENT = (
    "_TRANSPORT",
    "_ALL_BROKERS_DOWN",
    "_TIMED_OUT",
    "_TIMED_OUT_QUEUE",
    "_MSG_TIMED_OUT",
    "_RESOLVE",
    "_FAIL",
    "_WAIT_COORD",
    "_WAIT_CACHE",
    "_QUEUE_FULL",
    "_ISR_INSUFF",
    "_RETRY",
    "_PREV_IN_PROGRESS",
    # The consumer missed max.poll.interval.ms and left its group; the next poll rejoins
    # (its partitions were revoked or lost first, so nothing uncommitted survives).
    "_MAX_POLL_EXCEEDED",
    # Not an error: the end of a partition. Classified so that a caller that forgets to
    # filter it keeps polling instead of stopping.
    "_PARTITION_EOF",
    # A topic created a moment ago may be missing from metadata; the retry budget turns
    # a topic that really is missing into a stop.
    "_UNKNOWN_TOPIC",
    "UNKNOWN_TOPIC_OR_PART",
    "REQUEST_TIMED_OUT",
    "NETWORK_EXCEPTION",
    "BROKER_NOT_AVAILABLE",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_FOR_PARTITION",
    "REPLICA_NOT_AVAILABLE",
    "PREFERRED_LEADER_NOT_AVAILABLE",
    "COORDINATOR_NOT_AVAILABLE",
    "COORDINATOR_LOAD_IN_PROGRESS",
    "NOT_COORDINATOR",
    "REBALANCE_IN_PROGRESS",
    "NOT_ENOUGH_REPLICAS",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    "KAFKA_STORAGE_ERROR",
    "THROTTLING_QUOTA_EXCEEDED",
    "FETCH_SESSION_ID_NOT_FOUND",
    "INVALID_FETCH_SESSION_EPOCH",
    "UNKNOWN_LEADER_EPOCH",
    "FENCED_LEADER_EPOCH",
    "OFFSET_NOT_AVAILABLE",
    "UNSTABLE_OFFSET_COMMIT",
    "CONCURRENT_TRANSACTIONS",
)
# One record the client could not read: dead-letter it (there is no valid event in it).
_KAFKA_INVALID = (
    "_BAD_MSG",
    "_BAD_COMPRESSION",
    "_KEY_DESERIALIZATION",
    "_VALUE_DESERIALIZATION",
    "INVALID_MSG",  # CORRUPT_MESSAGE: CRC mismatch
)
# One record the broker refused to store: that record, not the system, is at fault.
_KAFKA_DATA = (
    "MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "RECORD_LIST_TOO_LARGE",
    "INVALID_RECORD",
    "INVALID_TIMESTAMP",
    "_KEY_SERIALIZATION",
    "_VALUE_SERIALIZATION",
)
_KAFKA_FATAL = (
    "_AUTHENTICATION",
    "_SSL",
    "_INVALID_ARG",
    "_FATAL",
    "_FENCED",
    "_DESTROY",
    "_UNKNOWN_PARTITION",
    "_UNSUPPORTED_FEATURE",
    "SASL_AUTHENTICATION_FAILED",
    "UNSUPPORTED_SASL_MECHANISM",
    "ILLEGAL_SASL_STATE",
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "INVALID_CONFIG",
    "INVALID_GROUP_ID",
    "INVALID_SESSION_TIMEOUT",
    "INVALID_REQUIRED_ACKS",
    "UNSUPPORTED_VERSION",
    "UNSUPPORTED_COMPRESSION_TYPE",
    "UNSUPPORTED_FOR_MESSAGE_FORMAT",
    "TOPIC_EXCEPTION",  # an invalid topic name
    "POLICY_VIOLATION",
    "PRODUCER_FENCED",
    "INVALID_PRODUCER_EPOCH",
    "FENCED_INSTANCE_ID",
)


def _kafka_codes(names: tuple[str, ...], error_class: ErrorClass) -> dict[int, ErrorClass]:
    # getattr: a code missing from an older librdkafka must not break the import.
    return {getattr(KafkaError, name): error_class for name in names if hasattr(KafkaError, name)}


KAFKA_CODES: Mapping[int, ErrorClass] = {
    **_kafka_codes(_KAFKA_TRANSIENT, TRANSIENT),
    **_kafka_codes(_KAFKA_INVALID, INVALID),
    **_kafka_codes(_KAFKA_DATA, DATA),
    **_kafka_codes(_KAFKA_FATAL, FATAL),
}

# -------------------------------------------------------------------- spr's own errors
# Most specific first: the first isinstance match wins.
SPR_ERRORS: tuple[tuple[type[SprError], ErrorClass], ...] = (
    (InvalidEvent, INVALID),
    (ServerUnavailable, TRANSIENT),  # also FormerPrimary: an unfenced old primary
    (CommitsLost, TRANSIENT),  # consumed again from the stored offsets (synchronous_commit=off)
    (ConflictingWriter, FATAL),  # another writer moved the offsets of an unknown commit
    (DeadLetterUnavailable, FATAL),  # design §6: when the DLQ cannot be written, stop
    (SchemaMismatch, FATAL),  # design §6: every row fails on a column spr does not write
    (ConfigError, FATAL),
    (ToolMissing, FATAL),
)


def classify_sqlstate(sqlstate: str | None) -> ErrorClass:
    """The class of a PostgreSQL SQLSTATE: exact code, then its class prefix, else FATAL.

    ``None`` (psycopg raised without a server error) is not decided here; see
    :func:`classify`, which looks at the exception type in that case.
    """
    if not sqlstate:
        return FATAL
    code = sqlstate.upper()
    exact = SQLSTATE_CODES.get(code)
    if exact is not None:
        return exact
    return SQLSTATE_CLASSES.get(code[:2], FATAL)


def classify_kafka_error(error: KafkaError) -> ErrorClass:
    """The class of a librdkafka error (``message.error()``, a delivery report, an
    ``error_cb`` argument or a :class:`KafkaException`'s argument).

    Order: ``fatal()`` (the client instance is unusable) → FATAL; then the code table;
    then ``retriable()`` → TRANSIENT; anything else → FATAL.
    """
    if error.fatal():
        return FATAL
    by_code = KAFKA_CODES.get(error.code())
    if by_code is not None:
        return by_code
    if error.retriable():
        return TRANSIENT
    return FATAL


def _classify_psycopg(exc: psycopg.Error) -> ErrorClass:
    if exc.sqlstate:
        return classify_sqlstate(exc.sqlstate)
    # No SQLSTATE: psycopg raised it on the client side.
    if isinstance(exc, psycopg.OperationalError):
        # Connection refused, closed or timed out (including pool timeouts).
        return TRANSIENT
    if isinstance(exc, psycopg.DataError):
        # A value psycopg cannot send (for example a NUL character in text).
        return DATA
    # InterfaceError, ProgrammingError and the rest are spr's bugs or misuse.
    return FATAL


def classify(error: BaseException | KafkaError) -> ErrorClass:
    """The :class:`ErrorClass` of an exception or a librdkafka :class:`KafkaError`.

    Anything this table does not know is FATAL, on purpose: retrying an error nobody
    understands can loop forever or hide a bug, and dead-lettering it would divert
    valid events because of a fault in spr or its environment. Stopping with nothing
    committed is the only action that neither loses nor duplicates an event; the
    operator reads the message, and the next run replays from the last commit.
    """
    if isinstance(error, KafkaError):
        return classify_kafka_error(error)
    if isinstance(error, SprError):
        for error_type, error_class in SPR_ERRORS:
            if isinstance(error, error_type):
                return error_class
        return FATAL
    if isinstance(error, psycopg.Error):
        return _classify_psycopg(error)
    if isinstance(error, KafkaException):
        inner = error.args[0] if error.args else None
        if isinstance(inner, KafkaError):
            return classify_kafka_error(inner)
        return FATAL
    # Socket-level timeouts and resets raised by code under spr (DNS, TCP, TLS).
    if isinstance(error, (TimeoutError, ConnectionError)):
        return TRANSIENT
    return FATAL


def _one_line(text: str, limit: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_reason(error: BaseException | KafkaError, *, limit: int = 500) -> str:
    """A one-line description of ``error`` for logs and the ``spr-error`` header.

    InvalidEvent gives its reason; a PostgreSQL error its SQLSTATE and message; a Kafka
    error its code name and text. At most ``limit`` characters; never raises.
    """
    if isinstance(error, InvalidEvent):
        return _one_line(error.reason, limit)
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        error = error.args[0]
    if isinstance(error, KafkaError):
        return _one_line(f"Kafka {error.name()}: {error.str()}", limit)
    if isinstance(error, psycopg.Error) and error.sqlstate:
        return _one_line(f"PostgreSQL {error.sqlstate}: {error}", limit)
    return _one_line(f"{type(error).__name__}: {error}", limit)
