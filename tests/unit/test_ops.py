"""Operations commands without servers: plan arithmetic, lag thresholds, replay arguments."""

from __future__ import annotations

import math

import pytest

from spr.cli import main
from spr.errors import ConfigError
from spr.ops.lag import LagReport, PartitionLag
from spr.ops.plan import Measurement, plan_partitions
from spr.ops.replay import derived_group, parse_timestamp_ms, rewind


@pytest.mark.parametrize(
    ("target", "per_partition", "headroom", "minimum", "partitions"),
    [
        (45_000, 3_750, 0.3, 12, 16),  # the field report: 12 partitions, 58,500 with headroom
        (45_000, 3_750, 0.0, 12, 12),
        (1_000, 100, 0.2, 10, 12),  # exact: 1000 x 1.2 / 100 is 12, not 12.000000000000002
        (1_000, 100, 0.3, 10, 13),
        (1, 1_000_000, 0.3, 1, 1),  # never zero partitions
        (78_000, 4_333.34, 0.0, 18, 18),
        (10_001, 1_000, 0.0, 11, 11),
        (100, 0.5, 1.0, 200, 400),
    ],
)
def test_plan_arithmetic(
    target: float, per_partition: float, headroom: float, minimum: int, partitions: int
) -> None:
    plan = plan_partitions(target, per_partition, headroom=headroom)
    assert plan.minimum_partitions == minimum
    assert plan.partitions == partitions
    assert plan.partitions == max(1, math.ceil(round(target * (1 + headroom) / per_partition, 9)))
    assert any(f"-> {partitions} partition(s)" in line for line in plan.reasoning)


@pytest.mark.parametrize(
    ("target", "per_partition", "headroom"),
    [(0, 100, 0.3), (100, 0, 0.3), (-5, 100, 0.3), (100, math.nan, 0.3), (100, 10, -0.1), (100, 10, 11)],
)  # fmt: skip
def test_plan_refuses_nonsense(target: float, per_partition: float, headroom: float) -> None:
    with pytest.raises(ConfigError):
        plan_partitions(target, per_partition, headroom=headroom)


def test_plan_with_measurement_says_so() -> None:
    measured = Measurement(events=50_000, seconds=2.0, flushes=10, produce_seconds=1.0)
    plan = plan_partitions(100_000, measured.events_per_second, measurement=measured)
    assert plan.partition_throughput == 25_000
    assert plan.partitions == 6  # 100,000 x 1.3 / 25,000 = 5.2
    assert "(measured)" in plan.reasoning[0]
    assert plan.as_dict()["measurement"]["events_per_second"] == 25_000


def test_plan_command_prints_the_reasoning(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--target-throughput", "45000", "--partition-throughput", "3750"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().endswith("partitions: 16")
    assert "45,000 / 3,750 = 12.00 -> at least 12 partition(s)" in out


def test_plan_command_errors_are_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--target-throughput", "0", "--partition-throughput", "3750"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("spr plan: the target throughput must be a positive number")
    assert err.count("\n") == 1


def _lag(**kw: object) -> PartitionLag:
    base: dict[str, object] = dict(
        topic="t", partition=0, committed=10, log_start=0, end=20, lag=10, gap=0,
        oldest_age_s=30.0, retention_s=100.0, retention_fraction=0.3,
    )  # fmt: skip
    base.update(kw)
    return PartitionLag(**base)  # type: ignore[arg-type]


def test_lag_report_thresholds() -> None:
    quiet = LagReport(group="g", partitions=(_lag(),), max_lag=10, max_retention_fraction=0.8)
    assert quiet.violations() == []
    assert quiet.total_lag == 10
    over = LagReport(
        group="g",
        partitions=(_lag(lag=11), _lag(partition=1, retention_fraction=0.81)),
        max_lag=10,
        max_retention_fraction=0.8,
    )
    assert over.violations() == [
        "t[0]: lag 11 > 10",
        "t[1]: lag is 81% of the retention window > 80%",
    ]
    gap = LagReport(group="g", partitions=(_lag(gap=5),), max_lag=None, max_retention_fraction=None)
    assert gap.violations() == ["t[0]: 5 messages were deleted by retention before being read"]


def test_replay_helpers() -> None:
    assert derived_group("billing", "state_v2") == "billing.replay.state_v2"
    assert parse_timestamp_ms("1700000000123") == 1_700_000_000_123
    assert parse_timestamp_ms("2024-01-02T03:04:05Z") == 1_704_164_645_000
    assert parse_timestamp_ms("2024-01-02T03:04:05") == 1_704_164_645_000  # naive is UTC
    assert parse_timestamp_ms("2024-01-02T04:04:05+01:00") == 1_704_164_645_000
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_timestamp_ms("yesterday")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"to_offset": 1, "to_timestamp_ms": 1},
        {"to_offset": -1},
        {"to_offset": 0, "into": "spr_entity_state"},
        {"to_offset": 0, "into": ""},
    ],
)
def test_replay_refuses_bad_arguments_before_touching_servers(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        rewind("g", bootstrap="127.0.0.1:1", dsn="postgresql://nobody@127.0.0.1:1/x", **kwargs)  # type: ignore[arg-type]
