"""The engine's failure handling with fakes (no servers): retries while paused, the
circuit breaker, fatal errors, and an unwritable dead-letter topic."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from test_engine_logic import FakeConsumer, FakeSink, Msg, assign, ev, make_engine

from spr.config import BatchPolicy, BreakerPolicy
from spr.engine import FlushFailed
from spr.errors import DeadLetterUnavailable, ServerUnavailable
from spr.retry import CircuitState
from spr.sink.postgres import FlushResult


class FlakySink(FakeSink):
    """Fails its first ``failures`` flushes with ``error``, then works."""

    def __init__(self, failures: int, error: BaseException) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.attempts = 0

    def flush(self, batch: Any) -> FlushResult:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        return super().flush(batch)


def watch(log: list[Any]) -> Any:
    """A script step that records (paused partitions, circuit state) and, like a real
    consume() with nothing to return, takes its timeout (2 ms)."""

    def step(consumer: FakeConsumer) -> list[Msg]:
        time.sleep(0.002)
        engine = consumer.engine_ref[0]
        log.append((set(consumer.paused), engine.circuit_state))
        return []

    return step


def test_transient_failures_are_retried_with_partitions_paused() -> None:
    sink = FlakySink(3, ServerUnavailable("connection refused"))
    seen: list[Any] = []
    script = [assign(("t", 0), ("t", 1)), [ev("t", 0, 0, "a", 1)]]
    script += [watch(seen)] * 200
    engine, _ = make_engine(script, sink, batch=BatchPolicy(max_rows=1),
                                   breaker=BreakerPolicy(minimum_calls=10, window_size=10))  # fmt: skip
    stats = engine.run()
    assert sink.attempts == 4 and stats.flush_retries == 3 and stats.flushes == 1
    assert sink.stored == {("t", 0): 1} and sink.rows == {"a": (1, "s")}
    # The loop kept polling while it waited, with every partition paused, then resumed.
    paused = [p for p, _ in seen]
    assert {("t", 0), ("t", 1)} in paused and paused[-1] == set()
    assert stats.circuit_state == 0


def test_the_breaker_opens_pauses_everything_and_a_probe_closes_it() -> None:
    sink = FlakySink(4, psycopg.OperationalError("server closed the connection"))
    seen: list[Any] = []
    script = [assign(("t", 0), ("t", 1)), [ev("t", 1, 0, "a", 1)]]
    script += [watch(seen)] * 400
    breaker = BreakerPolicy(minimum_calls=2, window_size=4, cool_down=0.02)
    engine, _ = make_engine(script, sink, batch=BatchPolicy(max_rows=1), breaker=breaker)
    stats = engine.run()
    states = [s for _, s in seen]
    assert CircuitState.OPEN in states and states[-1] is CircuitState.CLOSED
    assert all(p == {("t", 0), ("t", 1)} for p, s in seen if s is CircuitState.OPEN)
    assert stats.circuit_opens >= 1 and stats.flushes == 1 and sink.stored == {("t", 1): 1}


def test_a_fatal_database_error_stops_at_once_with_nothing_committed() -> None:
    sink = FlakySink(99, psycopg.errors.UndefinedTable("relation does not exist"))
    script = [assign(("t", 0)), [ev("t", 0, 0, "a", 1)], [], [], []]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=1))
    with pytest.raises(FlushFailed, match="relation does not exist"):
        engine.run()
    assert sink.attempts == 1 and consumer.commits == [] and sink.stored == {}


def test_the_retry_budget_ends_in_a_clear_failure() -> None:
    sink = FlakySink(10**6, ServerUnavailable("connection refused"))
    script: list[Any] = [assign(("t", 0)), [ev("t", 0, 0, "a", 1)]] + [[]] * 10_000
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=1),
                                   flush_retry_s=0.3)  # fmt: skip
    with pytest.raises(FlushFailed, match=r"stayed unavailable for 0\.3 s"):
        engine.run()
    assert sink.attempts > 1 and consumer.commits == [] and sink.stored == {}


class BrokenDeadLetters:
    def __init__(self, *, fail_on_send: bool) -> None:
        self.fail_on_send = fail_on_send
        self.sent: list[Any] = []

    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None:
        if self.fail_on_send:
            raise DeadLetterUnavailable("dead-letter topic 't.dlq' cannot be created")
        self.sent.append(message)

    def flush(self) -> None:
        raise DeadLetterUnavailable("1 dead letter(s) could not be written: too large")


@pytest.mark.parametrize("fail_on_send", [True, False], ids=["send", "flush"])
def test_an_unwritable_dead_letter_topic_stops_before_the_offset_moves(fail_on_send: bool) -> None:
    sink = FakeSink()
    bad = Msg("t", 0, 1, b"{not json")
    script = [assign(("t", 0)), [ev("t", 0, 0, "a", 1), bad, ev("t", 0, 2, "b", 1)], [], []]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=10))
    engine._dead_letters = BrokenDeadLetters(fail_on_send=fail_on_send)
    with pytest.raises(DeadLetterUnavailable, match=r"dead.letter"):
        engine.run()
    assert sink.stored == {} and consumer.commits == [] and sink.flushes == []


def test_breaker_and_dead_letter_settings_load_from_file_env_and_flags(tmp_path: Any) -> None:
    from spr.config import load_engine_config

    path = tmp_path / "spr.toml"
    path.write_text('group = "g"\ntopics = ["t"]\n[breaker]\ncool_down = 1.5\nminimum_calls = 3\n')
    config = load_engine_config(file=path, environ={"SPR_DLQ_TOPIC": "{topic}.dead"})
    assert config.breaker == BreakerPolicy(cool_down=1.5, minimum_calls=3)
    assert config.dead_letters is True and config.dlq_topic == "{topic}.dead"
    off = load_engine_config(file=path, environ={}, flags={"dead_letters": False})
    assert off.dead_letters is False and off.dlq_topic is None
    assert off.retry_policy.max_elapsed == off.flush_retry_s
