"""Dead-letter naming, header parsing and the ``spr dlq list`` text, without a broker."""

from __future__ import annotations

from collections import Counter

import pytest

from spr.cli import main as spr_main
from spr.dlq import (
    DeadLetter,
    DeadLetterSummary,
    PartitionSummary,
    dlq_topic_for,
    format_summary,
    redrive_group,
)


class FakeMessage:
    def __init__(self, headers: list[tuple[str, bytes | None]] | None, value: bytes | None) -> None:
        self._headers = headers
        self._value = value

    def topic(self) -> str:
        return "orders.dlq"

    def partition(self) -> int:
        return 1

    def offset(self) -> int:
        return 17

    def key(self) -> bytes:
        return b"key"

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers


def test_topic_and_group_names() -> None:
    assert dlq_topic_for("orders") == "orders.dlq"
    assert dlq_topic_for("orders", "all-dead-letters") == "all-dead-letters"
    assert dlq_topic_for("orders", "dlq.{topic}") == "dlq.orders"
    assert redrive_group("orders") == "spr-redrive.orders"
    assert redrive_group("orders", "data") == "spr-redrive.orders.data"


def test_dead_letter_parsing_keeps_original_headers_and_tolerates_foreign_ones() -> None:
    letter = DeadLetter.from_message(
        FakeMessage(
            [
                ("trace", b"1"),
                ("spr-error-class", b"data"),
                ("spr-error", b"PostgreSQL 23505: duplicate"),
                ("spr-source-topic", b"orders"),
                ("spr-source-partition", b"2"),
                ("spr-source-offset", b"99"),
                ("spr-attempts", b"3"),
                ("spr-redriven-from", b"orders.dlq:0:4"),
            ],
            b"{}",
        )
    )
    assert (letter.error_class, letter.error, letter.source_topic) == (
        "data",
        "PostgreSQL 23505: duplicate",
        "orders",
    )
    assert (letter.source_partition, letter.source_offset, letter.attempts) == (2, 99, 3)
    assert letter.headers == (("trace", b"1"), ("spr-redriven-from", b"orders.dlq:0:4"))
    assert (letter.dlq_partition, letter.dlq_offset) == (1, 17)

    foreign = DeadLetter.from_message(FakeMessage([("spr-source-offset", b"x")], None))
    assert (foreign.error_class, foreign.source_offset, foreign.source_partition) == (
        "unknown",
        -1,
        -1,
    )
    assert DeadLetter.from_message(FakeMessage(None, b"")).headers == ()


def test_format_summary_truncates_values() -> None:
    big = DeadLetter.from_message(
        FakeMessage(
            [("spr-error-class", b"invalid"), ("spr-error", b"too big"), ("spr-attempts", b"1")],
            b"y" * 5000,
        )
    )
    summary = DeadLetterSummary(
        "orders",
        "orders.dlq",
        exists=True,
        total=1,
        by_class=Counter({"invalid": 1}),
        by_partition={-1: PartitionSummary(count=1, first_source_offset=-1, last_source_offset=-1)},
        samples=[big],
    )
    text = format_summary(summary)
    assert text.splitlines()[-1] == "      value: " + repr("y" * 80) + "… (5000 bytes)"
    empty = DeadLetterSummary("orders", "orders.dlq", exists=True)
    assert format_summary(empty) == "0 dead letter(s) for 'orders' in 'orders.dlq'"


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert spr_main(["dlq", "list", "--topic", "t", "--samples", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "spr dlq: --samples must be 0 or more, got -1"
    with pytest.raises(SystemExit) as caught:
        spr_main(["dlq", "redrive", "--topic", "t", "--error-class", "bogus"])
    assert caught.value.code == 2


class _Future:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self, timeout: float | None = None) -> None:
        raise self.error


def test_topic_creation_uses_the_writers_connection_settings_and_wraps_any_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import concurrent.futures

    import spr.dlq.writer
    from spr.dlq import DeadLetterWriter, InvalidEventSink
    from spr.errors import DeadLetterUnavailable

    seen: list[dict[str, object]] = []

    class FakeAdmin:
        def __init__(self, conf: dict[str, object]) -> None:
            seen.append(conf)

        def create_topics(self, topics: list[object], **kw: object) -> dict[str, _Future]:
            return {"t.dlq": _Future(concurrent.futures.TimeoutError())}

    monkeypatch.setattr(spr.dlq.writer, "AdminClient", FakeAdmin)
    connection = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "u",
        "sasl.password": "p",
        "client.id": "me",
    }
    writer = DeadLetterWriter(bootstrap="127.0.0.1:1", producer_config=connection)
    with pytest.raises(DeadLetterUnavailable, match=r"cannot create dead-letter topic 't\.dlq'"):
        writer._create("t.dlq", 1)
    conf = seen[0]
    assert {k: conf[k] for k in connection} == connection
    assert conf["bootstrap.servers"] == "127.0.0.1:1"
    assert "acks" not in conf and "enable.idempotence" not in conf

    # The engine's hook turns any other error of the writer into DeadLetterUnavailable.
    class Broken:
        def send(self, *args: object) -> None:
            raise RuntimeError("boom")

        def flush(self, timeout: float) -> None:
            raise concurrent.futures.TimeoutError()

    hook = InvalidEventSink(Broken())  # type: ignore[arg-type]
    with pytest.raises(DeadLetterUnavailable, match="could not be queued"):
        hook.send(object(), "bad")
    with pytest.raises(DeadLetterUnavailable, match="could not be flushed"):
        hook.flush()
