"""Dead-letter topics that would loop, and letters from several consumer groups, without
a broker (issue 11, data risks 2 and 3; the real-broker tests are in
``tests/integration/test_dlq_groups.py``)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from spr.cli import main as spr_main
from spr.config import EngineConfig
from spr.dlq import (
    DEAD_LETTER_HEADERS,
    DeadLetter,
    DeadLetterSummary,
    DeadLetterWriter,
    SourceRecord,
    dead_letter_sink,
    format_summary,
    redrive,
)
from spr.errors import ConfigError, DeadLetterUnavailable

NOWHERE = "127.0.0.1:1"


@pytest.mark.parametrize(
    ("topics", "dlq_topic", "sentence"),
    [
        (
            ("orders",),
            "orders",
            "the dead-letter topic of 'orders' is 'orders' itself, so every dead letter "
            "would be consumed and dead-lettered again without end; choose another "
            "--dlq-topic (the default is 'orders.dlq')",
        ),
        (
            ("orders", "users"),
            "{topic}",
            "the dead-letter topic of 'orders' is 'orders' itself, so every dead letter "
            "would be consumed and dead-lettered again without end; choose another "
            "--dlq-topic (the default is 'orders.dlq')",
        ),
        (
            ("orders", "users"),
            "users",
            "the dead-letter topic of 'orders' is 'users', which this run also consumes, "
            "so its dead letters would be read back as events; choose a --dlq-topic that "
            "is not a source topic",
        ),
        (
            ("orders", "orders.dlq"),
            None,
            "the dead-letter topic of 'orders' is 'orders.dlq', which this run also "
            "consumes, so its dead letters would be read back as events; choose a "
            "--dlq-topic that is not a source topic",
        ),
        (
            ("a", "dlq-a"),
            "dlq-{topic}",
            "the dead-letter topic of 'a' is 'dlq-a', which this run also consumes, so "
            "its dead letters would be read back as events; choose a --dlq-topic that is "
            "not a source topic",
        ),
        (("orders",), "", "--dlq-topic must name a topic (the default is <topic>.dlq), got ''"),
        (("orders",), 7, "--dlq-topic must name a topic (the default is <topic>.dlq), got 7"),
    ],
)
def test_a_dead_letter_topic_the_run_consumes_is_refused_when_configured(
    topics: tuple[str, ...], dlq_topic: object, sentence: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        EngineConfig(group_id="g", topics=topics, dlq_topic=dlq_topic)  # type: ignore[arg-type]
    assert str(caught.value) == sentence


def test_dead_letter_topics_that_do_not_loop_are_accepted() -> None:
    config = EngineConfig(group_id="g", topics=("orders", "users"), dlq_topic="dlq.{topic}")
    assert config.dead_letter_topics() == {"orders": "dlq.orders", "users": "dlq.users"}
    shared = EngineConfig(group_id="g", topics=("orders", "users"), dlq_topic="all-dead")
    assert shared.dead_letter_topics() == {"orders": "all-dead", "users": "all-dead"}
    # With dead letters off nothing is written anywhere, so nothing can loop.
    EngineConfig(group_id="g", topics=("orders",), dlq_topic="orders", dead_letters=False)


def test_spr_run_refuses_it_with_one_sentence_before_touching_a_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    argv = ["run", "--topic", "T", "--group", "G", "--dlq-topic", "T"]
    argv += ["--bootstrap", NOWHERE, "--dsn", "postgresql://spr@127.0.0.1:1/spr"]
    assert spr_main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "spr run: the dead-letter topic of 'T' is 'T' itself, so every dead letter would "
        "be consumed and dead-lettered again without end; choose another --dlq-topic "
        "(the default is 'T.dlq')\n"
    )
    assert time.monotonic() - started < 5  # nothing waited for a server


class _NoServer(DeadLetterWriter):
    """A writer that fails the test if it looks up or creates any topic."""

    def ensure_topic(self, source_topic: str) -> tuple[str, int]:
        raise AssertionError("the writer looked up a dead-letter topic")


def test_the_writer_refuses_to_write_into_a_topic_its_run_consumes() -> None:
    record = SourceRecord(topic="orders", partition=0, offset=7, key=b"k", value=b"{")
    itself = _NoServer(bootstrap=NOWHERE, dlq_topic="{topic}")
    with pytest.raises(DeadLetterUnavailable) as caught:
        itself.send(record, "invalid", "not valid JSON", attempts=1)
    assert str(caught.value) == (
        "refusing to write a dead letter of 'orders' into 'orders', its own source topic: "
        "it would be consumed and dead-lettered again without end"
    )
    other = _NoServer(bootstrap=NOWHERE, dlq_topic="users", source_topics=("orders", "users"))
    with pytest.raises(DeadLetterUnavailable) as caught:
        other.send(record, "invalid", "not valid JSON", attempts=1)
    assert str(caught.value) == (
        "refusing to write a dead letter of 'orders' into 'users', a topic this run "
        "consumes: it would be consumed and dead-lettered again without end"
    )
    assert itself.sent == other.sent == 0


def test_the_engines_sink_names_its_group_and_guards_its_topics() -> None:
    config = EngineConfig(
        group_id="billing", topics=("orders", "users"), bootstrap=NOWHERE, dlq_topic="dead"
    )
    sink = dead_letter_sink(config)
    assert sink is not None
    assert sink.writer.group == "billing"
    assert sink.writer.source_topics == {"orders", "users"}
    assert "spr-group" in DEAD_LETTER_HEADERS  # reserved: an original one is replaced


class FakeMessage:
    def __init__(self, headers: list[tuple[str, bytes | None]]) -> None:
        self._headers = headers

    def topic(self) -> str:
        return "orders.dlq"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 3

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"{"

    def headers(self) -> list[tuple[str, bytes | None]]:
        return self._headers


def test_a_letter_reads_back_its_group_or_unknown() -> None:
    spr_headers: list[tuple[str, bytes | None]] = [
        ("trace", b"1"),
        ("spr-error-class", b"invalid"),
        ("spr-source-topic", b"orders"),
        ("spr-source-partition", b"2"),
        ("spr-source-offset", b"40"),
    ]
    letter = DeadLetter.from_message(FakeMessage([*spr_headers, ("spr-group", b"billing")]))
    assert letter.group == "billing"
    assert letter.headers == (("trace", b"1"),)
    assert letter.source_position == ("orders", 2, 40)
    assert DeadLetter.from_message(FakeMessage(spr_headers)).group == "unknown"
    assert DeadLetter.from_message(FakeMessage([("spr-group", b"")])).group == "unknown"
    assert DeadLetter.from_message(FakeMessage([("spr-group", None)])).group == "unknown"
    assert DeadLetter.from_message(FakeMessage([])).source_position is None


def test_the_summary_shows_letters_by_group() -> None:
    summary = DeadLetterSummary(
        "orders",
        "orders.dlq",
        exists=True,
        total=3,
        by_class=Counter({"invalid": 3}),
        by_group=Counter({"billing": 2, "search": 1}),
    )
    lines = format_summary(summary).splitlines()
    assert lines[:6] == [
        "3 dead letter(s) for 'orders' in 'orders.dlq'",
        "by error class:",
        "  invalid    3",
        "by consumer group:",
        "  billing    2",
        "  search     1",
    ]
    only = DeadLetterSummary("orders", "orders.dlq", exists=True, group="billing")
    assert (
        format_summary(only) == "0 dead letter(s) for 'orders' from group 'billing' in 'orders.dlq'"
    )


def test_redrive_refuses_a_dead_letter_topic_that_is_its_source() -> None:
    with pytest.raises(
        ConfigError, match=r"^the dead-letter topic of 'orders' is 'orders' itself;"
    ):
        redrive(bootstrap=NOWHERE, source_topic="orders", dlq_topic="{topic}")
