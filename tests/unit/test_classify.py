"""The classification table of design §6, row by row, with real error objects."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.error import ConsumeError

from spr.classify import (
    ErrorClass,
    classify,
    classify_kafka_error,
    classify_sqlstate,
    error_reason,
)
from spr.decode import decode_event
from spr.errors import (
    ConfigError,
    DeadLetterUnavailable,
    InvalidEvent,
    ServerUnavailable,
    SprError,
    ToolMissing,
)

INVALID, TRANSIENT, DATA, FATAL = (
    ErrorClass.INVALID,
    ErrorClass.TRANSIENT,
    ErrorClass.DATA,
    ErrorClass.FATAL,
)

SQLSTATE_ROWS = [
    # transient: connection exceptions (08xxx)
    ("08000", TRANSIENT),  # connection_exception
    ("08001", TRANSIENT),  # sqlclient_unable_to_establish_sqlconnection
    ("08003", TRANSIENT),  # connection_does_not_exist
    ("08006", TRANSIENT),  # connection_failure
    ("08P01", TRANSIENT),  # protocol_violation
    # transient: design §6's exact codes
    ("40001", TRANSIENT),  # serialization_failure
    ("40P01", TRANSIENT),  # deadlock_detected
    ("55P03", TRANSIENT),  # lock_not_available
    ("57014", TRANSIENT),  # query_canceled (statement_timeout)
    # transient: insufficient resources (53xxx)
    ("53000", TRANSIENT),
    ("53100", TRANSIENT),  # disk_full
    ("53200", TRANSIENT),  # out_of_memory
    ("53300", TRANSIENT),  # too_many_connections
    # transient: the server going away or coming back
    ("57P01", TRANSIENT),  # admin_shutdown
    ("57P02", TRANSIENT),  # crash_shutdown
    ("57P03", TRANSIENT),  # cannot_connect_now
    ("25006", TRANSIENT),  # read_only_sql_transaction (a standby after failover)
    ("40003", TRANSIENT),  # statement_completion_unknown
    # data: 22xxx / 23xxx / 54xxx and row-rejecting triggers
    ("22001", DATA),  # string_data_right_truncation
    ("22003", DATA),  # numeric_value_out_of_range
    ("22021", DATA),  # character_not_in_repertoire (a NUL byte in text)
    ("22P02", DATA),  # invalid_text_representation
    ("22P05", DATA),  # untranslatable_character (\u0000 in jsonb)
    ("23502", DATA),  # not_null_violation
    ("23503", DATA),  # foreign_key_violation
    ("23505", DATA),  # unique_violation
    ("23514", DATA),  # check_violation
    ("40002", DATA),  # transaction_integrity_constraint_violation (deferred)
    ("54000", DATA),  # program_limit_exceeded (index row too big)
    ("P0001", DATA),  # raise_exception from a trigger
    # fatal: access rules, credentials, catalogs
    ("42P01", FATAL),  # undefined_table
    ("42703", FATAL),  # undefined_column
    ("42501", FATAL),  # insufficient_privilege
    ("42601", FATAL),  # syntax_error
    ("28000", FATAL),  # invalid_authorization_specification
    ("28P01", FATAL),  # invalid_password
    ("3D000", FATAL),  # invalid_catalog_name
    ("3F000", FATAL),  # invalid_schema_name
    # fatal: everything not in the table
    ("0A000", FATAL),  # feature_not_supported
    ("XX000", FATAL),  # internal_error
    ("57P04", FATAL),  # database_dropped
    ("25P02", FATAL),  # in_failed_sql_transaction (a bug in spr)
]


@pytest.mark.parametrize(("sqlstate", "expected"), SQLSTATE_ROWS)
def test_postgres_errors_by_sqlstate(sqlstate: str, expected: ErrorClass) -> None:
    error_type = psycopg.errors.lookup(sqlstate)
    error = error_type("server said no")
    assert error.sqlstate == sqlstate
    assert classify(error) is expected
    assert classify_sqlstate(sqlstate) is expected
    assert classify_sqlstate(sqlstate.lower()) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # Raised by psycopg itself, without a server error.
        (psycopg.OperationalError("connection refused"), TRANSIENT),
        (psycopg.errors.ConnectionTimeout("connection timeout expired"), TRANSIENT),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), DATA),
        (psycopg.InterfaceError("the cursor is closed"), FATAL),
        (psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters"), FATAL),
        (psycopg.Error("something else"), FATAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_postgres_errors_without_sqlstate(error: psycopg.Error, expected: ErrorClass) -> None:
    assert error.sqlstate is None
    assert classify(error) is expected


def test_a_missing_sqlstate_is_not_decided_by_the_sqlstate_table() -> None:
    assert classify_sqlstate(None) is FATAL
    assert classify_sqlstate("") is FATAL


KAFKA_ROWS = [
    # transient: the network and the cluster moving
    (KafkaError._TRANSPORT, False, False, TRANSIENT),
    (KafkaError._ALL_BROKERS_DOWN, False, False, TRANSIENT),
    (KafkaError._TIMED_OUT, False, False, TRANSIENT),
    (KafkaError._MSG_TIMED_OUT, False, False, TRANSIENT),
    (KafkaError._RESOLVE, False, False, TRANSIENT),
    (KafkaError._QUEUE_FULL, False, False, TRANSIENT),
    (KafkaError._WAIT_COORD, False, False, TRANSIENT),
    (KafkaError._PARTITION_EOF, False, False, TRANSIENT),
    (KafkaError._UNKNOWN_TOPIC, False, False, TRANSIENT),
    (KafkaError.UNKNOWN_TOPIC_OR_PART, False, False, TRANSIENT),
    (KafkaError.REQUEST_TIMED_OUT, False, False, TRANSIENT),
    (KafkaError.NETWORK_EXCEPTION, False, False, TRANSIENT),
    (KafkaError.LEADER_NOT_AVAILABLE, False, False, TRANSIENT),
    (KafkaError.NOT_LEADER_FOR_PARTITION, False, False, TRANSIENT),
    (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, False, False, TRANSIENT),
    (KafkaError.NOT_ENOUGH_REPLICAS, False, False, TRANSIENT),
    (KafkaError.REBALANCE_IN_PROGRESS, False, False, TRANSIENT),
    (KafkaError._MAX_POLL_EXCEEDED, False, False, TRANSIENT),  # the next poll rejoins
    # any other code flagged retriable by librdkafka
    (KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, False, True, TRANSIENT),
    # invalid: a record the client could not read
    (KafkaError._BAD_MSG, False, False, INVALID),
    (KafkaError._BAD_COMPRESSION, False, False, INVALID),
    (KafkaError._VALUE_DESERIALIZATION, False, False, INVALID),
    (KafkaError.INVALID_MSG, False, False, INVALID),
    # data: a record the broker refused
    (KafkaError.MSG_SIZE_TOO_LARGE, False, False, DATA),
    (KafkaError.INVALID_RECORD, False, False, DATA),
    (KafkaError.RECORD_LIST_TOO_LARGE, False, False, DATA),
    # fatal: credentials, authorization, configuration, fencing
    (KafkaError._AUTHENTICATION, False, False, FATAL),
    (KafkaError.SASL_AUTHENTICATION_FAILED, False, False, FATAL),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, False, False, FATAL),
    (KafkaError.GROUP_AUTHORIZATION_FAILED, False, False, FATAL),
    (KafkaError._SSL, False, False, FATAL),
    (KafkaError._INVALID_ARG, False, False, FATAL),
    (KafkaError.TOPIC_EXCEPTION, False, False, FATAL),
    (KafkaError.PRODUCER_FENCED, False, False, FATAL),
    # the fatal flag wins over everything, even a transient code
    (KafkaError._TRANSPORT, True, False, FATAL),
    (KafkaError._FENCED, True, False, FATAL),
    (KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, True, True, FATAL),
    # the table wins over the retriable flag
    (KafkaError.MSG_SIZE_TOO_LARGE, False, True, DATA),
    # unknown and not retriable
    (KafkaError.UNKNOWN, False, False, FATAL),
    (KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, False, False, FATAL),
]


@pytest.mark.parametrize(("code", "fatal", "retriable", "expected"), KAFKA_ROWS)
def test_kafka_errors(code: int, fatal: bool, retriable: bool, expected: ErrorClass) -> None:
    error = KafkaError(code, "broker said no", fatal=fatal, retriable=retriable)
    assert error.fatal() is fatal and error.retriable() is retriable
    assert classify_kafka_error(error) is expected
    assert classify(error) is expected
    assert classify(KafkaException(error)) is expected


def test_kafka_exception_subclasses_and_bare_exceptions() -> None:
    consume_error = ConsumeError(KafkaError(KafkaError._BAD_MSG, "corrupt"))
    assert classify(consume_error) is INVALID
    assert classify(KafkaException()) is FATAL
    assert classify(KafkaException("not a KafkaError")) is FATAL


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidEvent("value is empty"), INVALID),
        (ServerUnavailable("Kafka is not reachable"), TRANSIENT),
        (DeadLetterUnavailable("the DLQ is gone"), FATAL),
        (ConfigError("bad setting"), FATAL),
        (ToolMissing("java is missing"), FATAL),
        (SprError("something spr did not foresee"), FATAL),
        (TimeoutError("timed out"), TRANSIENT),
        (ConnectionResetError("reset by peer"), TRANSIENT),
        (ConnectionRefusedError("refused"), TRANSIENT),
        (OSError("no space left on device"), FATAL),
        (ValueError("a bug"), FATAL),
        (KeyError("a bug"), FATAL),
        (MemoryError(), FATAL),
        (RuntimeError("unknown"), FATAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_spr_and_python_errors(error: BaseException, expected: ErrorClass) -> None:
    assert classify(error) is expected


def test_decoding_errors_are_invalid() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(b"{not json", offset=0, timestamp_ms=0)
    assert classify(caught.value) is INVALID


def test_error_class_values_are_the_header_values() -> None:
    assert [str(c) for c in ErrorClass] == [
        "invalid",
        "transient",
        "data",
        "fatal",
        "unorderable",
        "misrouted",
    ]
    assert ErrorClass("data") is DATA


def test_error_reason_is_one_bounded_line() -> None:
    assert error_reason(InvalidEvent("value is empty")) == "value is empty"
    pg = psycopg.errors.lookup("23505")("duplicate key value\nDETAIL: Key (id)=(1) exists.")
    assert error_reason(pg) == "PostgreSQL 23505: duplicate key value DETAIL: Key (id)=(1) exists."
    kafka = KafkaError(KafkaError._TRANSPORT, "connection\nrefused")
    assert error_reason(kafka) == "Kafka _TRANSPORT: connection refused"
    assert error_reason(KafkaException(kafka)) == "Kafka _TRANSPORT: connection refused"
    long = error_reason(ValueError("x" * 10_000), limit=50)
    assert len(long) == 50 and long.startswith("ValueError: xxx") and long.endswith("…")
