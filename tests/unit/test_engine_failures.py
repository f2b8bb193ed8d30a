"""The engine's failure handling with fakes (no servers): retries while paused, the
circuit breaker, fatal errors, and an unwritable dead-letter topic."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from test_engine_logic import FakeConsumer, FakeSink, Msg, assign, ev, make_engine, tp

from spr.config import BatchPolicy, BreakerPolicy
from spr.engine import FlushFailed
from spr.errors import ConfigError, DeadLetterUnavailable, ServerUnavailable, SprError
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


# -- reviewer findings: nothing committed after an unexpected stop (finding 1) -------------


class FatalKafkaError:
    """A fatal librdkafka error, as message.error() returns it."""

    def code(self) -> int:
        return -150  # _FATAL

    def fatal(self) -> bool:
        return True

    def retriable(self) -> bool:
        return False

    def str(self) -> str:
        return "fatal broker error"

    def name(self) -> str:
        return "_FATAL"


class ErrorMsg:
    def __init__(self, error: Any, topic: str = "t", partition: int = 0, offset: int = -1) -> None:
        self._e, self._t, self._p, self._o = error, topic, partition, offset

    def error(self) -> Any:
        return self._e

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, str, str]] = []
        self.flushes = 0

    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None:
        self.sent.append((message, reason, error_class))

    def flush(self) -> None:
        self.flushes += 1


def test_a_fatal_kafka_error_dead_letters_the_invalid_events_and_commits_nothing() -> None:
    sink = FakeSink()
    script = [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1)],
        [],
        # An invalid event, a valid one, and a fatal error in one consume() result.
        [Msg("t", 0, 1, b"not json"), ev("t", 0, 2, "b", 1), ErrorMsg(FatalKafkaError())],
    ]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=100))
    dead = RecordingDeadLetters()
    engine._dead_letters = dead
    with pytest.raises(ServerUnavailable, match="fatal broker error"):
        engine.run()
    # The invalid event was dead-lettered before the engine stopped ...
    assert [m.offset() for m, _, _ in dead.sent] == [1]
    # ... and nothing past the first batch was committed (not by close()'s final revoke).
    assert sink.stored == {("t", 0): 1} and "b" not in sink.rows
    assert all(c[("t", 0)] <= 1 for c in consumer.commits)


class ExplodingDeadLetters(RecordingDeadLetters):
    def send(self, message: Any, reason: str, *, error_class: str = "invalid") -> None:
        raise TimeoutError()  # not DeadLetterUnavailable


def test_an_unexpected_dead_letter_error_commits_nothing() -> None:
    sink = FakeSink()
    script = [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1), Msg("t", 0, 1, b"not json"), ev("t", 0, 2, "b", 1)],
    ]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=100))
    engine._dead_letters = ExplodingDeadLetters()
    with pytest.raises(TimeoutError):
        engine.run()
    assert sink.stored == {} and sink.flushes == [] and consumer.commits == []


def test_an_interrupt_commits_nothing_more_but_a_graceful_stop_flushes() -> None:
    def interrupt(consumer: FakeConsumer) -> list[Msg]:
        raise KeyboardInterrupt

    sink = FakeSink()
    sink.block.clear()  # the first flush waits, so the next batch is still pending
    threading.Timer(0.3, sink.block.set).start()
    script = [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1)],
        [],  # the first flush starts
        [ev("t", 0, 1, "b", 1), ev("t", 0, 2, "c", 1)],
        interrupt,
    ]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=100))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert sink.stored.get(("t", 0), 0) <= 1 and "b" not in sink.rows
    assert all(c[("t", 0)] <= 1 for c in consumer.commits)

    # The stop flag (SIGTERM/SIGINT in `spr run`) still flushes and commits everything.
    def stop(consumer: FakeConsumer) -> list[Msg]:
        consumer.engine_ref[0].stop()
        return []

    sink = FakeSink()
    script = [assign(("t", 0)), [ev("t", 0, 0, "a", 1), ev("t", 0, 1, "b", 1)], stop]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=100))
    engine.run()
    assert sink.stored == {("t", 0): 2} and consumer.commits[-1] == {("t", 0): 2}


# -- a rollback never jumps to the logical end (finding 4) ---------------------------------


def _rollback_script(sink: FakeSink) -> list[Any]:
    def revoke(consumer: FakeConsumer) -> list[Any]:
        consumer.callbacks["on_revoke"](consumer, [tp("t", 1)])  # over budget: rolls back
        sink.block.set()
        return []

    return [
        assign(("t", 0), ("t", 1)),
        [ev("t", 0, 50, "a", 1), ev("t", 1, 0, "b", 1)],
        [],  # the flush starts and blocks
        revoke,
        [],
    ]


@pytest.mark.parametrize("end_known", [True, False], ids=["resolved", "first-consumed"])
def test_a_rollback_rewinds_a_latest_partition_to_where_it_started(end_known: bool) -> None:
    sink = FakeSink(stored={("t", 1): 0})
    sink.block.clear()

    def watermarks(keys: Any, latest: bool) -> dict[tuple[str, int], int]:
        if not end_known:
            raise RuntimeError("no answer")
        return {key: 50 for key in keys} if latest else {}

    engine, consumer = make_engine(
        _rollback_script(sink), sink, batch=BatchPolicy(max_rows=1), revoke_budget_ms=300,
        kafka={"auto.offset.reset": "latest"}, watermarks=watermarks,
    )  # fmt: skip
    engine.run()
    seeks = [s for s in consumer.seeks if s[:2] == ("t", 0)]
    assert seeks and all(offset == 50 for _, _, offset in seeks)  # never -1 (OFFSET_END)
    assert engine.stats().rollbacks == 1


def test_librdkafka_never_resets_by_itself_but_auto_offset_reset_still_picks_the_start() -> None:
    sink = FakeSink()
    engine, consumer = make_engine([assign(("t", 0))], sink, kafka={"auto.offset.reset": "latest"})
    given: list[dict[str, Any]] = []
    engine._consumer_factory = lambda conf: given.append(conf) or consumer  # type: ignore[func-returns-value]
    engine.run()
    assert given[0]["auto.offset.reset"] == "error"
    assert consumer.commits == [] and sink.stored == {}
    # Unknown partition, end offset unknown (the fake): the logical end, as the user chose.
    engine2, consumer2 = make_engine([assign(("t", 0))], FakeSink(),
                                     kafka={"auto.offset.reset": "latest"})  # fmt: skip
    seen: dict[tuple[str, int], int] = {}
    original = consumer2.incremental_assign

    def record(parts: list[Any]) -> None:
        seen.update({(p.topic, p.partition): p.offset for p in parts})
        original(parts)

    consumer2.incremental_assign = record  # type: ignore[method-assign]
    engine2.run()
    assert seen == {("t", 0): -1}


# -- a retention gap found by the fetcher mid-run (finding 3) ------------------------------


class KafkaErr:
    def __init__(self, code: int, text: str) -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return False

    def retriable(self) -> bool:
        return False

    def str(self) -> str:
        return self._text

    def name(self) -> str:
        return str(self._code)


class GapSink(FakeSink):
    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[dict[str, Any]] = []

    def record_offset_gap(self, group: str, topic: str, partition: int, **kw: Any) -> None:
        self.gaps.append(
            {"topic": topic, "partition": partition, "stored_at_record": dict(self.stored), **kw}
        )
        key = (topic, partition)
        self.stored[key] = max(self.stored.get(key, 0), kw["resume_offset"])


def _gap_script() -> list[Any]:
    out_of_range = KafkaErr(
        -140, "fetch failed due to requested offset not available on the broker"
    )
    return [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1), ev("t", 0, 1, "b", 1), ev("t", 0, 2, "c", 1),
         ErrorMsg(out_of_range, offset=3)],
        [ev("t", 0, 10, "d", 1)],
    ]  # fmt: skip


def test_a_mid_run_retention_gap_stops_by_default() -> None:
    sink = GapSink()
    engine, consumer = make_engine(_gap_script(), sink, batch=BatchPolicy(max_rows=100),
                                   watermarks=lambda keys, latest: {k: 10 for k in keys})  # fmt: skip
    with pytest.raises(ConfigError, match=r"t\[0\].*7 event\(s\) were deleted by retention"):
        engine.run()
    assert sink.stored == {} and consumer.commits == [] and sink.gaps == []


def test_a_mid_run_retention_gap_is_skipped_recorded_and_counted_when_allowed() -> None:
    sink = GapSink()
    engine, consumer = make_engine(_gap_script(), sink, batch=BatchPolicy(max_rows=100),
                                   on_offset_gap="earliest",
                                   watermarks=lambda keys, latest: {k: 10 for k in keys})  # fmt: skip
    reassigned: list[Any] = []
    original = consumer.incremental_assign

    def record(parts: list[Any]) -> None:
        reassigned.append([(p.topic, p.partition, p.offset) for p in parts])
        original(parts)

    consumer.incremental_assign = record  # type: ignore[method-assign]
    stats = engine.run()
    assert reassigned[-1] == [("t", 0, 10)]  # fetching again at the log start
    # The events below the gap were committed before the gap moved the offset past it.
    assert sink.gaps == [{"topic": "t", "partition": 0, "stored_at_record": {("t", 0): 3},
                          "stored_offset": 3, "log_start": 10, "resumed_at": "earliest",
                          "resume_offset": 10}]  # fmt: skip
    assert stats.offset_gaps == 1 and stats.offset_gap_events == 7
    assert sink.stored == {("t", 0): 11} and set(sink.rows) == {"a", "b", "c", "d"}


# -- records the client could not read are dead-lettered (finding 5) -----------------------


def _bad_record_script() -> list[Any]:
    bad = KafkaErr(-199, "Local: Bad message format")  # _BAD_MSG
    return [
        assign(("t", 0)),
        [ev("t", 0, 0, "a", 1), ErrorMsg(bad, offset=1)],
        [ev("t", 0, 2, "b", 1), ErrorMsg(bad, offset=3)],
    ]


def test_an_unreadable_record_is_dead_lettered_before_its_offset_moves() -> None:
    from spr.dlq import SourceRecord

    sink = FakeSink()
    engine, _consumer = make_engine(_bad_record_script(), sink, batch=BatchPolicy(max_rows=100))
    dead = RecordingDeadLetters()
    engine._dead_letters = dead
    stats = engine.run()
    assert [(m, c) for m, _, c in dead.sent] == [
        (SourceRecord(topic="t", partition=0, offset=1), "invalid"),
        (SourceRecord(topic="t", partition=0, offset=3), "invalid"),
    ]
    assert all("Bad message format" in reason for _, reason, _ in dead.sent)
    assert dead.flushes >= 1 and stats.invalid == 2
    assert sink.stored == {("t", 0): 4}  # past the last one, once it was dead-lettered


def test_an_unreadable_record_without_dead_letters_stops_with_nothing_committed() -> None:
    sink = FakeSink()
    engine, consumer = make_engine(_bad_record_script(), sink, batch=BatchPolicy(max_rows=100))
    with pytest.raises(SprError, match=r"t\[0\]@1: Kafka could not read the record"):
        engine.run()
    assert sink.stored.get(("t", 0), 0) <= 1 and consumer.commits in ([], [{("t", 0): 1}])


# -- a dead connection cannot hang the engine (finding 6) -----------------------------------


def test_a_flush_stuck_past_the_statement_timeout_stops_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import spr.engine.flushing

    monkeypatch.setattr(spr.engine.flushing, "FLUSH_WATCHDOG_MARGIN_S", 0.2)
    sink = FakeSink()
    sink.block.clear()  # the flush never answers (a dead connection), for 10 s
    script: list[Any] = [assign(("t", 0)), [ev("t", 0, 0, "a", 1)]] + [watch([])] * 2_000
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=1),
                                   statement_timeout_ms=100)  # fmt: skip
    started = time.monotonic()
    try:
        with pytest.raises(FlushFailed, match="has not answered for"):
            engine.run()
        # Shutdown does not wait for the dead flush: watchdog (0.3 s) + a short close.
        assert time.monotonic() - started < 3 and consumer.commits == []
    finally:
        sink.block.set()


def test_a_flush_unfinished_at_shutdown_is_an_error_not_exit_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spr.engine import StatePipeline

    sink = FakeSink()
    script = [assign(("t", 0)), [ev("t", 0, 0, "a", 1)]]
    engine, consumer = make_engine(script, sink, batch=BatchPolicy(max_rows=100))
    monkeypatch.setattr(StatePipeline, "join", lambda self, timeout_s: False)
    with pytest.raises(FlushFailed, match=r"did not finish .* at shutdown"):
        engine.run()
    assert consumer.commits == []


def test_postgres_connections_get_keepalives_unless_the_dsn_sets_them() -> None:
    from spr.sink.postgres import PostgresSink

    options = PostgresSink("postgresql://u@h/db", statement_timeout_ms=5_000).connection_options()
    assert options == {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                       "keepalives_count": 3, "tcp_user_timeout": 15_000}  # fmt: skip
    mine = PostgresSink("host=h keepalives_idle=60 tcp_user_timeout=0").connection_options()
    assert "keepalives_idle" not in mine and "tcp_user_timeout" not in mine
