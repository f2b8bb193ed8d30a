"""The engine's stages on their own, and the defects the old single class hid.

Each test here names the defect it guards against (the architecture issue's list): a
dropped batch's latency samples riding on the next one, a later error overwriting the
first, a clock read behind the injected one, admin clients that ignored the user's
connection settings, and rules written more than once.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_engine_logic import FakeSink, Msg, assign, ev, make_engine

from spr.clock import FakeClock
from spr.config import BatchPolicy, connection_settings
from spr.decode import DEFAULT_LIMITS
from spr.dedup import IdempotencyRing
from spr.engine.failures import FirstFailure
from spr.engine.intake import Intake
from spr.engine.positions import OFFSET_BEGINNING, OFFSET_END, start_offset
from spr.engine.telemetry import EngineStats, Telemetry
from spr.errors import ConfigError, ServerUnavailable


def _intake() -> Intake:
    return Intake(BatchPolicy(), IdempotencyRing(64, 60_000), DEFAULT_LIMITS, sample_latency=True)


def test_a_dropped_batch_takes_its_latency_samples_with_it() -> None:
    intake = _intake()
    intake.ingest([ev("t", 0, 0, "a", 1), ev("t", 0, 1, "b", 1)], 1.0, {("t", 0)})
    intake.drop()  # a lost assignment abandons the batch
    intake.ingest([ev("t", 0, 0, "a", 1)], 2.0, {("t", 0)})
    pending = intake.take()
    assert pending.messages == 1 and sum(pending.weights) == 1
    assert len(pending.timestamps) == len(pending.weights)
    # drop() also forgot the ring: the redelivered event was not a duplicate.
    assert intake.duplicate == 0


def test_take_hands_off_everything_and_starts_empty() -> None:
    intake = _intake()
    intake.ingest([ev("t", 0, 0, "a", 1), Msg("t", 0, 1, b"nope")], 1.0, {("t", 0)})
    pending = intake.take()
    assert (pending.messages, pending.invalid, pending.events) == (2, 1, 1)
    assert pending.batch.next_offsets() == {("t", 0): 2}
    assert intake.messages == 0 and intake.invalid == 0 and intake.since_s is None
    assert intake.take().batch.next_offsets() == {}


def test_the_first_failure_wins() -> None:
    failure = FirstFailure()
    failure.fail(ServerUnavailable("first"))
    failure.fail(ConfigError("second"))
    with pytest.raises(ServerUnavailable, match="first"):
        failure.raise_if_failed()


def test_a_later_rebalance_error_does_not_replace_the_first() -> None:
    class FailingSink(FakeSink):
        def __init__(self) -> None:
            super().__init__()
            self.errors = [ConfigError("first: offsets unreadable"), ConfigError("second")]

        def load_offsets(self, group: str, topics: Any) -> dict[tuple[str, int], int]:
            raise self.errors.pop(0)

    def two_assigns(consumer: Any) -> list[Any]:
        assign(("t", 0))(consumer)
        assign(("t", 1))(consumer)  # fails again, differently, in the same consume()
        return []

    engine, consumer = make_engine([two_assigns], FailingSink())
    with pytest.raises(ServerUnavailable, match=r"offsets from PostgreSQL .*: first"):
        engine.run()
    assert consumer.commits == []


def test_latency_is_measured_on_the_injected_clock() -> None:
    from spr.metrics import MetricsPublisher, SprMetrics

    clock = FakeClock(wall_start=1_700_000_000.0)
    publisher = MetricsPublisher(SprMetrics(), clock=clock.monotonic)
    telemetry = Telemetry(
        publisher,
        clock=clock,
        topics=("t",),
        stats=EngineStats,
        admin=lambda: None,  # type: ignore[arg-type, return-value]
    )
    from array import array

    telemetry.observe_flush(array("q", [1_700_000_000_000 - 250]), array("q", [4]), 0.01)
    latency = telemetry.local.latency
    assert latency.count == 4 and latency.total == pytest.approx(4 * 0.25)


@pytest.mark.parametrize(
    ("stored", "reset", "start"),
    [
        (42, "error", 42),
        (None, "earliest", OFFSET_BEGINNING),
        (None, "smallest", OFFSET_BEGINNING),
        (None, "latest", OFFSET_END),
        (None, "LARGEST", OFFSET_END),
    ],
)
def test_one_start_rule(stored: int | None, reset: str, start: int) -> None:
    assert start_offset(stored, reset, ("t", 0)) == start


def test_the_start_rule_refuses_to_guess() -> None:
    with pytest.raises(ConfigError, match=r"no offset for t\[3\].*'error'"):
        start_offset(None, "error", ("t", 3))
    with pytest.raises(ConfigError, match=r"unknown auto\.offset\.reset"):
        start_offset(None, "sometimes", ("t", 3))


SASL = {
    "security.protocol": "SASL_PLAINTEXT",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "u",
    "sasl.password": "p",
    "socket.timeout.ms": "2000",
    "client.id": "me",
}


def test_every_client_connects_like_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admin, dead-letter and read-back clients all take the consumer's connection
    settings (once spr lag and spr replay connected to the bootstrap address only)."""
    import spr.kafka.admin

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(spr.kafka.admin, "admin_client", lambda conf: seen.append(conf))
    consumer_conf = {**SASL, "bootstrap.servers": "h:9093", "fetch.max.bytes": "1", "group.id": "g"}
    expected = {**SASL, "bootstrap.servers": "h:9093"}
    assert connection_settings(consumer_conf) == expected

    from spr.kafka.admin import KafkaAdmin

    admin = KafkaAdmin(consumer_conf, timeout_s=3)
    assert {k: seen[0][k] for k in expected} == expected and "group.id" not in seen[0]
    assert admin.bootstrap == "h:9093"
    KafkaAdmin.for_bootstrap("h:9093", kafka={"sasl.password": "p", "linger.ms": "5"})
    assert seen[1]["sasl.password"] == "p" and "linger.ms" not in seen[1]

    from spr.dlq import DeadLetterWriter

    writer = DeadLetterWriter(bootstrap="h:9093", producer_config=SASL)
    assert {k: writer.admin_config()[k] for k in expected} == expected


def test_lag_and_replay_take_the_same_kafka_settings_as_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spr.cli import lag, main, replay

    given: dict[str, Any] = {}

    def fake_measure(group: str, **kwargs: Any) -> Any:
        given["lag"] = kwargs["kafka"]
        raise ConfigError("stop here")

    def fake_rewind(group: str, **kwargs: Any) -> Any:
        given["replay"] = kwargs["kafka"]
        raise ConfigError("stop here")

    monkeypatch.setattr(lag, "measure_lag", fake_measure)
    monkeypatch.setattr(replay, "rewind", fake_rewind)
    monkeypatch.setenv("SPR_KAFKA_SASL_MECHANISM", "PLAIN")
    flags = [
        "-X",
        "security.protocol=SASL_PLAINTEXT",
        "-X",
        "sasl.username=u",
        "-X",
        "sasl.password=p",
    ]
    assert main(["lag", "--group", "g", *flags]) == 2
    assert main(["replay", "--group", "g", "--to-offset", "0", *flags]) == 2
    for settings in (given["lag"], given["replay"]):
        assert settings["security.protocol"] == "SASL_PLAINTEXT"
        assert settings["sasl.username"] == "u" and settings["sasl.mechanism"] == "PLAIN"


# -- misrouting (design §10): an event on a partition its key does not map to ---------------


def _misrouted_script() -> tuple[list[Any], dict[str, int]]:
    import json as _json

    from test_engine_logic import Msg as _Msg

    from spr.routing import partition_for, partition_key

    def on(partition: int, offset: int, entity: str, seq: int | None) -> Any:
        body: dict[str, Any] = {"entity_type": "order", "entity_id": entity, "state": "s"}
        if seq is not None:
            body["sequence"] = seq
        return _Msg("t", partition, offset, _json.dumps(body).encode())

    home = {e: partition_for(partition_key(f"order:{e}"), 2) for e in ("a", "b", "c")}
    away = {e: 1 - p for e, p in home.items()}
    script = [
        assign(("t", 0), ("t", 1)),
        [
            on(home["a"], 0, "a", 1),  # where it belongs
            on(away["b"], 0 if away["b"] != home["a"] else 1, "b", 5),  # misrouted, sequenced
            on(away["c"], 7, "c", None),  # misrouted, no sequence
        ],
    ]
    return script, home


class _PartitionsAdmin:
    def end_offsets(self, keys: Any, *, committed_only: bool = False) -> Any:
        return {}

    def log_start_offsets(self, keys: Any) -> Any:
        return {}

    def partitions(self, topics: Any) -> list[tuple[str, int]]:
        return [(t, p) for t in topics for p in (0, 1)]


@pytest.mark.parametrize(
    ("mode", "applied", "held"),
    [("auto", {"a", "b"}, 1), ("apply", {"a", "b", "c"}, 0), ("dead-letter", {"a"}, 2)],
)
def test_misrouted_events_are_counted_and_held_back_as_the_mode_says(
    mode: str, applied: set[str], held: int
) -> None:
    from test_engine_failures import RecordingDeadLetters

    from spr.engine import Engine

    script, _ = _misrouted_script()
    sink = FakeSink()
    engine, _ = make_engine(script, sink, batch=BatchPolicy(max_rows=100), on_misrouted=mode)
    engine._admin_factory = lambda conf: _PartitionsAdmin()  # type: ignore[assignment]
    dead = RecordingDeadLetters()
    engine._dead_letters = dead
    assert isinstance(engine, Engine)
    stats = engine.run()
    assert stats.misrouted == 2 and stats.misrouted_dead_lettered == held
    assert set(sink.rows) == applied
    assert [c for _, _, c in dead.sent] == ["misrouted"] * held
    assert all(r.startswith("misrouted: t[") for _, r, _ in dead.sent)
    # Every offset moved on, whatever became of the event.
    assert sum(sink.stored.values()) > 0 and stats.consumed == 3


def test_on_misrouted_stop_stops_before_anything_past_it_is_committed() -> None:
    from spr.errors import SprError

    script, _ = _misrouted_script()
    sink = FakeSink()
    engine, consumer = make_engine(
        script, sink, batch=BatchPolicy(max_rows=100), on_misrouted="stop"
    )
    engine._admin_factory = lambda conf: _PartitionsAdmin()  # type: ignore[assignment]
    with pytest.raises(SprError, match=r"misrouted: t\[.*--on-misrouted stop"):
        engine.run()
    assert sink.stored == {} and consumer.commits == []


# -- the loop's wakeup on a finished flush -------------------------------------------------


def _flushing_with(sink: FakeSink) -> Any:
    from array import array

    from spr._core_py import Batch
    from spr.batch import STATE_COLUMNS
    from spr.config import EngineConfig
    from spr.engine.flushing import Flushing
    from spr.engine.intake import PendingBatch

    committed: list[Any] = []
    flushing = Flushing(
        EngineConfig(group_id="g", topics=("t",)),
        clock=FakeClock(),
        failure=FirstFailure(),
        on_committed=lambda job, result, seconds: committed.append(result),
    )
    flushing.start([sink], None)  # type: ignore[arg-type]
    batch = Batch(STATE_COLUMNS)
    batch.advance("t", 0, 5)
    flushing.submit(PendingBatch(batch, 0, 5, 0, array("q"), array("q")))
    return flushing, committed


def test_await_outcome_takes_the_flush_the_moment_it_commits() -> None:
    sink = FakeSink()
    sink.block.clear()
    flushing, committed = _flushing_with(sink)
    try:
        flushing.await_outcome(0.01)  # still running: nothing to take yet
        assert flushing.busy and committed == []
        threading.Timer(0.05, sink.block.set).start()
        flushing.await_outcome(30.0)  # returns with the outcome, not after 30 s
        assert not flushing.busy and len(committed) == 1
        assert committed[0].offsets == {("t", 0): 6}
        flushing.await_outcome(30.0)  # nothing in flight: returns at once
    finally:
        flushing.close()
