"""Structured logs: secrets never reach a log line; JSON lines are one object per line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from spr.logs import (
    REDACTED,
    configure_logging,
    is_secret_key,
    log_event,
    redact,
    redact_config,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql://spr:hunter2@127.0.0.1:55432/spr",
            "postgresql://spr:***@127.0.0.1:55432/spr",
        ),
        ("postgres://u:p%40ss@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require"),
        ("postgresql://:onlypass@db/x", "postgresql://:***@db/x"),
        ("host=db password=hunter2 user=spr", "host=db password=*** user=spr"),
        ("host=db password='two words' user=spr", "host=db password=*** user=spr"),
        ("host=db PASSWORD = hunter2", "host=db PASSWORD = ***"),
        (
            "postgresql://db/x?password=hunter2&sslmode=require",
            "postgresql://db/x?password=***&sslmode=require",
        ),
        ("sasl.password=hunter2 sasl.username=u", "sasl.password=*** sasl.username=u"),
        ("sasl.oauthbearer.client.secret=abc", "sasl.oauthbearer.client.secret=***"),
        ("ssl.key.password: abc", "ssl.key.password: ***"),
        ('{"password": "hunter2", "user": "u"}', '{"password": ***, "user": "u"}'),
    ],
)
def test_redact_masks_secrets(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "hunter2" not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://spr@127.0.0.1:55432/spr",
        "http://127.0.0.1:9464/metrics",
        "rebalance assigned=orders[0],orders[1]",
        "user@example.com wrote at 12:30",
    ],
)
def test_redact_leaves_innocent_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_config_masks_secret_keys_and_dsns_under_any_key() -> None:
    config = {
        "bootstrap.servers": "b:9092",
        "sasl.password": "p1",
        "sasl.oauthbearer.client.secret": "p2",
        "ssl.key.password": "p3",
        "sasl.oauthbearer.config": "clientId=x clientSecret=p4",
        "dsn": "postgresql://spr:p5@db/spr",
        "nested": {"password": "p6", "ok": 1},
        "linger.ms": 5,
        "unset.password": None,
    }
    safe = redact_config(config)
    assert safe["bootstrap.servers"] == "b:9092"
    for key in ("sasl.password", "sasl.oauthbearer.client.secret", "ssl.key.password"):
        assert safe[key] == REDACTED
    assert safe["sasl.oauthbearer.config"] == REDACTED
    assert safe["dsn"] == "postgresql://spr:***@db/spr"
    assert safe["nested"] == {"password": REDACTED, "ok": 1}
    assert safe["linger.ms"] == 5
    assert safe["unset.password"] is None
    assert config["sasl.password"] == "p1"  # the input is untouched
    assert all(f"p{i}" not in json.dumps(safe) for i in range(1, 7))
    assert is_secret_key("SASL.PASSWORD") and not is_secret_key("sasl.username")


@pytest.fixture
def spr_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("spr")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logging.getLogger("spr.engine")
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_json_lines_one_object_per_event(spr_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging(True, stream=out)
    configure_logging(True, stream=out)  # a second call replaces, never doubles
    log_event(spr_logger, "rebalance", kind="assign", partitions=[["orders", 0], ["orders", 1]])
    log_event(
        spr_logger,
        "circuit",
        level=logging.WARNING,
        state="open",
        dsn="postgresql://spr:hunter2@db/spr",
        password="hunter2",
    )
    spr_logger.info("connected to %s", "host=db password=hunter2")
    try:
        raise RuntimeError("cannot reach postgresql://spr:hunter2@db/spr")
    except RuntimeError:
        spr_logger.exception("flush failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert records[0]["event"] == "rebalance"
    assert records[0]["kind"] == "assign"
    assert records[0]["partitions"] == [["orders", 0], ["orders", 1]]
    assert records[0]["level"] == "info" and records[0]["logger"] == "spr.engine"
    assert records[0]["ts"].endswith("+00:00")
    assert records[1]["event"] == "circuit" and records[1]["level"] == "warning"
    assert records[1]["dsn"] == "postgresql://spr:***@db/spr"
    assert records[1]["password"] == REDACTED
    assert "event" not in records[2]
    assert records[2]["msg"] == "connected to host=db password=***"
    assert "RuntimeError" in records[3]["exc"]
    assert "hunter2" not in out.getvalue()


def test_text_lines_are_redacted_too(spr_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging(False, stream=out)
    log_event(spr_logger, "pause", partitions=["orders[0]"], reason="slow flush")
    spr_logger.warning("dsn is postgresql://spr:hunter2@db/spr")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith('spr.engine pause partitions=["orders[0]"] reason="slow flush"')
    assert "postgresql://spr:***@db/spr" in lines[1]
    assert "hunter2" not in out.getvalue()


def test_log_event_costs_nothing_when_disabled(spr_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging(True, stream=out, level=logging.WARNING)
    log_event(spr_logger, "resume", partitions=["orders[0]"])
    assert out.getvalue() == ""
